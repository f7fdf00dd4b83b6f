"""A Gemma 2 user's path through the CLI, with relative paths: a shrunk random Gemma2ForCausalLM
directory with a Gemma-style tokenizer and gemma-2-2b-it's own chat template and generation
config -> convert hf-to-flax -> convert check -> train (SFT + hybrid, LoRA q/v) -> eval -> export,
and the export reloaded with transformers (logits equal ours, ``generate`` runs).

The tokenizer: the fixture has no vocabulary (see ../shared/fixtures/hf-formats/README.md), so one
is trained here with the `tokenizers` library on the dataset's own text, SentencePiece-style
(spaces as "▁", byte fallback, digits never merged) with Gemma's special-token ids (pad 0, eos 1,
bos 2, unk 3, <start_of_turn> 106, <end_of_turn> 107, "\\n" 108), and saved as transformers'
GemmaTokenizer with the fixture's tokenizer_config.json settings and chat template (which starts
with <bos> and refuses a system role). The model's vocabulary is shrunk to 640 to match it.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT.parent / "shared" / "fixtures" / "hf-formats" / "gemma-2-it"
VOCAB = 640

CONFIG = """\
defaults: [{base}, {dataset}]
model: {{checkpoint: ckpt, dtype: float32, param_dtype: float32}}
lora: {{enabled: true, rank: 4, alpha: 16.0, dropout: 0.05, targets: [q_proj, v_proj]}}
data: {{rows_per_occupation: 4, max_length: 160, max_prompt_length: 128}}
sft: {{batch_size: 4, max_steps: 2, optim: {{learning_rate: 1.0e-3, warmup_steps: 1}}}}
hybrid: {{batch_size: 4, max_steps: 2, optim: {{learning_rate: 1.0e-3, warmup_steps: 1}}}}
checkpoint: {{async_save: false}}
heldout: {{max_batches: 1}}
logging: {{tensorboard: false, progress: false}}
eval: {{versions: [v2], rounds: 2, n_bootstrap: 0, plots: false, decode: {{max_new_tokens: 3}}}}
"""


def _special_tokens() -> list[str]:
  """Gemma's first 109 ids, then the 256 byte-fallback tokens."""
  unused = [f"<unused{i}>" for i in range(101)]  # ids 5..105 (their contents differ in Gemma)
  out = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *unused, "<start_of_turn>",
         "<end_of_turn>", "\n"]
  assert out.index("<start_of_turn>") == 106 and out.index("\n") == 108
  return out + [f"<0x{b:02X}>" for b in range(256)]


def _corpus() -> list[str]:
  from distfair_jax.data import build as build_lib
  ds = build_lib.build_dataset(build_lib.resolve_spec("gender_real_us"), rows_per_occupation=4,
                               test_rounds=1, seed=0, stories_per_occupation=0)
  texts = ["user model"]
  for rows in ds.records.values():
    for r in rows:
      texts += [str(r.get("prompt", "")), str(r.get("response", ""))]
  return texts


def write_tokenizer(d: Path):
  """A trained BPE saved as transformers' GemmaTokenizer with the fixture's settings."""
  from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
  tok.normalizer = normalizers.Replace(" ", "▁")
  # Training only: merges never cross a word start, a newline or a digit, so the vocabulary
  # works under GemmaTokenizer's own (whole-string) pre-tokenization, and digits stay single.
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split("▁", "merged_with_next"), pre_tokenizers.Split("\n", "isolated"),
      pre_tokenizers.Digits(individual_digits=True)])
  trainer = trainers.BpeTrainer(vocab_size=VOCAB - 16, special_tokens=_special_tokens(),
                                initial_alphabet=list(string.printable.strip()) + ["▁"],
                                show_progress=False)
  tok.train_from_iterator(_corpus(), trainer)
  model = json.loads(tok.to_str())["model"]
  merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
  gemma = transformers.GemmaTokenizer(vocab=model["vocab"], merges=merges,
                                      additional_special_tokens=["<start_of_turn>",
                                                                 "<end_of_turn>"])
  gemma.add_tokens([AddedToken("\n", normalized=False, special=False)])
  gemma.save_pretrained(d)
  config = json.loads((d / "tokenizer_config.json").read_text())
  fixture = json.loads((FIXTURE / "tokenizer_config.json").read_text())
  # Everything but the 256000-token vocabulary's added-token table (ids this vocabulary lacks).
  config.update({k: v for k, v in fixture.items() if k != "added_tokens_decoder"})
  (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
  shutil.copy(FIXTURE / "special_tokens_map.json", d / "special_tokens_map.json")


def write_model(d: Path) -> None:
  """gemma-2-2b-it's config.json shrunk (2 layers: sliding window 16, then global), random."""
  config = json.loads((FIXTURE / "config.json").read_text())
  config.update(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                query_pre_attn_scalar=32, sliding_window=16)
  config.pop("architectures")
  torch.manual_seed(0)
  model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**config)).eval()
  model.save_pretrained(d, safe_serialization=True)
  shutil.copy(FIXTURE / "generation_config.json", d / "generation_config.json")


def _distfair(cwd: Path, *args) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  proc = subprocess.run([sys.executable, "-m", "distfair_jax.cli", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, f"distfair {' '.join(args)}:\n{proc.stderr[-3000:]}"
  return proc


def test_gemma2_convert_train_eval_export(tmp_path, monkeypatch):
  if not FIXTURE.is_dir():
    pytest.skip(f"{FIXTURE}: the gemma-2-it fixture (chat template, generation config) is absent")
  hf_dir = tmp_path / "gemma-hf"
  write_tokenizer(hf_dir)
  write_model(hf_dir)
  tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  assert type(tok).__name__ == "GemmaTokenizer" and len(tok) <= VOCAB
  assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
  assert tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [106, 107]
  assert all(len(tok(str(i), add_special_tokens=False)["input_ids"]) == 1 for i in range(10))
  prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
  assert prompt == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
  with pytest.raises(Exception, match="System role not supported"):
    tok.apply_chat_template([{"role": "system", "content": "Be fair."},
                             {"role": "user", "content": "Hi"}], tokenize=False)

  _distfair(tmp_path, "convert", "hf-to-flax", "gemma-hf", "ckpt", "--dtype", "float32")
  check = _distfair(tmp_path, "convert", "check", "gemma-hf", "ckpt", "--threshold", "1e-5").stdout
  assert "OK" in check
  print(check.strip())

  (tmp_path / "exp.yaml").write_text(CONFIG.format(
      base=ROOT / "configs" / "base.yaml", dataset=ROOT / "configs" / "datasets" /
      "gender_real_us.yaml"))
  _distfair(tmp_path, "train", "exp.yaml", "run_dir=run")
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
          .splitlines() if line.strip()]
  train = {r["stage"]: r for r in rows if r.get("split") == "train"}
  assert set(train) == {"sft", "hybrid"}
  assert all(np.isfinite(r["loss"]) and r["step"] == 2 for r in train.values()), train

  _distfair(tmp_path, "eval", "run")
  doc = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
  assert doc["versions"]["v2"]["n_samples"] == 28  # 14 occupations x 2 rounds
  samples = [json.loads(line) for line in
             (tmp_path / "run" / "eval" / "v2.jsonl").read_text().splitlines()]
  print("eval sample:", samples[0])
  assert {s["steering_token"] for s in samples} <= {"0", "1"}  # steered by the model's digits

  _distfair(tmp_path, "export", "run", "hf")
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
  assert type(hf).__name__ == "Gemma2ForCausalLM" and hf.config.sliding_window == 16
  from distfair_jax.train.rundir import load_run
  monkeypatch.chdir(tmp_path)  # the run names its checkpoint relatively, as the user wrote it
  loaded, _, stage = load_run("run")
  assert stage == "hybrid"
  ids = np.asarray([tok(prompt, add_special_tokens=False)["input_ids"] * 3], np.int64)  # > window
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(ids)).logits.numpy()
  model = loaded.merged()
  got = np.asarray(model.logits(model(ids.astype(np.int32))))
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
  exported_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  inputs = exported_tok.apply_chat_template(
      [{"role": "user", "content": "Is a nurse male or female?"}], add_generation_prompt=True,
      return_tensors="pt", return_dict=True)
  out = hf.generate(**inputs, max_new_tokens=4, do_sample=False)
  assert out.shape[1] > inputs["input_ids"].shape[1]
  assert hf.generation_config.eos_token_id == [1, 107]
