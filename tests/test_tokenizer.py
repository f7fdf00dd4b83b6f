"""The tiny offline tokenizer: deterministic, digits single tokens, Llama 3 chat template."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from distfair_jax.data import tokenizer as tokenizer_lib
from distfair_jax.errors import InputError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  out = tmp_path_factory.mktemp("tok") / "a"
  tok = tokenizer_lib.build_tiny_tokenizer(out)
  return out, tok


def _files(d):
  return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))}


def test_deterministic_byte_for_byte_across_processes(saved, tmp_path):
  out, _ = saved
  other = tmp_path / "b"
  code = ("from distfair_jax.data.tokenizer import build_tiny_tokenizer; "
          f"build_tiny_tokenizer({str(other)!r})")
  env = {**os.environ, "PYTHONHASHSEED": "12345"}
  subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
  a, b = _files(out), _files(other)
  assert "tokenizer.json" in a
  assert a == b


def test_extra_texts_change_the_vocabulary(saved):
  _, tok = saved
  tok2 = tokenizer_lib.build_tiny_tokenizer(texts=["zyxwvut zyxwvut zyxwvut"] * 5)
  assert tok2.get_vocab() != tok.get_vocab()
  assert len(tok2("zyxwvut", add_special_tokens=False)["input_ids"]) == 1


def test_vocab_size_and_special_tokens(saved):
  _, tok = saved
  assert len(tok) <= 2048
  for t in tokenizer_lib.SPECIAL_TOKENS:
    assert tok.convert_tokens_to_ids(t) is not None
  assert tok.eos_token == "<|eot_id|>"
  assert tok.pad_token_id != tok.eos_token_id
  ids = tok("hello")["input_ids"]
  assert ids[0] == tok.bos_token_id  # BOS added like Llama 3
  small = tokenizer_lib.build_tiny_tokenizer(vocab_size=512)
  assert len(small) <= 512


@pytest.mark.parametrize("text", ["0", "7", "a1b", " 2024", "x99y", "0Male", "(12)", "\n\n3Female"])
def test_digits_are_single_tokens(saved, text):
  _, tok = saved
  ids = tok(text, add_special_tokens=False)["input_ids"]
  pieces = [tok.decode([i]) for i in ids]
  for p in pieces:
    if any(ch.isdigit() for ch in p):
      assert len(p) == 1, pieces
  assert tok.decode(ids) == text
  for d in "0123456789":
    assert len(tok(d, add_special_tokens=False)["input_ids"]) == 1


def test_chat_template_round_trip(saved):
  out, tok = saved
  from transformers import AutoTokenizer
  loaded = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
  msgs = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
  text = tok.apply_chat_template(msgs, tokenize=False)
  assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 3?"
                  "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n5<|eot_id|>")
  gen = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=False)
  assert gen.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
  ids = tok(text, add_special_tokens=False)["input_ids"]
  assert tok.decode(ids) == text
  assert loaded(text, add_special_tokens=False)["input_ids"] == ids
  assert loaded.apply_chat_template(msgs, tokenize=False) == text
  enc = loaded.apply_chat_template(msgs[:1], add_generation_prompt=True)
  assert list(enc["input_ids"]) == tok(gen, add_special_tokens=False)["input_ids"]


def test_refuses_existing_dir_and_bad_vocab(saved, tmp_path):
  out, _ = saved
  with pytest.raises(InputError, match="non-empty"):
    tokenizer_lib.build_tiny_tokenizer(out)
  with pytest.raises(InputError, match="vocab_size"):
    tokenizer_lib.build_tiny_tokenizer(vocab_size=10)
