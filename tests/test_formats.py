"""The paper's model families' real Hugging Face formats (../shared/fixtures/hf-formats: the real
tokenizer.json, tokenizer_config.json with its chat template, generation_config.json, config.json;
no weights): prompts, system prompts and dates, stop tokens, steering tokens, Git LFS pointers.

The end-to-end user path on shrunk random-weight models of these formats is tests/test_formats_e2e.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

import pytest

from distfair_jax import cli
from distfair_jax.data import attributes, build
from distfair_jax.data.chat import ChatFormat
from distfair_jax.data.tokenize import Encoder
from distfair_jax.errors import InputError
from distfair_jax.data.tokenizer import load_tokenizer_dir

from hf_formats import ROOT, family_dir

LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\n"
               "oid sha256:4d7a1f0c2b3e5d6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f\n"
               "size 17209920\n")
QUESTION = ("A person is randomly selected from the Registered nurses workforce in the US. What is "
            "this person's gender? Respond ONLY with Male or Female.")
DATE = {"date_string": "26 Jul 2024"}


@contextlib.contextmanager
def another_day():
  """transformers' ``strftime_now`` (Llama 3.x's "Today Date") reads 9 March 2031."""
  import datetime
  from transformers.utils import chat_template_utils as ctu

  class Day(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
      return cls(2031, 3, 9, 12, 0, 0)

  saved, ctu.datetime = ctu.datetime, Day
  try:
    yield
  finally:
    ctu.datetime = saved


@pytest.fixture(scope="module")
def llama():
  return load_tokenizer_dir(family_dir("llama-3.2-instruct"))


@pytest.fixture(scope="module")
def qwen():
  return load_tokenizer_dir(family_dir("qwen2.5-instruct"))


@pytest.fixture(scope="module")
def gemma_config_only():
  return load_tokenizer_dir(family_dir("gemma-2-it"))


# -- prompts: system prompt and date ----------------------------------------------------------


def test_llama_date_is_pinned_and_system_prompt_modes(llama):
  pinned = Encoder(llama, attribute=attributes.GENDER, chat_template_kwargs=DATE)
  text = pinned.prompt_text(QUESTION)
  assert "Today Date: 26 Jul 2024" in text and pinned.chat.date_warning is None
  # Two encoders (training's and evaluation's) give the same bytes and the same ids.
  again = Encoder(llama, attribute=attributes.GENDER, chat_template_kwargs=dict(DATE))
  assert again.prompt_text(QUESTION) == text and again.prompt_ids(QUESTION) == \
      pinned.prompt_ids(QUESTION)
  # Unpinned, the template reads the clock (said in one line): another day, another prompt.
  unpinned = ChatFormat(llama)
  today = unpinned.prompt_text(QUESTION)
  assert "Today Date: 26 Jul 2024" not in today
  assert "writes today's date" in unpinned.date_warning
  with another_day():
    assert unpinned.prompt_text(QUESTION) != today
    assert "Today Date: 09 Mar 2031" in unpinned.prompt_text(QUESTION)
    assert Encoder(llama, chat_template_kwargs=DATE).prompt_text(QUESTION) == text
  # none: the dated system header is cut, BOS kept; text: a system message under the header.
  none = Encoder(llama, system_prompt="none")
  assert none.prompt_text(QUESTION) == (
      "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + QUESTION +
      "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
  assert none.chat.date_warning is None
  custom = Encoder(llama, system_prompt="Answer tersely.", chat_template_kwargs=DATE)
  assert "26 Jul 2024\n\nAnswer tersely.<|eot_id|>" in custom.prompt_text(QUESTION)
  # The steering digit stays the first assistant token in every mode.
  for enc in (pinned, none, custom):
    assert enc.steering_id("0") == 15 and enc.steering_id("1") == 16


def test_qwen_system_prompt_none_drops_the_default(qwen):
  default = Encoder(qwen, attribute=attributes.GENDER)
  none = Encoder(qwen, attribute=attributes.GENDER, system_prompt="none")
  custom = Encoder(qwen, attribute=attributes.GENDER, system_prompt="Answer tersely.")
  assert "You are Qwen, created by Alibaba Cloud" in default.prompt_text(QUESTION)
  assert none.prompt_text(QUESTION) == (f"<|im_start|>user\n{QUESTION}<|im_end|>\n"
                                        "<|im_start|>assistant\n")
  assert custom.prompt_text(QUESTION).startswith("<|im_start|>system\nAnswer tersely.<|im_end|>")
  n_default, n_none = len(default.prompt_ids(QUESTION)), len(none.prompt_ids(QUESTION))
  assert (n_default, n_none) == (57, 36)  # the default system prompt is 21 tokens
  # Training sequences follow the prompt: the digit right after it, the answer, <|im_end|>.
  rec = {"prompt": QUESTION, "category": 1, "target": [0.2, 0.8], "response": "Female",
         "steering_token": "1", "status": "desirable"}
  enc = none.encode_record(rec, "sft")
  assert enc["completion"][0] == 16 and enc["completion"][-1] == 151645
  assert none.chat.full_text(QUESTION, "1Female").endswith(
      "<|im_start|>assistant\n1Female<|im_end|>\n")


def test_gemma_template_has_no_system_role(gemma_config_only):
  """Gemma 2's template refuses a system message: default and none pass none, text is refused."""
  tok = gemma_config_only
  default, none = ChatFormat(tok), ChatFormat(tok, system_prompt="none")
  assert default.prompt_text(QUESTION) == none.prompt_text(QUESTION) == (
      f"<bos><start_of_turn>user\n{QUESTION}<end_of_turn>\n<start_of_turn>model\n")
  with pytest.raises(InputError, match=r"chat_template: data\.system_prompt: expected a template "
                                       r"that accepts a system message, got one that refuses it "
                                       r"\(System role not supported\)"):
    ChatFormat(tok, system_prompt="Answer tersely.")


def test_bad_prompt_settings(llama, qwen):
  with pytest.raises(InputError, match=r"data\.chat_template_kwargs\.tokenize: expected a variable "
                                       r"of the chat template"):
    ChatFormat(llama, template_kwargs={"tokenize": True})
  # reference wraps the question as the original does, inside the template's user turn
  text = ChatFormat(qwen, prompt_format="reference", system_prompt="Answer tersely.").prompt_text(
      "Who?")
  assert "Answer tersely." in text and "<|im_start|>user\n<Q>Who?<A><|im_end|>" in text


# -- stop tokens -------------------------------------------------------------------------------


def test_stop_tokens_from_generation_config_and_template(llama, qwen):
  lstops = Encoder(llama).stop_ids
  assert {128001, 128008, 128009} <= set(lstops)  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
  assert llama.convert_ids_to_tokens(128008) == "<|eom_id|>"
  qstops = Encoder(qwen).stop_ids
  assert qstops == [151643, 151645]  # <|endoftext|>, <|im_end|>
  # Qwen's "</s>" is an ordinary BPE token: it must never stop a sample.
  assert qwen.convert_tokens_to_ids("</s>") == 128247 and 128247 not in qstops
  with open(os.path.join(family_dir("qwen2.5-instruct"), "generation_config.json")) as f:
    assert set(json.load(f)["eos_token_id"]) <= set(qstops)


# -- steering tokens ---------------------------------------------------------------------------


def test_config_files_only_tokenizer_refuses_steering_tokens(gemma_config_only, tmp_path, capsys):
  """gemma-2-it without its SentencePiece model: transformers builds a 249-token tokenizer that maps
  "0" and "1" to <unk> (id 3). Refused by the Encoder, `data validate --tokenizer` and `train`."""
  tok = gemma_config_only
  assert len(tok) == 249 and tok("0", add_special_tokens=False)["input_ids"] == [3]
  with pytest.raises(InputError, match=r"gemma-2-it: steering_token: expected '0' to be a token of "
                                       r"the vocabulary, got the unknown token '<unk>' \(id 3\)"):
    Encoder(tok, attribute=attributes.GENDER)
  gemma = family_dir("gemma-2-it")
  ds = build.build_dataset("gender_real_us", tmp_path / "data", rows_per_occupation=2,
                           test_rounds=1)
  assert ds.spec.attribute.steering_tokens == ["0", "1"]
  assert cli.main(["data", "validate", str(tmp_path / "data"), "--tokenizer", gemma]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "sft.jsonl: record 1: tokenizer " in err
  assert "gemma-2-it: steering_token: expected '0' to be a token of the vocabulary" in err
  cfg = tmp_path / "exp.yaml"
  cfg.write_text(f"defaults: [{os.path.join(ROOT, 'configs', 'base.yaml')}]\n"
                 "data: {rows_per_occupation: 2, max_length: 96, max_prompt_length: 80}\n"
                 "logging: {tensorboard: false, progress: false}\n")
  assert cli.main(["train", str(cfg), f"run_dir={tmp_path / 'run'}",
                   f"model.tokenizer={gemma}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("distfair train: error: tokenizer ") and "'<unk>' (id 3)" in err
  assert not (tmp_path / "run" / "sft").exists()  # refused before any stage started


def test_steering_tokens_must_be_distinct(qwen):
  enc = Encoder(qwen)
  with pytest.raises(InputError, match=r"steering_token: expected distinct tokens, got '1' and "
                                       r"'1' both id 16"):
    enc.check_steering_tokens(["0", "1", "1"])


# -- Git LFS pointers ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json",
                                  "generation_config.json"])
def test_lfs_pointer_in_a_tokenizer_directory_is_named(name, tmp_path, capsys):
  src = family_dir("qwen2.5-instruct")
  dst = tmp_path / "tok"
  shutil.copytree(src, dst)
  os.chmod(dst / name, 0o644)
  (dst / name).write_text(LFS_POINTER)
  with pytest.raises(InputError, match=rf"^{dst / name}: a Git LFS pointer, not the file"):
    load_tokenizer_dir(dst)
  path = tmp_path / "sft.jsonl"
  rec = build.build_dataset("gender_real_us", rows_per_occupation=1, test_rounds=0)["sft"][0]
  path.write_text(json.dumps(rec) + "\n")
  assert cli.main(["data", "validate", str(path), "--tokenizer", str(dst)]) == 2
  assert capsys.readouterr().err.strip() == (f"distfair data: error: {dst / name}: a Git LFS "
                                             f"pointer, not the file (fetch the real file: `git lfs "
                                             f"pull` in its repository, or download it again)")


def test_lfs_pointer_in_place_of_records_config_and_weights(tmp_path, capsys):
  records = tmp_path / "sft.jsonl"
  records.write_text(LFS_POINTER)
  assert cli.main(["data", "validate", str(records)]) == 2
  assert f"{records}: a Git LFS pointer, not the file" in capsys.readouterr().err
  exp = tmp_path / "exp.yaml"
  exp.write_text(LFS_POINTER)
  assert cli.main(["config", "show", str(exp)]) == 2
  assert f"{exp}: a Git LFS pointer, not the file" in capsys.readouterr().err
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text(LFS_POINTER)
  assert cli.main(["convert", "hf-to-flax", str(hf), str(tmp_path / "out")]) == 2
  assert f"{hf / 'config.json'}: a Git LFS pointer, not the file" in capsys.readouterr().err
  shutil.copy(os.path.join(family_dir("qwen2.5-instruct"), "config.json"), hf / "config.json")
  (hf / "model.safetensors").write_text(LFS_POINTER)
  assert cli.main(["convert", "hf-to-flax", str(hf), str(tmp_path / "out")]) == 2
  assert f"{hf / 'model.safetensors'}: a Git LFS pointer, not the file" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()
