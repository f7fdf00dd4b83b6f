"""What the parity tests against transformers (tests/test_qwen3.py, test_gemma3.py, test_gemma2.py)
share: small random Hugging Face models built with torch and saved, their conversion, the padded
batch, both sides' logits and their comparison, the bit-exact round trip, cached decoding, logical
axes and the one-line config errors.

torch and transformers are imported where they are used: the test modules skip, saying why, when
they are absent (``pytest.importorskip``) before calling anything here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distfair_jax.errors import InputError
from distfair_jax.model.llama_config import LlamaConfig


def padded_batch(vocab: int, batch: int = 3, length: int = 16, seed: int = 0):
  """[batch, length]: an unpadded row, then right-, left- and right-padded ones (as many as
  ``batch`` holds, from 2)."""
  ids = np.random.default_rng(seed).integers(4, vocab, size=(batch, length))
  mask = np.ones((batch, length), np.int64)
  mask[1, length - 5:] = 0
  if batch > 2:
    mask[2, :6] = 0
  if batch > 3:
    mask[3, length - 3:] = 0
  return np.where(mask == 1, ids, 0), mask


def randomize(model, *, norm_offset: float = 0.0, embed_scale: float,
              embed_names: tuple[str, ...] = ("embed_tokens", "lm_head")) -> None:
  """Random weights in place: norms ``norm_offset + 0.3 N(0, 1)``, the parameters named by
  ``embed_names`` ``embed_scale N(0, 1)``, the others N(0, 1 / fan-in)."""
  import torch
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(norm_offset + 0.3 * torch.randn_like(p))
      elif any(e in name for e in embed_names):
        p.copy_(embed_scale * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)


def random_hf_model(conf, model_class, randomize, seed: int = 0):
  """``model_class(conf)`` in eval mode, its weights from torch seed ``seed`` then
  ``randomize(model)``."""
  import torch
  torch.manual_seed(seed)
  model = model_class(conf).eval()
  randomize(model)
  return model


def save_random_hf(tmp_path_factory, name: str, conf, model_class, randomize
                   ) -> tuple[Path, object]:
  """(a new directory ``.../NAME`` holding a ``random_hf_model`` as safetensors, the model)."""
  model = random_hf_model(conf, model_class, randomize)
  d = tmp_path_factory.mktemp("hf") / name
  model.save_pretrained(d, safe_serialization=True)
  return d, model


def random_hf_dirs(tmp_path_factory, family: str, config_class, model_class, randomize,
                   configs: dict, drop: tuple[str, ...] = ("architectures",)) -> dict:
  """{case: (directory FAMILY-CASE, model)}, a ``save_random_hf`` each, for ``configs`` {case:
  config.json fields}: ``config_class`` of the fields but ``drop``, eager attention."""
  out = {}
  for case, data in configs.items():
    conf = config_class(**{k: v for k, v in data.items() if k not in drop})
    conf._attn_implementation = "eager"
    out[case] = save_random_hf(tmp_path_factory, f"{family}-{case}", conf, model_class, randomize)
  return out


def convert_all(hf_dirs: dict, tmp_path_factory) -> dict:
  """{case: its float32 conversion by hf-to-flax} of ``hf_dirs`` {case: (directory, model)}."""
  from distfair_jax.convert.hf import hf_to_flax
  return {case: hf_to_flax(d, tmp_path_factory.mktemp("flax") / case, dtype="float32")
          for case, (d, _) in hf_dirs.items()}


def hf_logits(hf_model, ids, mask) -> np.ndarray:
  import torch
  positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)
  with torch.no_grad():
    return hf_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions)).logits.float().numpy()


def our_logits(model, ids, mask) -> np.ndarray:
  return np.asarray(nnx.jit(lambda m, i, a: m.logits(m(i, a)))(
      model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))


@dataclasses.dataclass(frozen=True)
class Compared:
  """Both sides' logits on a padded batch: ``diff`` is the max abs difference and ``scale`` the
  max abs reference logit, over the real (unpadded) positions ``real``."""
  ids: np.ndarray
  mask: np.ndarray
  ref: np.ndarray
  got: np.ndarray
  real: np.ndarray
  diff: float
  scale: float


def compare(hf_model, model, vocab: int, **batch) -> Compared:
  """transformers' ``hf_model`` and our ``model`` on ``padded_batch(vocab, **batch)``."""
  ids, mask = padded_batch(vocab, **batch)
  ref, got = hf_logits(hf_model, ids, mask), our_logits(model, ids, mask)
  real = mask.astype(bool)
  return Compared(ids, mask, ref, got, real, float(np.abs(ref - got)[real].max()),
                  float(np.abs(ref[real]).max()))


def assert_same_safetensors(src: Path, out: Path) -> dict:
  """The two directories' model.safetensors hold the same tensors (names, dtypes, values bit for
  bit); returns the second's."""
  from safetensors.numpy import load_file
  a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype, name
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  return b


def cached_decode(model, ids, mask, new) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Prefill of the padded prompts then one ``decode_step`` per column of ``new``, in one jit:
  (those logits, the full forward's over prompts + new, the real positions)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, ids, mask, new, cache):
    m = nnx.merge(graphdef, state)
    h, cache = m.prefill(ids, mask, cache)
    out = [m.logits(h)]
    for j in range(new.shape[1]):
      h, cache = m.decode_step(new[:, j:j + 1], cache)
      out.append(m.logits(h))
    return jnp.concatenate(out, axis=1)

  batch, total = ids.shape[0], ids.shape[1] + new.shape[1]
  got = np.asarray(run(state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                       jnp.asarray(new, jnp.int32), model.init_cache(batch, total)))
  full = our_logits(model, np.concatenate([ids, new], 1),
                    np.concatenate([mask, np.ones_like(new)], 1))
  real = np.concatenate([mask, np.ones_like(new)], 1).astype(bool)
  return got, full, real


def assert_logical_axes(model) -> None:
  """Every parameter has logical axes, one per dimension."""
  for path, var in nnx.to_flat_state(nnx.state(model)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == len(var.shape), path


def assert_bad_config(tmp_path: Path, data: dict, message: str) -> None:
  """``data`` as tmp_path/config.json: LlamaConfig.from_hf refuses it with one line that matches
  ``message`` and names the file."""
  path = tmp_path / "config.json"
  path.write_text(json.dumps(data))
  with pytest.raises(InputError, match=message) as info:
    LlamaConfig.from_hf(path)
  assert str(path) in str(info.value) and "\n" not in str(info.value)
