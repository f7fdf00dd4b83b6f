"""Tests of the KV-cached steered sampler (distfair_jax.evaluation.sample) on tiny random Llama models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distfair_jax.evaluation import sample
from distfair_jax.config import DecodeConfig
from distfair_jax.data.tokenize import pow2_bucket, prompt_bucket
from distfair_jax.errors import InputError
from distfair_jax.model.llama import Llama, LlamaConfig

VOCAB = 64
STEER_IDS = [10, 11, 12, 13]
STEER_P = np.array([0.5, 0.3, 0.15, 0.05])
PROMPTS = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33,
                                        34, 35]]


def _config(**kw) -> LlamaConfig:
  base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
  base.update(kw)
  return LlamaConfig(**base)


class _LogitBias(nnx.Variable):
  pass


class BiasedLlama(Llama):
  """A Llama whose logits get a fixed bias: with the steering columns of lm_head zeroed, the
  steering-token logits equal the bias exactly, at every position, for every prompt."""

  def __init__(self, config, bias, *, rngs):
    super().__init__(config, rngs=rngs)
    self.logit_bias = _LogitBias(jnp.asarray(bias, jnp.float32))

  def logits(self, hidden):
    return super().logits(hidden) + self.logit_bias[...]


@pytest.fixture(scope="module")
def model():
  return Llama(_config(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def steer_model():
  bias = np.zeros(VOCAB, np.float32)
  bias[STEER_IDS] = np.log(STEER_P) + 3.0  # any constant shift: renormalised over the K tokens
  m = BiasedLlama(_config(), bias, rngs=nnx.Rngs(1))
  kernel = m.lm_head.kernel[...]
  m.lm_head.kernel[...] = kernel.at[:, jnp.asarray(STEER_IDS)].set(0.0)
  return m


_SAMPLERS: dict = {}


def _sampler(model):
  """One Sampler per model object (its compiled programs shared by the tests), and its state."""
  if id(model) not in _SAMPLERS:
    _SAMPLERS[id(model)] = sample.Sampler.of(model)
  return _SAMPLERS[id(model)]


def generate(model, prompts, **kw):
  sampler, state = _sampler(model)
  return sampler.generate(state, prompts, **kw)


def _greedy_reference(model, prompts, steps, length=32):
  """Argmax of repeated full forwards (no cache), each sequence right-padded to ``length``."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def next_token(state, ids, mask):
    m = nnx.merge(graphdef, state)
    logits = m.logits(m(ids, mask))  # [B, L, V]
    last = mask.sum(-1) - 1
    return jnp.argmax(logits[jnp.arange(ids.shape[0]), last], axis=-1)

  seqs = [list(p) for p in prompts]
  for _ in range(steps):
    ids = np.zeros((len(seqs), length), np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for i, q in enumerate(seqs):
      ids[i, :len(q)], mask[i, :len(q)] = q, 1
    for i, t in enumerate(np.asarray(next_token(state, ids, mask))):
      seqs[i].append(int(t))
  return [q[len(p):] for q, p in zip(seqs, prompts)]


# Chi-square critical values with 3 degrees of freedom (K = 4 categories).
CHI2_3DF_P1E3 = 16.266  # P(chi2 > x) = 1e-3: accept below
CHI2_3DF_P1E6 = 30.665  # P(chi2 > x) = 1e-6: reject above


def _chi2(counts, p):
  """Pearson's chi-square statistic of counts [K] against probabilities p [K]."""
  expected = np.asarray(p, np.float64) * counts.sum()
  return float(((counts - expected) ** 2 / expected).sum())


# ------------------------------------------------------------------------------------------------
# Pure pieces


def test_filter_logits_top_k_top_p():
  logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25]]))
  keep = lambda k, p: np.isfinite(np.asarray(sample.filter_logits(logits, jnp.int32(k),
                                                                  jnp.float32(p))))
  np.testing.assert_array_equal(keep(2, 1.0)[0], [False, True, False, True])
  np.testing.assert_array_equal(keep(0, 0.6)[0], [False, True, False, True])  # 0.4 + 0.3 >= 0.6
  np.testing.assert_array_equal(keep(0, 0.4)[0], [False, True, False, False])
  np.testing.assert_array_equal(keep(0, 1.0), np.ones((2, 4), bool))
  # top-p inside the top k (renormalised): top 3 = 0.4, 0.3, 0.2 -> 0.4/0.9 < 0.5 <= 0.7/0.9
  np.testing.assert_array_equal(keep(3, 0.5)[0], [False, True, False, True])


def test_inverse_cdf_draw_reproduces_distribution_and_never_draws_excluded_tokens():
  vocab = 37  # not a multiple of the block width (8): padded blocks
  rng = np.random.default_rng(0)
  logits = (2.0 * rng.normal(size=vocab)).astype(np.float32)
  logits[[0, 5, 8, 15, 36]] = -np.inf  # first and last token, a block edge, mid-block
  logits[[9, 10, 11, 12, 13, 14]] = -np.inf  # most of one block
  p = np.exp(logits - logits[np.isfinite(logits)].max())
  p /= p.sum()
  n = 20000
  draw = jax.jit(sample.categorical_icdf)
  tokens = np.asarray(draw(jax.random.split(jax.random.key(3), n),
                           jnp.broadcast_to(jnp.asarray(logits), (n, vocab))))
  counts = np.bincount(tokens, minlength=vocab)
  assert counts[p == 0].sum() == 0
  allowed = p > 0
  obs, exp = counts[allowed], p[allowed] * n
  assert exp.min() >= 20  # chi-square needs populated cells
  df = len(obs) - 1
  critical = df + 6.0 * np.sqrt(2.0 * df)  # far beyond the 99.9% point (about df + 4 sqrt(2 df))
  assert float(((obs - exp) ** 2 / exp).sum()) < critical
  # ... and power: a uniform draw over the allowed tokens is rejected by the same statistic.
  flat = np.where(p > 0, 1.0, 0.0) / (p > 0).sum()
  exp_flat = flat[allowed] * n
  assert float(((obs - exp_flat) ** 2 / exp_flat).sum()) > 10 * critical


def test_left_pad_and_buckets():
  ids, mask = sample.left_pad([[1, 2], [3]], pad_id=0, length=4)
  np.testing.assert_array_equal(ids, [[0, 0, 1, 2], [0, 0, 0, 3]])
  np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 0, 0, 1]])
  assert [pow2_bucket(n) for n in (1, 16, 17, 100, 513)] == [16, 16, 32, 128, 768]
  assert [prompt_bucket(n) for n in (5, 17, 33, 47, 100)] == [16, 32, 48, 48, 112]
  with pytest.raises(InputError):
    sample.left_pad([[1, 2, 3]], 0, length=2)


def test_decode_config_validation():
  with pytest.raises(InputError, match="top_p"):
    DecodeConfig(top_p=0.0)
  with pytest.raises(InputError, match="max_new_tokens"):
    DecodeConfig(max_new_tokens=0)
  assert DecodeConfig(temperature=0.0).is_greedy


# ------------------------------------------------------------------------------------------------
# Steering


@pytest.mark.slow
def test_model_and_target_steering_reproduce_distributions(steer_model):
  ids, mask = sample.left_pad(PROMPTS, pad_id=0)
  sampler, state = _sampler(steer_model)
  exact = sampler.steering_distribution(state, ids, mask, STEER_IDS)
  np.testing.assert_allclose(exact, np.broadcast_to(STEER_P, (3, 4)), rtol=1e-5, atol=1e-6)

  kw = dict(rounds=2000, max_new_tokens=1, steering_ids=STEER_IDS, seed=0, batch_size=1000)
  out = generate(steer_model, PROMPTS[:2], steering="model", **kw)
  assert out.tokens.shape == (4000, 2)
  np.testing.assert_array_equal(out.tokens[:, 0], np.asarray(STEER_IDS)[out.steering_index])
  counts = np.bincount(out.steering_index, minlength=4)
  assert _chi2(counts, STEER_P) < CHI2_3DF_P1E3
  # The test has power: the same counts reject a slightly different distribution.
  assert _chi2(counts, [0.45, 0.3, 0.15, 0.1]) > CHI2_3DF_P1E6

  target = np.array([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])
  out = generate(steer_model, PROMPTS[:2], steering="target", target=target, **kw)
  for p in range(2):
    counts = np.bincount(out.steering_index[out.prompt_index == p], minlength=4)
    assert _chi2(counts, target[p]) < CHI2_3DF_P1E3
  assert _chi2(np.bincount(out.steering_index[out.prompt_index == 0], minlength=4),
               target[1]) > CHI2_3DF_P1E6


# ------------------------------------------------------------------------------------------------
# Decoding (shared shapes: 3 prompts -> a chunk of 4, prompt bucket 32, 2 rounds, 6 new tokens)

GREEDY = DecodeConfig(greedy=True, max_new_tokens=6)


@pytest.fixture(scope="module")
def greedy_out(model):
  return generate(model, PROMPTS, rounds=2, config=GREEDY, pad_id=0)


def test_greedy_with_cache_equals_full_forward_argmax(model, greedy_out):
  assert greedy_out.tokens.shape == (6, 6)
  np.testing.assert_array_equal(greedy_out.prompt_index, [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(greedy_out.round_index, [0, 1, 0, 1, 0, 1])
  refs = _greedy_reference(model, PROMPTS, 6)
  for p, ref in enumerate(refs):
    for r in range(2):  # every round shares the prompt's one prefill (mixed lengths, left-padded)
      assert greedy_out.tokens[2 * p + r].tolist() == ref


def test_top_k_one_equals_greedy(model, greedy_out):
  top1 = generate(model, PROMPTS, rounds=2, seed=5, pad_id=0,
                         config=DecodeConfig(top_k=1, max_new_tokens=6))
  np.testing.assert_array_equal(top1.tokens, greedy_out.tokens)


def test_steering_token_is_first_and_decoding_continues(model):
  out = generate(model, PROMPTS, rounds=2, config=GREEDY, steering="target",
                        steering_ids=STEER_IDS, target=[0, 0, 1, 0])
  assert out.tokens.shape == (6, 7)
  assert (out.tokens[:, 0] == STEER_IDS[2]).all() and (out.steering_index == 2).all()
  # After the steering token, greedy decoding continues from prompt + steering token.
  refs = _greedy_reference(model, [p + [STEER_IDS[2]] for p in PROMPTS], 6)
  for p, ref in enumerate(refs):
    assert out.tokens[2 * p, 1:].tolist() == ref


def test_steering_suffix_is_fed_not_sampled(model):
  """A steering token at the end of the user turn: the suffix (the end of the turn, a stop token
  among it, and the generation prompt) is fed after it, never sampled, never a stop, and left out
  of the samples; decoding continues from prompt + steering token + suffix."""
  suffix = [2, 40, 41]  # 2: a stop id
  out = generate(model, PROMPTS, rounds=2, config=GREEDY, steering="target", stop_ids=[2],
                 steering_ids=STEER_IDS, target=[0, 0, 1, 0], steering_suffix=suffix)
  assert out.tokens.shape == (6, 7) and (out.tokens[:, 0] == STEER_IDS[2]).all()
  refs = _greedy_reference(model, [p + [STEER_IDS[2]] + suffix for p in PROMPTS], 6)
  for p, ref in enumerate(refs):
    stop = ref.index(2) + 1 if 2 in ref else len(ref)
    assert out.tokens[2 * p, 1:1 + stop].tolist() == ref[:stop]
    assert out.num_tokens[2 * p] == 1 + stop


@pytest.fixture(scope="module")
def sampled(model):
  kw = dict(rounds=2, steering="model", steering_ids=STEER_IDS,
            config=DecodeConfig(top_p=0.95, max_new_tokens=6))
  return kw, generate(model, PROMPTS, seed=7, **kw)


def test_same_seed_same_samples(model, sampled):
  kw, a = sampled
  b = generate(model, PROMPTS, seed=7, **kw)
  c = generate(model, PROMPTS, seed=8, **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.steering_index, b.steering_index)
  assert not np.array_equal(a.tokens, c.tokens)


def test_left_padding_and_batching_do_not_change_samples(model, sampled):
  kw, batched = sampled  # prompt 0 padded to 32 in a chunk with longer prompts
  alone = generate(model, PROMPTS[:1], seed=7, **kw)  # padded to 16, alone
  np.testing.assert_array_equal(alone.tokens, batched.tokens[:2])
  np.testing.assert_array_equal(alone.steering_index, batched.steering_index[:2])
  assert not np.array_equal(batched.tokens[0], batched.tokens[1])  # rounds differ


def test_stop_tokens_end_rows(model, greedy_out):
  stop = int(greedy_out.tokens[0, 2])
  out = generate(model, PROMPTS, rounds=2, config=GREEDY, pad_id=0, stop_ids=[stop])
  for row_free, row, n in zip(greedy_out.tokens, out.tokens, out.num_tokens):
    hits = np.flatnonzero(row_free == stop)
    end = hits[0] + 1 if hits.size else 6
    assert n == end
    np.testing.assert_array_equal(row[:end], row_free[:end])
    assert (row[end:] == 0).all()
  assert out.num_tokens[0] == 3


def test_decoded_text_strips_steering_and_stop_token(model):

  class Tok:
    def decode(self, ids, skip_special_tokens=True):
      return ",".join(str(i) for i in ids)

  kw = dict(rounds=2, config=GREEDY, steering="target", target=[0, 0, 1, 0],
            steering_ids=STEER_IDS)
  free = generate(model, PROMPTS, **kw)
  stop = int(free.tokens[0, 3])
  out = generate(model, PROMPTS, stop_ids=[stop], tokenizer=Tok(), **kw)
  first = int(np.flatnonzero(free.tokens[0, 1:] == stop)[0]) + 1
  assert out.text[0] == ",".join(str(t) for t in free.tokens[0, 1:first])


def test_chunks_share_one_compiled_program(model, sampled):
  kw, batched = sampled
  sampler, _ = _sampler(model)
  before = sampler.compiled_programs
  # batch_size 2 with 2 rounds: one prompt per chunk, three chunks of the same shapes.
  chunked = generate(model, PROMPTS, seed=7, batch_size=2, **kw)
  assert sampler.compiled_programs == before + 1
  # a second model of the same architecture reuses the sampler's programs (weights are arguments)
  other = nnx.split(Llama(_config(), rngs=nnx.Rngs(5)))[1]
  sampler.generate(other, PROMPTS, seed=7, batch_size=2, **kw)
  assert sampler.compiled_programs == before + 1
  np.testing.assert_array_equal(chunked.tokens, batched.tokens)  # chunking changes no sample


def test_batched_text_decoding_equals_row_by_row():
  from distfair_jax.data.tokenizer import build_tiny_tokenizer
  tok = build_tiny_tokenizer()
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, len(tok), size=(50, 9)).astype(np.int32)
  num = rng.integers(1, 10, size=50).astype(np.int32)
  stops = [int(tokens[0, 2]), int(tok.eos_token_id)]
  samples = sample.Samples(tokens=tokens, num_tokens=num, steering_index=np.zeros(50, np.int32),
                           prompt_index=np.zeros(50, np.int32), round_index=np.zeros(50, np.int32))

  class RowByRow:  # the same tokenizer without its Rust backend: the row-by-row path
    def decode(self, ids, skip_special_tokens=True):
      return tok.decode(ids, skip_special_tokens=skip_special_tokens)

  for steered in (True, False):
    fast = sample.decode_text(tok, samples, steered=steered, stop_ids=stops)
    slow = sample.decode_text(RowByRow(), samples, steered=steered, stop_ids=stops)
    assert fast == slow and sum(t != "" for t in fast) > 25
  start = 1
  row = [int(t) for t in tokens[3, start:num[3]] if int(t) not in stops]
  assert sample.decode_text(tok, samples, steered=True, stop_ids=stops)[3] == tok.decode(
      row, skip_special_tokens=True)


def test_bad_arguments(model):
  with pytest.raises(InputError, match="steering_ids"):
    generate(model, PROMPTS, steering="model")
  with pytest.raises(InputError, match="target"):
    generate(model, PROMPTS, steering="target", steering_ids=STEER_IDS, target=[1, 0])
  with pytest.raises(InputError, match="steering"):
    generate(model, PROMPTS, steering="sometimes")
