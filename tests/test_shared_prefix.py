"""Shared-prefix decoding (``llama.SharedPrefixCache``, ``Sampler(shared_prefix=...)``) against the
plain path (prompt cache rows repeated per round), on tiny random models of every family."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distfair_jax.evaluation import sample
from distfair_jax.config import DecodeConfig
from distfair_jax.model import SharedPrefixCache, family
from distfair_jax.model.llama import LlamaConfig

PROMPTS = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33,
                                        34, 35]]
ROUNDS = 3
_BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
# Gemma 2 with a window shorter than the prompts, so the sliding layers mask prompt slots.
_GEMMA2 = dict(_BASE, architecture="Gemma2ForCausalLM", hidden_act="gelu_pytorch_tanh",
               attn_logit_softcapping=5.0, final_logit_softcapping=3.0, sliding_window=4,
               query_pre_attn_scalar=8, tie_word_embeddings=True)
CONFIGS = {
    "llama": _BASE,
    "llama_scan": dict(_BASE, scan_layers=True),
    "qwen2": dict(_BASE, architecture="Qwen2ForCausalLM", attention_bias=True),
    "gemma2": _GEMMA2,
    "gemma2_scan": dict(_GEMMA2, scan_layers=True),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
  return family.build(LlamaConfig(**CONFIGS[request.param]), rngs=nnx.Rngs(0))


def _decode_logits(model, shared: bool, steps: int, seed: int = 0) -> np.ndarray:
  """Logits [steps, P * ROUNDS, V] of ``steps`` decode steps after one prefill, fed the same
  random tokens, from a plain cache (rows repeated) or a shared-prefix cache."""
  ids, mask = sample.left_pad(PROMPTS, 0)
  p, length = ids.shape
  tokens = jax.random.randint(jax.random.key(seed), (steps, p * ROUNDS), 0, 64)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, ids, mask, tokens):
    m = nnx.merge(graphdef, state)
    if shared:
      cache = m.init_cache(p, length)
      _, cache = m.prefill(ids, mask, cache)
      cache = m.shared_prefix_cache(cache, ROUNDS, steps)
      assert isinstance(cache, SharedPrefixCache)
    else:
      cache = m.init_cache(p, length + steps)
      _, cache = m.prefill(ids, mask, cache)
      cache = sample.repeat_cache(m, cache, p, ROUNDS, length + steps)
    out = []
    for t in range(steps):
      hidden, cache = m.decode_step(tokens[t][:, None], cache)
      out.append(m.logits(hidden)[:, 0])
    return jnp.stack(out)

  return np.asarray(run(state, ids, mask, tokens))


def test_decode_step_logits_match_plain_path(model):
  plain = _decode_logits(model, shared=False, steps=6)
  shared = _decode_logits(model, shared=True, steps=6)
  assert np.abs(plain).max() > 0.1  # not a degenerate model
  np.testing.assert_allclose(shared, plain, atol=1e-5, rtol=0)


def test_suffix_segments():
  assert sample.suffix_segments(96) == [32, 64, 96]
  assert sample.suffix_segments(16) == [16]
  assert sample.suffix_segments(200, first=8) == [8, 16, 32, 64, 128, 200]


def test_generate_gives_the_plain_paths_samples(model):
  # 40 new tokens: two segments of the per-row cache (32, then grown to 40)
  kw = dict(rounds=4, config=DecodeConfig(max_new_tokens=40), steering="model",
            steering_ids=[10, 11], seed=3)
  plain_sampler, state = sample.Sampler.of(model, shared_prefix=False)
  shared_sampler, _ = sample.Sampler.of(model, shared_prefix=True)
  plain = plain_sampler.generate(state, PROMPTS, **kw)
  shared = shared_sampler.generate(state, PROMPTS, **kw)
  np.testing.assert_array_equal(shared.tokens, plain.tokens)
  np.testing.assert_array_equal(shared.steering_index, plain.steering_index)
  assert len({tuple(r) for r in shared.tokens}) > len(PROMPTS)  # rounds differ


def test_default_decodes_with_a_shared_prefix_when_rounds_share_a_chunk(monkeypatch):
  calls = []
  original = sample._prefill_shared  # noqa: SLF001
  monkeypatch.setattr(sample, "_prefill_shared",
                      lambda *a, **k: calls.append(a[3]) or original(*a, **k))
  m = family.build(LlamaConfig(**_BASE), rngs=nnx.Rngs(1))
  sampler, state = sample.Sampler.of(m)
  assert sampler.uses_shared_prefix(4) and not sampler.uses_shared_prefix(1)
  assert not sample.Sampler(sampler.graphdef, shared_prefix=False).uses_shared_prefix(4)
  sampler.generate(state, PROMPTS, rounds=4, max_new_tokens=3)
  assert calls == [4]  # traced once, with the chunk's 4 rounds per prompt
  sampler.generate(state, PROMPTS, rounds=1, max_new_tokens=3)
  assert calls == [4]  # one round per prompt: nothing to share, plain path
