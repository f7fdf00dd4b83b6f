"""Chat-template tokenization: masks, steering positions, KTO mismatched pairs, length policy,
for a Llama-3-style and a Qwen-style (ChatML) template, with tokenizers trained on the fly."""

from __future__ import annotations

import numpy as np
import pytest

from distfair_jax.data import attributes, build, collate, tokenize
from distfair_jax.errors import InputError
from distfair_jax.data.tokenizer import build_tiny_tokenizer

QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# Qwen2's pre-tokenizer pattern: single digits, letters with one leading non-letter, ...
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _corpus():
  ds = build.build_dataset("race_even_us", rows_per_occupation=5, test_rounds=1)
  return [r["prompt"] for r in ds["sft"]] + attributes.RACE.answers * 3


def _train(pre_tokenizer, specials, texts, vocab_size=800):
  from tokenizers import Tokenizer, decoders, models, trainers
  from tokenizers import pre_tokenizers as pt
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizer
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pt.ByteLevel.alphabet(),
      show_progress=False))
  return tok


def qwen_style_tokenizer():
  from tokenizers import Regex
  from tokenizers import pre_tokenizers as pt
  from transformers import PreTrainedTokenizerFast
  tok = _train(pt.Sequence([pt.Split(Regex(QWEN_PATTERN), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)]),
               ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], _corpus())
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", chat_template=QWEN_TEMPLATE)


def merging_tokenizer():
  """No pre-tokenizer splits: trained so that the digit merges with the newline before it."""
  from tokenizers import pre_tokenizers as pt
  from transformers import PreTrainedTokenizerFast
  from distfair_jax.data import tokenizer as tl
  texts = ["\n\n0Male", "\n\n1Female", "\n\n0Male", "\n\n1Female"] * 50 + _corpus()
  tok = _train(pt.ByteLevel(add_prefix_space=False, use_regex=False), list(tl.SPECIAL_TOKENS),
               texts)
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=tl.BOS, eos_token=tl.EOT,
                                 pad_token=tl.PAD, chat_template=tl.CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def tokenizers_by_style():
  return {"llama3": build_tiny_tokenizer(), "qwen": qwen_style_tokenizer()}


@pytest.fixture(scope="module")
def race():
  return build.build_dataset("race_even_us", rows_per_occupation=4, test_rounds=1)


@pytest.mark.parametrize("style", ["llama3", "qwen"])
def test_steering_token_ids(tokenizers_by_style, style):
  tok = tokenizers_by_style[style]
  ids = tokenize.steering_token_ids(attributes.RACE, tok)
  assert ids.shape == (5,) and ids.dtype == np.int32
  assert [tok.decode([int(i)]) for i in ids] == ["0", "1", "2", "3", "4"]
  ref = tokenize.steering_token_ids(attributes.GENDER, tok, prompt_format="reference")
  np.testing.assert_array_equal(ref, ids[:2])


@pytest.mark.parametrize("style", ["llama3", "qwen"])
@pytest.mark.parametrize("prompt_format", ["chat", "reference"])
def test_masks_and_steering_positions(tokenizers_by_style, race, style, prompt_format):
  tok = tokenizers_by_style[style]
  records = race["sft"][:6]
  enc = tokenize.Encoder(tok, attribute=attributes.RACE, prompt_format=prompt_format)
  batch = collate.tokenize_batch(records, tok, "sft", encoder=enc)
  seq = batch.seq
  b, length = seq.input_ids.shape
  assert b == 6 and length in tokenize.bucket_lengths(1024)
  end = "<|eot_id|>" if style == "llama3" else "<|im_end|>"
  for i, rec in enumerate(records):
    # reference: the original scripts' <Q>...<A> wrapping, inside the template's user turn
    content = rec["prompt"] if prompt_format == "chat" else f"<Q>{rec['prompt']}<A>"
    want = tok.apply_chat_template([{"role": "user", "content": content}],
                                   add_generation_prompt=True)["input_ids"]
    sp = int(batch.steering_position[i])
    n = int(seq.attention_mask[i].sum())
    assert list(seq.input_ids[i, :sp + 1]) == list(want)  # the prompt, unchanged
    assert seq.attention_mask[i, :n].all() and not seq.attention_mask[i, n:].any()
    # labels[:, t] is the token at t + 1
    np.testing.assert_array_equal(seq.labels[i, :n - 1], seq.input_ids[i, 1:n])
    mask = seq.label_mask[i]
    assert mask[sp] == 1 and mask[:sp].sum() == 0 and mask[n - 1:].sum() == 0
    assert mask.sum() == n - 1 - sp
    assert seq.labels[i, sp] == enc.steering_ids[rec["category"]]
    completion = tok.decode(seq.labels[i][mask > 0])
    assert completion == rec["steering_token"] + rec["response"] + end
    assert batch.category[i] == rec["category"]
  assert batch.target.shape == (6, 5) and batch.target.dtype == np.float32
  for x, dtype in ((seq.input_ids, np.int32), (seq.attention_mask, np.int32),
                   (seq.labels, np.int32), (seq.label_mask, np.float32),
                   (batch.steering_position, np.int32), (batch.category, np.int32)):
    assert x.dtype == dtype


@pytest.mark.parametrize("style", ["llama3", "qwen"])
@pytest.mark.parametrize("prompt_format", ["chat", "reference"])
def test_steering_token_at_the_end_of_the_user_turn(tokenizers_by_style, race, style,
                                                    prompt_format):
  """``steering_placement: user_turn`` (the original code's): a steered sequence is, text for
  text, the chat template's rendering of the question + digit as the user turn and the answer as
  the assistant turn (tokenized in pieces, as the prompt and completion always are); the digit is predicted at the last prompt position; the suffix fed after it
  is that turn's end and the generation prompt; unsteered records are unchanged."""
  tok = tokenizers_by_style[style]
  records = race["sft"][:6]
  enc = tokenize.Encoder(tok, attribute=attributes.RACE, prompt_format=prompt_format,
                         steering_placement="user_turn")
  plain = tokenize.Encoder(tok, attribute=attributes.RACE, prompt_format=prompt_format)
  batch = collate.tokenize_batch(records, tok, "sft", encoder=enc)
  seq = batch.seq
  for i, rec in enumerate(records):
    content = rec["prompt"] if prompt_format == "chat" else f"<Q>{rec['prompt']}<A>"
    want = tok.apply_chat_template(
        [{"role": "user", "content": content + rec["steering_token"]},
         {"role": "assistant", "content": rec["response"]}], tokenize=False)
    sp, n = int(batch.steering_position[i]), int(seq.attention_mask[i].sum())
    assert tok.decode(seq.input_ids[i, :n]) == want.rstrip()
    assert seq.input_ids[i, sp + 1] == enc.steering_ids[rec["category"]]
    assert list(seq.input_ids[i, sp + 2:sp + 2 + len(enc.steering_suffix)]) == enc.steering_suffix
    assert seq.label_mask[i, sp] == 1 and seq.label_mask[i, :sp].sum() == 0
    assert enc.encode_prompts([rec["prompt"]]) == [list(seq.input_ids[i, :sp + 1])]
    assert enc.encode_prompts([rec["prompt"]], steered=False) == plain.encode_prompts(
        [rec["prompt"]])
  end = "<|eot_id|>" if style == "llama3" else "<|im_end|>"
  assert tok.decode(enc.steering_suffix).startswith(end)
  ift = race["ift"][:4]
  np.testing.assert_array_equal(collate.tokenize_batch(ift, tok, "ift", encoder=enc).seq.input_ids,
                                collate.tokenize_batch(ift, tok, "ift", encoder=plain).seq.input_ids)
  with pytest.raises(InputError, match="tokenize: steering_placement: expected one of"):
    tokenize.Encoder(tok, steering_placement="system")


@pytest.mark.parametrize("style", ["llama3", "qwen"])
def test_kto_pairs_and_mismatched_rotation(tokenizers_by_style, race, style):
  tok = tokenizers_by_style[style]
  recs = race["kto"][:8]  # 4 pairs
  batch = collate.tokenize_batch(recs, tok, "kto")
  b = 8
  kl, seq = batch.mismatched, batch.seq
  assert kl.input_ids.shape == seq.input_ids.shape
  np.testing.assert_array_equal(batch.desirable, [1, 1, 1, 1, 0, 0, 0, 0])

  def completion(s, i):
    return list(s.labels[i][s.label_mask[i] > 0])

  def prompt(s, i):
    return list(s.input_ids[i, :batch.steering_position[i] + 1])

  for j in range(4):  # row j and row j + 4 are a pair: same prompt, same steering token
    assert prompt(seq, j) == prompt(seq, j + 4)
    assert completion(seq, j)[0] == completion(seq, j + 4)[0]
    assert completion(seq, j) != completion(seq, j + 4)
  for i in range(b):  # prompt i with the completion of row (i + 1) mod B: rotate by one
    assert prompt(kl, i) == prompt(seq, i)
    assert completion(kl, i) == completion(seq, (i + 1) % b)
    n = int(kl.attention_mask[i].sum())
    np.testing.assert_array_equal(kl.labels[i, :n - 1], kl.input_ids[i, 1:n])
  assert collate.rotate([0, 1, 2, 3]) == [1, 2, 3, 0]


@pytest.mark.parametrize("style", ["llama3", "qwen"])
def test_packed_kto_batch_holds_the_rows_sequences(tokenizers_by_style, race, style):
  """layout="packed": row i = [prompt_i | desirable_i | undesirable_i | mismatched rows i, P + i];
  each branch with the prompt is exactly the rows layout's sequence, and each label is predicted by
  the hidden state the row layout's label mask points at."""
  tok = tokenizers_by_style[style]
  recs = race["kto"][:8]  # 4 pairs
  rows = collate.tokenize_batch(recs, tok, "kto")
  batch = collate.tokenize_batch(recs, tok, "kto", layout="packed")
  packed = batch.packed
  p = 4
  assert packed.input_ids.shape[0] == p and packed.label_ids.shape[:2] == (p, 2)
  np.testing.assert_array_equal(batch.target, rows.target[:p])

  def rows_seq(s, i):
    n = int(s.attention_mask[i].sum())
    return list(s.input_ids[i, :n])

  expected = lambda i: [rows_seq(rows.seq, i), rows_seq(rows.seq, p + i),
                        rows_seq(rows.mismatched, i), rows_seq(rows.mismatched, p + i)]
  for i in range(p):
    ids, seg, pos = packed.input_ids[i], packed.segment_ids[i], packed.positions[i]
    prompt = list(ids[seg == 1])
    assert packed.steering_position[i] == len(prompt) - 1
    for c, want in enumerate(expected(i)):
      branch = ids[seg == 2 + c]
      assert prompt + list(branch) == want
      np.testing.assert_array_equal(pos[seg == 2 + c], np.arange(len(prompt), len(want)))
    for g in range(2):
      live = packed.label_branch[i, g] >= 0
      src, lab = packed.label_source[i, g][live], packed.label_ids[i, g][live]
      br = packed.label_branch[i, g][live]
      assert set(br) == {2 * g, 2 * g + 1}
      for c in (2 * g, 2 * g + 1):
        want = expected(i)[c]
        assert list(lab[br == c]) == want[len(prompt):]  # every completion token is a label
        first = src[br == c][0]
        assert first == len(prompt) - 1  # the last prompt token predicts the steering token
        np.testing.assert_array_equal(ids[src[br == c][1:] + 1], lab[br == c][1:])


def test_packed_dpo_batch_holds_chosen_and_rejected(tokenizers_by_style, race):
  tok = tokenizers_by_style["qwen"]
  rows = collate.tokenize_batch(race["dpo"][:3], tok, "dpo")
  packed = collate.tokenize_batch(race["dpo"][:3], tok, "dpo", layout="packed").packed
  assert packed.label_ids.shape[:2] == (3, 1)
  for i in range(3):
    ids, seg = packed.input_ids[i], packed.segment_ids[i]
    for c, s in enumerate((rows.chosen, rows.rejected)):
      n = int(s.attention_mask[i].sum())
      assert list(ids[seg == 1]) + list(ids[seg == 2 + c]) == list(s.input_ids[i, :n])
      lab = packed.label_ids[i, 0][packed.label_branch[i, 0] == c]
      np.testing.assert_array_equal(lab, s.labels[i][s.label_mask[i] > 0])


def test_packed_cost_ratio_prefers_packing_for_short_answers(tokenizers_by_style, race):
  enc = tokenize.Encoder(tokenizers_by_style["llama3"])
  pairs = [tuple(enc.encode_record(r, "kto") for r in pair)
           for pair in tokenize.pair_records(race["kto"][:8])]
  assert tokenize.packed_cost_ratio(pairs) < 0.6  # attribute answers: a few tokens after a long prompt
  long = [({"prompt": [1] * 10, "completion": [2] * 30}, {"prompt": [1] * 10, "completion": [2] * 30})]
  # T = 10 + 4 x 30 = 130, L = 40: 4 x 130 / (12 x 40) > 1, rows are cheaper
  assert tokenize.packed_cost_ratio(long) == pytest.approx(520 / 480)
  with pytest.raises(InputError, match="at least one pair"):
    tokenize.packed_cost_ratio([])


def test_packed_layout_bad_input(tokenizers_by_style, race):
  tok = tokenizers_by_style["llama3"]
  with pytest.raises(InputError, match="layout"):
    collate.tokenize_batch(race["sft"][:2], tok, "sft", layout="packed")
  with pytest.raises(InputError, match="layout"):
    collate.tokenize_batch(race["kto"][:4], tok, "kto", layout="pairs")
  assert tokenize.packed_bucket(70, (32, 64)) == 128 and tokenize.packed_bucket(40, (32, 64)) == 64


def test_length_buckets(tokenizers_by_style, race):
  """``data.length_buckets``: powers of two (default), or ``fine`` with 1.5 times each too; the
  Encoder of a run's data section pads its batches to them; anything else is one line."""
  from distfair_jax.config import DataConfig
  assert tokenize.bucket_lengths(256) == (32, 64, 128, 256)
  assert tokenize.bucket_lengths(256, "fine") == (32, 48, 64, 96, 128, 192, 256)
  assert tokenize.bucket_lengths(200, "fine") == (32, 48, 64, 96, 128, 192, 200)
  tok = tokenizers_by_style["llama3"]
  for buckets, expected in (("pow2", (32, 64, 128, 256)), ("fine", (32, 48, 64, 96, 128, 192, 256))):
    enc = tokenize.Encoder.for_data(tok, DataConfig(max_length=256, max_prompt_length=200,
                                                    length_buckets=buckets))
    assert enc.buckets == expected
    batch = collate.tokenize_batch(race["sft"][:4], tok, "sft", encoder=enc)
    longest = max(len(e["prompt"]) + len(e["completion"])
                  for e in map(lambda r: enc.encode_record(r, "sft"), race["sft"][:4]))
    assert batch.seq.input_ids.shape[1] == tokenize.bucket_for(longest, expected)
  with pytest.raises(InputError, match="tokenize: length_buckets: expected one of"):
    tokenize.bucket_lengths(256, "halves")


def test_ift_and_dpo_batches(tokenizers_by_style, race):
  tok = tokenizers_by_style["llama3"]
  ift = collate.tokenize_batch(race["ift"][:4], tok, "ift").seq
  for i, rec in enumerate(race["ift"][:4]):
    assert tok.decode(ift.labels[i][ift.label_mask[i] > 0]) == rec["response"] + "<|eot_id|>"
  dpo = collate.tokenize_batch(race["dpo"][:4], tok, "dpo")
  assert type(dpo).__name__ == "DPOBatch" and dpo.rows == 4
  for i, rec in enumerate(race["dpo"][:4]):
    for side in ("chosen", "rejected"):
      s = getattr(dpo, side)
      assert tok.decode(s.labels[i][s.label_mask[i] > 0]) == rec[side] + "<|eot_id|>"
    assert dpo.chosen.input_ids.shape == dpo.rejected.input_ids.shape


def test_length_policy(tokenizers_by_style):
  tok = tokenizers_by_style["llama3"]
  rec = {"prompt": "word " * 200, "occupation": "x", "category": 1, "steering_token": "1",
         "response": "Female " * 50, "target": [0.5, 0.5], "status": "desirable"}
  enc = tokenize.Encoder(tok, max_length=64, max_prompt_length=40)
  batch = collate.tokenize_batch([rec], tok, "sft", encoder=enc)
  full_prompt = tok.apply_chat_template([{"role": "user", "content": rec["prompt"]}],
                                        add_generation_prompt=True)["input_ids"]
  assert batch.seq.input_ids.shape == (1, 64)
  assert batch.steering_position[0] == 39  # prompt truncated to 40 tokens ...
  np.testing.assert_array_equal(batch.seq.input_ids[0, :40], full_prompt[-40:])  # ... from the left
  assert batch.seq.input_ids[0, 40] == enc.steering_id("1")  # the steering token kept
  assert batch.seq.attention_mask[0].sum() == 64  # completion truncated to the remainder
  with pytest.raises(InputError, match="max_prompt_length: expected 0 < max_prompt_length < "
                                       "max_length"):
    tokenize.Encoder(tok, max_length=64, max_prompt_length=64)


def test_bad_steering_tokens(tokenizers_by_style):
  tok = tokenizers_by_style["llama3"]
  two = attributes.attribute_from_dict({"name": "x", "categories": [
      {"name": "a", "steering_token": "10"}, {"name": "b", "steering_token": "1"}]})
  with pytest.raises(InputError, match=r"steering_token: expected '10' to be exactly one token, "
                                       r"got 2 tokens"):
    tokenize.steering_token_ids(two, tok)
  with pytest.raises(InputError, match=r"steering_token: expected '0' .* to be the first "
                                       r"assistant token after the generation prompt"):
    tokenize.steering_token_ids(attributes.GENDER, merging_tokenizer())
  with pytest.raises(InputError, match=r"batch: size: expected at least one example"):
    collate.collate([], "kto", tokenize.Encoder(tok))


def test_cli_validate_checks_steering_tokens_for_the_tokenizer(tokenizers_by_style, race,
                                                                tmp_path, capsys):
  import json
  from distfair_jax import cli
  tok_dir = tmp_path / "tok"
  tokenizers_by_style["llama3"].save_pretrained(str(tok_dir))
  good = race["sft"][0]
  path = tmp_path / "sft.jsonl"
  path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "steering_token": "42"}) + "\n")
  assert cli.main(["data", "validate", str(path), "--tokenizer", str(tok_dir)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert f"{path}: record 2:" in err and "expected '42' to be exactly one token" in err
  path.write_text(json.dumps(good) + "\n")
  assert cli.main(["data", "validate", str(path), "--tokenizer", str(tok_dir)]) == 0


def test_reference_format_without_a_chat_template_is_raw_text(tokenizers_by_style, race):
  """A tokenizer without a chat template takes the original's raw <Q>{question}<A> text, with its
  own special tokens, and ends completions with EOS."""
  import copy
  tok = copy.deepcopy(tokenizers_by_style["llama3"])
  tok.chat_template = None
  rec = race["sft"][0]
  enc = tokenize.Encoder(tok, attribute=attributes.RACE, prompt_format="reference")
  assert enc.prompt_ids(rec["prompt"]) == tok(f"<Q>{rec['prompt']}<A>")["input_ids"]
  assert enc.end_ids == [tok.eos_token_id]
  with pytest.raises(InputError, match="expected a chat template"):
    tokenize.Encoder(tok, attribute=attributes.RACE)


def test_kl_pairs_reference_interleaves_as_the_original(tokenizers_by_style, race):
  """hybrid.kl_pairs=reference: d_i's mismatched completion is its own prompt's undesirable one,
  u_i's the next pair's desirable one (the original's [d0, u0, d1, u1, ...] shifted by one), in
  both layouts; an unknown choice is one line."""
  tok = tokenizers_by_style["qwen"]
  recs = race["kto"][:8]  # 4 pairs
  enc = tokenize.Encoder(tok, attribute=attributes.RACE)
  examples = [(enc.encode_record(d, "kto"), enc.encode_record(u, "kto"))
              for d, u in tokenize.pair_records(recs)]
  rows = collate.collate(examples, "kto", enc, kl_pairs="reference")
  packed = collate.collate(examples, "kto", enc, layout="packed", kl_pairs="reference").packed
  seq, kl = rows.seq, rows.mismatched

  def completion(s, i):
    return list(s.labels[i][s.label_mask[i] > 0])

  for i in range(4):
    assert completion(kl, i) == completion(seq, 4 + i)            # d_i -> u_i
    assert completion(kl, 4 + i) == completion(seq, (i + 1) % 4)  # u_i -> d_{i+1}
    for branch, row in ((2, i), (3, 4 + i)):  # the packed row's two mismatched branches
      got = list(packed.label_ids[i, 1][packed.label_branch[i, 1] == branch])
      assert got == completion(kl, row)
  assert collate.mismatched_rows(list("abcd"), "shifted") == list("bcda")
  assert collate.mismatched_rows(list("abcd"), "reference") == list("cdba")
  with pytest.raises(InputError, match=r"hybrid\.kl_pairs: expected one of shifted, reference"):
    collate.mismatched_rows(list("abcd"), "random")
