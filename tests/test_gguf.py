"""GGUF -> distfair conversion: parity with transformers' own GGUF loading, tokenizer and chat
template, and every bad-input case.

The GGUF files are written here with ``gguf.GGUFWriter``: a 2-layer llama with random weights and
a small byte-level BPE vocabulary (trained here) in the metadata, laid out as llama.cpp writes it
(q/k rows permuted, ChatML template, bos/eos/pad ids). Weights in every supported type: F32, F16,
BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 are quantized with the gguf package's numpy code; Q2_K..Q6_K,
which it cannot quantize, are random blocks (random bits, sane fp16 scales), valid data all the
same. The qwen3 and gemma3 architectures: small random transformers models written as F32 files
the way llama.cpp's converter writes them (last section). Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (the gguf extra)")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from distfair_jax import cli  # noqa: E402
from distfair_jax.convert.hf import _forward_logits, _log_softmax, hf_name  # noqa: E402
from distfair_jax.errors import InputError  # noqa: E402
from distfair_jax.convert.gguf import gguf_name, gguf_to_flax, read_config, unpermute_rows  # noqa: E402

Q = gguf.GGMLQuantizationType
LAYERS, HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 2, 256, 512, 4, 2, 64  # K-quants: rows of 256
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (  # SmolLM2-Instruct's, as its GGUF metadata holds it
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["A person is randomly selected from the nurses in the US. What is their gender?",
          "Male", "Female", "The nurse walked in, smiled and said hello to everyone.",
          "system", "user", "assistant", "You are a helpful assistant", "0 1 2 3 4 5 6 7 8 9"] * 4
# name -> (weight types, cycled over the matrices; norm type; tied embeddings)
VARIANTS = {
    "f32": (("F32",), "F32", True),
    "f16_bf16_q8": (("F16", "BF16", "Q8_0"), "F16", False),
    "q4_q5": (("Q4_0", "Q4_1", "Q5_0", "Q5_1"), "F32", True),
    "k_quants": (("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"), "F32", False),
}
# f16 scale fields of a block (byte offsets) and their size, for random K-quant blocks
_K_SCALES = {"Q2_K": ((80, 82), 2e-3), "Q3_K": ((108,), 1e-3), "Q4_K": ((0, 2), 2e-4),
             "Q5_K": ((0, 2), 1e-4), "Q6_K": ((208,), 5e-5)}


# -------------------------------------------------------------------------------------------------
# Writing GGUF files


def _train_vocab() -> tuple[list[str], list[int], list[str]]:
  """(tokens in id order, llama.cpp token types, merges) of a tiny byte-level BPE."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  trainer = trainers.BpeTrainer(vocab_size=330, min_frequency=2, special_tokens=list(SPECIALS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(CORPUS, trainer=trainer)
  model = json.loads(tok.to_str())["model"]
  tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  return tokens, [3 if t in SPECIALS else 1 for t in tokens], merges


VOCAB = _train_vocab()


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's convert_hf_to_gguf ``LlamaModel.permute`` (HF rows -> GGUF rows)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def _hf_weights(rng, tied: bool) -> dict[str, np.ndarray]:
  """{GGUF name: weight in the Hugging Face layout ([out, in]), float32}."""
  vocab = len(VOCAB[0])
  w = {"token_embd.weight": rng.normal(0, 0.5, (vocab, HIDDEN)),
       "output_norm.weight": 1 + 0.1 * rng.normal(size=HIDDEN)}
  if not tied:
    w["output.weight"] = rng.normal(0, 0.05, (vocab, HIDDEN))
  shapes = {"attn_q": (HEADS * HEAD_DIM, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
            "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HEADS * HEAD_DIM),
            "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN), "ffn_down": (HIDDEN, INTER)}
  for i in range(LAYERS):
    for name, shape in shapes.items():
      w[f"blk.{i}.{name}.weight"] = rng.normal(0, 0.08, shape)
    for name in ("attn_norm", "ffn_norm"):
      w[f"blk.{i}.{name}.weight"] = 1 + 0.1 * rng.normal(size=HIDDEN)
  return {k: v.astype(np.float32) for k, v in w.items()}


def _random_k_blocks(qtype: str, rows: int, cols: int, rng) -> np.ndarray:
  """[rows, bytes] of valid ``qtype`` blocks: random bits, fp16 scales of a sane size."""
  _, type_size = gguf.GGML_QUANT_SIZES[Q[qtype]]
  blocks = rng.integers(0, 256, (rows, cols // 256, type_size), dtype=np.uint8)
  offsets, size = _K_SCALES[qtype]
  for off in offsets:
    scale = (size * rng.uniform(0.5, 1.0, (rows, cols // 256))).astype(np.float16)
    blocks[:, :, off:off + 2] = scale.view(np.uint8).reshape(rows, cols // 256, 2)
  return blocks.reshape(rows, -1)


def _encode(name: str, w: np.ndarray, qtype: str, rng) -> tuple[np.ndarray, object]:
  """(array, raw_dtype) to hand to GGUFWriter.add_tensor."""
  if qtype in _K_SCALES:
    return _random_k_blocks(qtype, w.shape[0], w.shape[1], rng), Q[qtype]
  if qtype == "F32":
    return w, None
  data = gguf.quants.quantize(w, Q[qtype])
  return data, (None if qtype == "F16" else Q[qtype])


def _gguf_tensors(hf: dict[str, np.ndarray], types, norm_type: str, rng) -> dict[str, tuple]:
  """{GGUF name: (array, raw_dtype)}: q/k permuted as llama.cpp does, then encoded."""
  out, i = {}, 0
  for name, w in hf.items():
    if ".attn_q." in name:
      w = _llamacpp_permute(w, HEADS)
    elif ".attn_k." in name:
      w = _llamacpp_permute(w, KV_HEADS)
    if w.ndim == 1:
      out[name] = _encode(name, w, norm_type, rng)
    else:
      out[name] = _encode(name, w, types[i % len(types)], rng)
      i += 1
  return out


def _metadata(kv: dict, omit: tuple[str, ...]) -> list[tuple[str, tuple]]:
  """[(GGUFWriter method, args)]: llama.cpp's keys for the tiny llama and its tokenizer."""
  tokens, token_types, merges = VOCAB
  calls = [
      ("add_name", ("tiny llama for tests",)), ("add_block_count", (LAYERS,)),
      ("add_context_length", (512,)), ("add_embedding_length", (HIDDEN,)),
      ("add_feed_forward_length", (INTER,)), ("add_head_count", (HEADS,)),
      ("add_head_count_kv", (KV_HEADS,)), ("add_rope_freq_base", (50000.0,)),
      ("add_layer_norm_rms_eps", (1e-5,)), ("add_rope_dimension_count", (HEAD_DIM,)),
      ("add_vocab_size", (len(tokens),)), ("add_tokenizer_model", ("gpt2",)),
      ("add_tokenizer_pre", ("smollm",)), ("add_token_list", (tokens,)),
      ("add_token_types", (token_types,)), ("add_token_merges", (merges,)),
      ("add_bos_token_id", (1,)), ("add_eos_token_id", (2,)), ("add_unk_token_id", (0,)),
      ("add_pad_token_id", (2,)), ("add_add_bos_token", (False,)),
      ("add_chat_template", (CHAT_TEMPLATE,)),
  ]
  calls = [c for c in calls if c[0] not in omit]
  return calls + [(f"add_{kind}", (key, value)) for key, (kind, value) in kv.items()]


def write_gguf(path: Path, types=("F32",), norm_type: str = "F32", tied: bool = True, *,
               arch: str = "llama", seed: int = 0, kv: dict | None = None,
               omit: tuple[str, ...] = (), edit=None) -> tuple[Path, dict[str, np.ndarray]]:
  """Writes a tiny llama GGUF at ``path``; returns (path, its weights in the HF layout).
  kv: extra metadata {key: (writer kind e.g. "uint32", value)}; omit: GGUFWriter methods of the
  usual metadata not to call; edit: changes the tensor dict ({name: (array, raw_dtype)})."""
  rng = np.random.default_rng(seed)
  hf = _hf_weights(rng, tied)
  tensors = _gguf_tensors(hf, types, norm_type, rng)
  if edit is not None:
    edit(tensors)
  path.parent.mkdir(parents=True, exist_ok=True)
  writer = gguf.GGUFWriter(str(path), arch)
  for method, args in _metadata(kv or {}, omit):
    getattr(writer, method)(*args)
  for name, (data, raw_dtype) in tensors.items():
    writer.add_tensor(name, data, raw_dtype=raw_dtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path, hf


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
  root = tmp_path_factory.mktemp("gguf")
  return {name: write_gguf(root / name / f"{name}.gguf", types, norm, tied, seed=i)
          for i, (name, (types, norm, tied)) in enumerate(VARIANTS.items())}


@pytest.fixture(scope="module")
def converted(files, tmp_path_factory) -> dict[str, Path]:
  root = tmp_path_factory.mktemp("flax")
  return {name: gguf_to_flax(path, root / name, dtype="float32")
          for name, (path, _) in files.items()}


def _transformers_model(path: Path):
  return transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _transformers_tokenizer(path: Path):
  return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _ours(out: Path):
  """(model, tokenizer, config, {HF name: weight in the HF layout}) through the one loader."""
  from flax import nnx
  from distfair_jax.model.loader import load_pretrained
  model, tokenizer, config = load_pretrained(out, dtype="float32")
  weights = {}
  for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name, transposed = hf_name(tuple(key))
    x = np.asarray(var.get_value())
    weights[name] = x.T if transposed else x
  return model, tokenizer, config, weights


# -------------------------------------------------------------------------------------------------
# Parity with transformers


def test_names_match_the_gguf_package_map():
  from distfair_jax.convert.hf import _abstract_params
  config = _tiny_config()
  name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
  for path in _abstract_params(config):
    hf, _ = hf_name(path)
    base, suffix = hf.rsplit(".", 1)
    assert gguf_name(path) == f"{name_map.get_name(base)}.{suffix}", path


def _tiny_config():
  from distfair_jax.model.llama import LlamaConfig
  return LlamaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTER,
                     num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     num_key_value_heads=KV_HEADS, tie_word_embeddings=False)


def test_unpermute_inverts_llamacpp_permute():
  w = np.arange(12 * 3).reshape(12, 3)
  for n_head in (1, 2, 3):
    np.testing.assert_array_equal(_llamacpp_permute(w, n_head)[unpermute_rows(12, n_head)], w)


def test_config_from_metadata(files):
  config = read_config(files["f16_bf16_q8"][0])
  assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (
      LAYERS, HIDDEN, INTER)
  assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (
      HEADS, KV_HEADS, HEAD_DIM)
  assert config.vocab_size == len(VOCAB[0]) and config.max_position_embeddings == 512
  assert config.rope_theta == 50000.0 and abs(config.rms_norm_eps - 1e-5) < 1e-12
  assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
  assert not config.tie_word_embeddings and read_config(files["f32"][0]).tie_word_embeddings


def test_f32_file_gives_back_the_original_weights(files, converted):
  """Independent of transformers: q/k un-permuted, every kernel transposed, values exact."""
  _, _, _, ours = _ours(converted["f32"])
  hf = files["f32"][1]
  for path_name, gname in (("model.layers.1.self_attn.q_proj.weight", "blk.1.attn_q.weight"),
                           ("model.layers.0.self_attn.k_proj.weight", "blk.0.attn_k.weight"),
                           ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight"),
                           ("model.embed_tokens.weight", "token_embd.weight"),
                           ("model.norm.weight", "output_norm.weight")):
    np.testing.assert_array_equal(ours[path_name], hf[gname], err_msg=path_name)
  assert "lm_head.weight" not in ours  # tied


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_weights_and_logits_match_transformers(variant, files, converted):
  import jax.numpy as jnp
  path = files[variant][0]
  model, tokenizer, config, ours = _ours(converted[variant])
  assert tokenizer is not None and config.tie_word_embeddings == VARIANTS[variant][2]
  ref_model = _transformers_model(path)
  ref = {k: v.numpy() for k, v in ref_model.state_dict().items()}
  if config.tie_word_embeddings:
    ref.pop("lm_head.weight", None)
  assert ref.keys() == ours.keys()
  for name, value in ref.items():  # the same dequantized values, bit for bit
    np.testing.assert_array_equal(ours[name], value, err_msg=name)
  ids = np.random.default_rng(0).integers(3, config.vocab_size, (3, 24))
  mask = np.ones_like(ids)
  mask[1, 16:] = 0
  mask[2, :6] = 0
  ids = np.where(mask == 1, ids, 2)
  positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)
  with torch.no_grad():
    want = ref_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                     position_ids=torch.from_numpy(positions)).logits.numpy()
  got = np.asarray(_forward_logits(model, jnp.asarray(ids, jnp.int32),
                                   jnp.asarray(mask, jnp.int32)))
  real = mask.astype(bool)
  diff, scale = np.abs(want - got)[real].max(), np.abs(want[real]).max()
  lp, lq = _log_softmax(want), _log_softmax(got)
  kl = (np.exp(lp) * (lp - lq)).sum(-1)[real].max()
  print(f"{variant}: max abs logit diff {diff:.3e} (logit scale {scale:.2f}), max KL {kl:.3e}")
  assert scale > 0.5 and diff <= 1e-4 * scale and kl <= 1e-8


def test_blocks_of_rows_give_the_same_weights(files, converted, tmp_path, monkeypatch):
  """Tensors read in many blocks (q/k blocks of whole heads) equal the one-block conversion."""
  from distfair_jax.convert import gguf as gguf_lib
  monkeypatch.setattr(gguf_lib, "_CHUNK_BYTES", 4 * HIDDEN * 100)  # 100 rows; q/k: 64 (a head)
  out = gguf_to_flax(files["k_quants"][0], tmp_path / "blocks", dtype="float32")
  _, _, _, blocks = _ours(out)
  _, _, _, whole = _ours(converted["k_quants"])
  assert blocks.keys() == whole.keys()
  for name, value in whole.items():
    np.testing.assert_array_equal(blocks[name], value, err_msg=name)


def test_bfloat16_output_is_the_rounded_float32(files, converted, tmp_path):
  out = gguf_to_flax(files["k_quants"][0], tmp_path / "bf16")  # default dtype: bfloat16
  from distfair_jax.convert.hf import load_model_config
  assert load_model_config(out).param_dtype == "bfloat16"
  import ml_dtypes
  _, _, _, f32 = _ours(converted["k_quants"])
  from distfair_jax.model.loader import load_pretrained
  from flax import nnx
  model, _, _ = load_pretrained(out)
  for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name, transposed = hf_name(tuple(key))
    x = np.asarray(var.get_value())
    assert x.dtype == ml_dtypes.bfloat16, name
    want = f32[name].T if transposed else f32[name]
    np.testing.assert_array_equal(x, want.astype(ml_dtypes.bfloat16), err_msg=name)


# -------------------------------------------------------------------------------------------------
# Tokenizer and chat template


def test_tokenizer_and_chat_template_match_transformers(files, converted):
  from distfair_jax.config import ModelConfig
  from distfair_jax.model.loader import load_tokenizer
  path, out = files["q4_q5"][0], converted["q4_q5"]
  want = _transformers_tokenizer(path)
  got = load_tokenizer(ModelConfig(checkpoint=str(out)))
  config = json.loads((out / "tokenizer_config.json").read_text())
  assert config["chat_template"] == CHAT_TEMPLATE  # in tokenizer_config.json itself
  assert json.loads((out / "generation_config.json").read_text()) == {
      "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
  assert len(got) == len(want) == len(VOCAB[0])
  for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "pad_token_id",
               "eos_token_id"):
    assert getattr(got, attr) == getattr(want, attr), attr
  assert got.eos_token == "<|im_end|>"
  for text in ["The nurse smiled.", "  spaces  and\nnewlines 0123", "<|im_start|>user\nhi",
               "émoji ✓ 中文"]:
    assert got(text).input_ids == want(text).input_ids, text
    assert got.decode(got(text).input_ids) == want.decode(want(text).input_ids)
  assert got("<|im_end|>").input_ids == [2]
  for messages in ([{"role": "user", "content": "Male or female?"}],
                   [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "0Male"}]):
    for gen in (True, False):
      a = got.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
      b = want.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
      assert a == b
  assert "You are a helpful assistant" in got.apply_chat_template(
      [{"role": "user", "content": "x"}], tokenize=False)


def test_encoder_uses_the_converted_tokenizer(converted):
  from distfair_jax.config import ModelConfig
  from distfair_jax.data.tokenize import Encoder
  from distfair_jax.model.loader import load_tokenizer
  enc = Encoder(load_tokenizer(ModelConfig(checkpoint=str(converted["f32"]))))
  assert enc.end_ids[0] == 2 and 2 in enc.stop_ids  # <|im_end|> ends the assistant turn
  assert enc.pad_id == 2


# -------------------------------------------------------------------------------------------------
# CLI


def _main(argv: list[str], monkeypatch) -> int:
  monkeypatch.setattr(cli, "COMMANDS", {"convert": "distfair_jax.commands.convert"})
  return cli.main(argv)


def test_cli_converts_and_refuses_bad_input(files, tmp_path, monkeypatch, capsys):
  src = str(files["q4_q5"][0])
  out = tmp_path / "out"
  assert _main(["convert", "gguf-to-flax", src, str(out), "--dtype", "float32"], monkeypatch) == 0
  assert f"wrote {out}" in capsys.readouterr().out
  assert {"params", "model_config.json", "tokenizer.json", "tokenizer_config.json",
          "generation_config.json"} <= set(os.listdir(out))
  assert _main(["convert", "gguf-to-flax", src, str(out)], monkeypatch) == 2  # not empty
  err = capsys.readouterr().err
  assert "overwrite" in err and len(err.strip().splitlines()) == 1
  assert _main(["convert", "gguf-to-flax", src, str(out), "--overwrite"], monkeypatch) == 0
  bad = tmp_path / "notes.txt"
  bad.write_text("hello")
  capsys.readouterr()
  assert _main(["convert", "gguf-to-flax", str(bad), str(tmp_path / "x")], monkeypatch) == 2
  err = capsys.readouterr().err
  assert "not a GGUF file" in err and len(err.strip().splitlines()) == 1


# -------------------------------------------------------------------------------------------------
# Bad input: one-line InputError naming the file and the problem; nothing left at DST


def _error(src: Path, dst: Path, **kw) -> str:
  with pytest.raises(InputError) as e:
    gguf_to_flax(src, dst, **kw)
  msg = str(e.value)
  assert "\n" not in msg
  assert str(src) in msg or "dtype" in kw  # names the file (a bad dtype names the field)
  assert not dst.exists()
  assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]
  return msg


def test_git_lfs_pointer_and_non_gguf_files(tmp_path):
  lfs = tmp_path / "model.gguf"
  lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:"
                 + "0" * 64 + "\nsize 98362432\n")
  assert "a Git LFS pointer, not the file" in _error(lfs, tmp_path / "out")
  other = tmp_path / "model.safetensors"
  other.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
  assert "not a GGUF file" in _error(other, tmp_path / "out")
  assert "no such file" in _error(tmp_path / "missing.gguf", tmp_path / "out")


def test_truncated_file(files, tmp_path):
  data = files["f32"][0].read_bytes()
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(data[:len(data) // 2])
  assert "truncated" in _error(cut, tmp_path / "out")
  header_only = tmp_path / "header.gguf"
  header_only.write_bytes(data[:64])
  assert "truncated" in _error(header_only, tmp_path / "out")


def test_other_architecture_refused(tmp_path):
  path, _ = write_gguf(tmp_path / "q" / "qwen.gguf", arch="qwen2")
  msg = _error(path, tmp_path / "out")
  assert "general.architecture" in msg and "qwen2" in msg and "llama" in msg


def test_unsupported_tensor_type_named(tmp_path):
  def edit(t):
    data = np.random.default_rng(0).integers(0, 256, (KV_HEADS * HEAD_DIM, HIDDEN // 32 * 18),
                                             dtype=np.uint8)
    t["blk.1.attn_v.weight"] = (data, Q.IQ4_NL)
  path, _ = write_gguf(tmp_path / "iq" / "iq.gguf", edit=edit)
  msg = _error(path, tmp_path / "out")
  assert "blk.1.attn_v.weight" in msg and "IQ4_NL" in msg and "Q4_K" in msg


def test_missing_unexpected_and_misshapen_tensors(tmp_path):
  path, _ = write_gguf(tmp_path / "a" / "a.gguf", edit=lambda t: t.pop("blk.1.ffn_up.weight"))
  msg = _error(path, tmp_path / "out")
  assert "blk.1.ffn_up.weight" in msg and "layers.1.mlp.up_proj.kernel" in msg
  path, _ = write_gguf(tmp_path / "b" / "b.gguf", edit=lambda t: t.update(
      {"blk.0.ffn_extra.weight": (np.ones((4, HIDDEN), np.float32), None)}))
  assert "unexpected" in (msg := _error(path, tmp_path / "out")) and "blk.0.ffn_extra" in msg
  path, _ = write_gguf(tmp_path / "c" / "c.gguf", edit=lambda t: t.update(
      {"blk.0.attn_k.weight": (np.ones((HEAD_DIM, HIDDEN), np.float32), None)}))
  msg = _error(path, tmp_path / "out")
  assert "blk.0.attn_k.weight" in msg and f"[{HIDDEN}, {KV_HEADS * HEAD_DIM}]" in msg
  path, _ = write_gguf(tmp_path / "d" / "d.gguf", edit=lambda t: t.update(
      {"rope_freqs.weight": (np.ones(HEAD_DIM // 2, np.float32), None)}))
  assert "rope_freqs.weight" in _error(path, tmp_path / "out")


@pytest.mark.parametrize("key,kind,value,words", [
    ("llama.expert_count", "uint32", 8, ("llama.expert_count", "experts")),
    ("llama.rope.scaling.type", "string", "linear", ("llama.rope.scaling.type", "linear")),
    ("llama.attention.key_length", "uint32", 32, ("llama.rope.dimension_count", "32")),
])
def test_metadata_it_cannot_represent(key, kind, value, words, tmp_path):
  path, _ = write_gguf(tmp_path / "m" / "m.gguf", kv={key: (kind, value)})
  msg = _error(path, tmp_path / "out")
  assert all(w in msg for w in words), msg


def test_missing_metadata_and_vocab_mismatch(tmp_path):
  path, _ = write_gguf(tmp_path / "m" / "m.gguf", omit=("add_feed_forward_length",))
  assert "llama.feed_forward_length" in _error(path, tmp_path / "out")
  vocab = len(VOCAB[0])
  path, _ = write_gguf(tmp_path / "v" / "v.gguf", edit=lambda t: t.update(
      {"token_embd.weight": (np.ones((vocab - 10, HIDDEN), np.float32), None)}))
  msg = _error(path, tmp_path / "out")
  assert "llama.vocab_size" in msg and str(vocab - 10) in msg


def test_bad_dtype_and_overwrite(files, tmp_path):
  assert "dtype" in _error(files["f32"][0], tmp_path / "out", dtype="int8")
  dst = tmp_path / "dst"
  dst.mkdir()
  (dst / "keep.txt").write_text("mine")
  with pytest.raises(InputError, match="overwrite"):
    gguf_to_flax(files["f32"][0], dst)
  assert os.listdir(dst) == ["keep.txt"]
  gguf_to_flax(files["f32"][0], dst, dtype="float32", overwrite=True)
  assert not (dst / "keep.txt").exists() and (dst / "model_config.json").is_file()
  assert sorted(os.listdir(tmp_path)) == ["dst"]


# -------------------------------------------------------------------------------------------------
# The qwen3 and gemma3 architectures: a random transformers model written as an F32 GGUF file the
# way llama.cpp's converter writes it (QK-norm tensors, Gemma's four norms stored as 1 + w), then
# converted and compared with transformers' own GGUF loading and with the original model. Head dims
# are what transformers' GGUF loading assumes (it reads no head dim for qwen3: 128; gemma3 scales
# queries by 256).

_COMMON = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
           "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
FAMILIES = {  # arch: (HF config class, model class, config fields, layer tensor names)
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(head_dim=128, num_hidden_layers=2, tie_word_embeddings=False),
              {**_COMMON, "post_attention_layernorm": "ffn_norm"}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(head_dim=256, num_hidden_layers=6, sliding_window=4, query_pre_attn_scalar=256,
                    rope_local_base_freq=10000.0),
               {**_COMMON, "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}),
}


def _family_model(arch: str):
  conf_cls, model_cls, fields, _ = FAMILIES[arch]
  # gemma3: the token list gains <mask> (transformers' GemmaTokenizer adds it when absent)
  conf = getattr(transformers, conf_cls)(
      vocab_size=len(VOCAB[0]) + (arch == "gemma3"), hidden_size=64, intermediate_size=96, num_attention_heads=2,
      num_key_value_heads=1, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=512,
      bos_token_id=1, eos_token_id=2, pad_token_id=2, **fields)
  torch.manual_seed(0)
  model = getattr(transformers, model_cls)(conf).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_((0.3 if "norm" in name else 1 / p.shape[-1] ** 0.5) * torch.randn_like(p)
              + (1.0 if "norm" in name and arch == "qwen3" else 0.0))
  return model


def write_family_gguf(path: Path, arch: str, kv: dict | None = None):
  """Writes the random ``arch`` model as llama.cpp would (F32); returns (path, the torch model)."""
  model = _family_model(arch)
  conf, names = model.config, FAMILIES[arch][3]
  path.parent.mkdir(parents=True, exist_ok=True)
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_name(f"tiny {arch} for tests")
  writer.add_block_count(conf.num_hidden_layers)
  writer.add_context_length(conf.max_position_embeddings)
  writer.add_embedding_length(conf.hidden_size)
  writer.add_feed_forward_length(conf.intermediate_size)
  writer.add_head_count(conf.num_attention_heads)
  writer.add_head_count_kv(conf.num_key_value_heads)
  writer.add_key_length(conf.head_dim)
  writer.add_value_length(conf.head_dim)
  writer.add_rope_freq_base(10000.0)
  writer.add_layer_norm_rms_eps(conf.rms_norm_eps)
  if arch == "gemma3":
    writer.add_sliding_window(conf.sliding_window)
  extra = {"add_token_list": ["<mask>"], "add_token_types": [3]} if arch == "gemma3" else {}
  for method, args in _metadata({}, ()):
    if method in extra:
      args = (list(args[0]) + extra[method],)
    if "token" in method or method == "add_chat_template":
      getattr(writer, method)(*args)
  for key, (kind, value) in (kv or {}).items():
    getattr(writer, f"add_{kind}")(key, value)
  for name, tensor in model.state_dict().items():
    w = tensor.numpy().astype(np.float32)
    if name.startswith("model.layers."):
      i, module = name[len("model.layers."):].split(".", 1)
      gguf_base = f"blk.{i}.{names[module.rsplit('.', 1)[0]]}"
    else:
      gguf_base = {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
                   "lm_head": "output"}[name.rsplit(".", 1)[0]]
    if arch == "gemma3" and "norm" in name:
      w = w + np.float32(1.0)  # llama.cpp's Gemma converter stores 1 + w
    if gguf_base == "output" and conf.tie_word_embeddings:
      continue
    writer.add_tensor(f"{gguf_base}.weight", np.ascontiguousarray(w))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path, model


def jnp_i32(x):
  import jax.numpy as jnp
  return jnp.asarray(x, jnp.int32)


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_qwen3_and_gemma3_files_match_transformers(arch, tmp_path):
  path, original = write_family_gguf(tmp_path / "src" / f"{arch}.gguf", arch)
  out = gguf_to_flax(path, tmp_path / "out", dtype="float32")
  model, tokenizer, config, weights = _ours(out)
  assert type(model).__name__ == {"qwen3": "Qwen3", "gemma3": "Gemma3"}[arch]
  assert config.head_dim == original.config.head_dim
  if arch == "gemma3":
    assert config.is_sliding == (True,) * 5 + (False,) and config.sliding_window == 4
    assert (config.rope_local_base_freq, config.query_pre_attn_scalar) == (10000.0, 256.0)
  for name, value in original.state_dict().items():  # the norms' 1 + w comes back as w
    if name in weights:
      np.testing.assert_allclose(weights[name], value.numpy(), atol=1e-7, err_msg=name)
  ids = np.random.default_rng(0).integers(3, len(VOCAB[0]), size=(3, 12))
  mask = np.ones_like(ids)
  mask[1, 8:], mask[2, :3] = 0, 0
  positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)
  got = np.asarray(_forward_logits(model, jnp_i32(ids), jnp_i32(mask)))
  real = mask.astype(bool)
  ref = _transformers_model(path)
  for label, hf in (("transformers' GGUF loading", ref), ("the original model", original)):
    with torch.no_grad():
      want = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(positions)).logits.float().numpy()
    diff = float(np.abs(want - got)[real].max())
    print(f"{arch} GGUF (F32) vs {label}: max abs logit difference {diff:.3e}")
    assert diff <= 1e-5 and np.abs(want[real]).max() > 0.5, label


def test_qwen3_and_gemma3_metadata_it_cannot_represent(tmp_path):
  path, _ = write_family_gguf(tmp_path / "q" / "qwen3.gguf", "qwen3",
                              kv={"qwen3.rope.scaling.type": ("string", "yarn")})
  msg = _error(path, tmp_path / "out")
  assert "qwen3.rope.scaling.type" in msg and "yarn" in msg and "expected none" in msg
  path, _ = write_family_gguf(tmp_path / "g" / "gemma3.gguf", "gemma3",
                              kv={"gemma3.rope.scaling.type": ("string", "linear"),
                                  "gemma3.rope.scaling.factor": ("float32", 8.0)})
  config = read_config(path)
  assert config.rope_scaling == {"rope_type": "linear", "factor": 8.0}
  assert config.rope_local_base_freq == 10000.0  # the sliding layers' RoPE stays unscaled
