"""Batched, jit-compiled sampling with a KV cache and two-stage steering: the ``Sampler``.

    sampler = Sampler(graphdef)                      # one per model architecture; compiles once
    out = sampler.generate(state, prompts, rounds=100, steering="model", steering_ids=ids, ...)
    q = sampler.steering_distribution(state, input_ids, attention_mask, steering_ids)

The sampler holds jit-compiled functions of ``(state, arrays)``; the weights are arguments, so one
sampler serves every model of the same architecture (the methods a benchmark compares) with one
compiled program per shape. The model object only appears inside the traced function
(``nnx.merge``). One call of ``generate`` works in chunks of prompts, each chunk ONE compiled
program and one dispatch; the host fetches the tokens once, after every chunk is queued:

1. **Prefill**: the distinct prompts of a chunk, left-padded to a common bucketed length
   (``tokenize.prompt_bucket``), go through ``model.prefill`` once, so every round of a prompt
   shares its single prefill. By default (``Sampler(shared_prefix=None)``: whenever a chunk holds
   several rounds per prompt and there is no mesh) the prompt cache is then kept ONCE per prompt
   (``llama.SharedPrefixCache``): the queries of all its rounds attend to it in one batched matmul,
   and the rounds' new tokens go to a small per-row cache that grows in segments
   (:func:`suffix_segments`). The plain path (``shared_prefix=False``, and always on a mesh) repeats
   the cache rows ``rounds`` times on the batch axis (:func:`repeat_cache`). The logits at the last
   prompt position are repeated ``rounds`` times either way.
2. **Steering**: ``model`` mode draws the steering token from the softmax over the K steering-token
   logits alone (renormalised, temperature 1) at the first assistant position; ``target`` mode draws it
   from a caller-given distribution; ``none`` skips it. The steering token is written as the first
   assistant token and decoding continues after it (where training put it).
3. **Decode**: a ``lax.while_loop`` over ``model.decode_step``, with temperature / top-k / top-p /
   greedy, a per-row stop at end-of-turn or EOS ids, and an early exit once every row has stopped.
   The loop carries the logits of the next token (iteration t draws token t, then runs the model on
   it), so the output matmul is never fused with the sampler's reductions over the vocabulary
   (XLA:CPU's fused kernel ran at half the matmul's speed). Top-k / top-p filtering (a sort) is
   compiled in only when ``top_k > 0`` or ``top_p < 1``.
   Tokens are drawn by inverting the cumulative distribution with one uniform number per row and step
   (:func:`categorical_icdf`), not by Gumbel-max, whose V random numbers per row cost more than the
   model itself on CPU.

Randomness is per sample: the key of sample (prompt p, round r) is ``fold_in(fold_in(key(seed), p), r)``
and step t uses ``fold_in(row_key, t)``, so a sample does not depend on the chunking, the batch it shares,
or its padding: the same seed gives the same samples on every run.

Shapes: ``input_ids, attention_mask: [B, L]`` (left-padded, 1 = real token), ``steering_ids: [K]``,
``target: [K]`` or ``[B, K]``; outputs ``tokens: [N, T]`` with ``N = B * rounds`` rows in prompt-major
order (row ``p * rounds + r``), ``T = max_new_tokens + 1`` when steered (column 0 holds the steering
token) and ``max_new_tokens`` otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distfair_jax import distributed
from distfair_jax import losses
from distfair_jax import sharding as shd
from distfair_jax.config import DecodeConfig, Steering
from distfair_jax.data.tokenize import next_pow2, prompt_bucket
from distfair_jax.errors import InputError
from distfair_jax.model.cache import SharedPrefixCache

__all__ = ["Sampler", "Samples", "STEERING_MODES", "left_pad", "filter_logits", "categorical_icdf",
           "sample_logits", "repeat_cache", "suffix_segments", "decode_text"]

STEERING_MODES = tuple(m.value for m in Steering)


@dataclasses.dataclass
class Samples:
  """Output of :meth:`Sampler.generate`; rows in prompt-major order (row ``p * rounds + r``).

  tokens: [N, T] int32 generated ids (column 0 = steering token when steered; ``pad_id`` after a stop).
  num_tokens: [N] int32 tokens generated per row, including the steering and the stop token.
  steering_index: [N] int32 index into ``steering_ids`` of the steering token, -1 when not steered.
  prompt_index, round_index: [N] int32.
  text: decoded continuation per row, steering token and stop token stripped (None without tokenizer).
  """
  tokens: np.ndarray
  num_tokens: np.ndarray
  steering_index: np.ndarray
  prompt_index: np.ndarray
  round_index: np.ndarray
  text: list[str] | None = None


# --------------------------------------------------------------------------------------------------
# Host-side helpers.


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int,
             length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token-id lists. Returns ``input_ids, attention_mask: [B, length]`` int32."""
  if not prompts:
    raise InputError("prompts: expected at least one prompt, got none")
  longest = max(len(p) for p in prompts)
  if min(len(p) for p in prompts) == 0:
    raise InputError("prompts: expected non-empty token lists, got an empty prompt")
  length = longest if length is None else length
  if longest > length:
    raise InputError(f"prompts: expected at most {length} tokens, got {longest}")
  ids = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    ids[i, length - len(p):] = np.asarray(p, np.int32)
    mask[i, length - len(p):] = 1
  return ids, mask


def _sample_keys(key, prompt_index, round_index):
  """Typed PRNG keys ``[N]``: ``fold_in(fold_in(key, prompt), round)`` per sample (traced inside
  ``_sample_chunk``)."""
  return jax.vmap(lambda p, r: jax.random.fold_in(jax.random.fold_in(key, p), r))(
      prompt_index, round_index)


# --------------------------------------------------------------------------------------------------
# Pure pieces (traced inside the sampler's programs).


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Top-k then top-p (nucleus) filtering; removed entries become -inf.

  logits: [N, V] float32; top_k: [] int (0 = off); top_p: [] float (1.0 = off). Top-p keeps the
  smallest set of most likely tokens (within the top k, renormalised) whose probability reaches top_p.
  """
  vocab = logits.shape[-1]
  ordered = -jnp.sort(-logits, axis=-1)  # [N, V] descending
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  rank = jnp.arange(vocab)
  ordered = jnp.where(rank[None, :] < k, ordered, -jnp.inf)
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  keep = (before < top_p) & (rank[None, :] < k)
  n_keep = jnp.maximum(keep.sum(-1), 1)  # [N]
  threshold = jnp.take_along_axis(ordered, (n_keep - 1)[:, None], axis=-1)  # [N, 1]
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def _first_reaching(cdf: jax.Array, x: jax.Array, positive: jax.Array) -> jax.Array:
  """Index of the first entry with ``cdf >= x`` among the positive ones, per row.

  cdf, positive: [N, M]; x: [N] -> [N] int32. When rounding leaves no hit (x just above the last
  cumulative value), the last positive entry: an entry of zero weight is never returned.
  """
  hit = (cdf >= x[:, None]) & positive
  last = cdf.shape[-1] - 1 - jnp.argmax(positive[:, ::-1], axis=-1)
  return jnp.where(hit.any(axis=-1), jnp.argmax(hit, axis=-1), last).astype(jnp.int32)


def categorical_icdf(keys: jax.Array, logits: jax.Array) -> jax.Array:
  """One draw per row from ``softmax(logits)`` by inversion, with ONE uniform number per row.

  logits: [N, V] float32 (-inf = excluded); keys: [N] typed keys -> [N] int32.
  Same distribution as ``jax.random.categorical`` (Gumbel-max), which draws V random numbers per row:
  on CPU, generating those cost more than the whole decode step of a small model. The inversion is
  two-level (blocks of ~sqrt(V) tokens: pick the block from the block sums, then the token inside it)
  so that no cumulative sum over the whole vocabulary is needed. A token of probability 0 is never
  drawn, whatever the rounding.
  """
  n, vocab = logits.shape
  width = 1 << (((vocab - 1).bit_length() + 1) // 2)  # power of two ~ sqrt(V)
  blocks = -(-vocab // width)
  u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)  # [N] in [0, 1)
  probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # unnormalised, [N, V]
  probs = jnp.pad(probs, ((0, 0), (0, blocks * width - vocab))).reshape(n, blocks, width)
  block_sum = probs.sum(axis=-1)  # [N, blocks]
  block_cdf = jnp.cumsum(block_sum, axis=-1)
  x = u * block_cdf[:, -1]
  b = _first_reaching(block_cdf, x, block_sum > 0)  # [N]
  take = lambda a: jnp.take_along_axis(a, b[:, None], axis=1)[:, 0]
  x_inner = x - (take(block_cdf) - take(block_sum))  # mass before block b
  inner = jnp.take_along_axis(probs, b[:, None, None], axis=1)[:, 0]  # [N, width]
  j = _first_reaching(jnp.cumsum(inner, axis=-1), x_inner, inner > 0)
  return b * width + j


def sample_logits(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array, *, greedy: bool, filtering: bool) -> jax.Array:
  """One token per row. logits: [N, V] float32; keys: [N] typed keys -> [N] int32."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if filtering:
    logits = filter_logits(logits, top_k, top_p)
  return categorical_icdf(keys, logits)


def repeat_cache(model, cache, batch: int, rounds: int, cache_length: int):
  """Repeats each cache row ``rounds`` times on its batch axis: rows ``[B] -> [B * rounds]``.

  The batch axis of each leaf is found by comparing ``init_cache(B)`` with ``init_cache(2B)`` shapes,
  so any cache layout works (leaves without a batch axis, e.g. a shared write index, stay as they are).
  """
  if rounds == 1:
    return cache
  one = jax.eval_shape(lambda: model.init_cache(batch, cache_length))
  two = jax.eval_shape(lambda: model.init_cache(2 * batch, cache_length))

  def axis_of(a, b):
    diff = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
    return diff[0] if diff else None

  axes = jax.tree.map(axis_of, one, two)
  leaves, treedef = jax.tree.flatten(cache)
  axis_leaves = treedef.flatten_up_to(axes)
  out = [x if ax is None else jnp.repeat(x, rounds, axis=ax) for x, ax in zip(leaves, axis_leaves)]
  return jax.tree.unflatten(treedef, out)


def _last_logits(model, hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Logits at each row's last real token. hidden: [B, L, D] -> [B, V] float32."""
  length = attention_mask.shape[1]
  last = length - 1 - jnp.argmax(attention_mask[:, ::-1] > 0, axis=1)  # [B]
  h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)  # [B, 1, D]
  return model.logits(h)[:, 0].astype(jnp.float32)


def _prefill_rows(model, input_ids, attention_mask, rounds: int, cache_length: int):
  """input_ids, attention_mask: [P, L] left-padded -> (logits [P*rounds, V] f32, cache of P*rounds).

  Each prompt is prefilled once; its cache rows and last-position logits are then repeated
  ``rounds`` times (adjacent rows) for the rounds to decode from.
  """
  batch = input_ids.shape[0]
  cache = model.init_cache(batch, cache_length)
  hidden, cache = model.prefill(input_ids, attention_mask, cache)
  logits = _last_logits(model, hidden, attention_mask)
  cache = repeat_cache(model, cache, batch, rounds, cache_length)
  return jnp.repeat(logits, rounds, axis=0), cache


def _prefill_shared(model, input_ids, attention_mask, rounds: int, new_length: int):
  """input_ids, attention_mask: [P, L] left-padded -> (logits [P*rounds, V] f32, a
  ``SharedPrefixCache``: each prompt's L slots kept once, ``new_length`` slots per row for the
  rounds' new tokens). Nothing of size L is repeated."""
  batch, length = input_ids.shape
  cache = model.init_cache(batch, length)
  hidden, cache = model.prefill(input_ids, attention_mask, cache)
  logits = _last_logits(model, hidden, attention_mask)
  return jnp.repeat(logits, rounds, axis=0), model.shared_prefix_cache(cache, rounds, new_length)


def suffix_segments(new_slots: int, first: int = 32) -> list[int]:
  """Per-row cache lengths of the decode loop's segments with a shared prefix: ``first``, doubling,
  capped at ``new_slots`` (96 -> [32, 64, 96]; 16 -> [16]). Each segment's loop attends over its
  own length only, so early steps do not read the empty slots of later ones (the rows' new-token
  cache is the part of a step that every row reads in full)."""
  lengths = [min(first, new_slots)]
  while lengths[-1] < new_slots:
    lengths.append(min(2 * lengths[-1], new_slots))
  return lengths


def _decode_rows(model, cache, first_logits, keys, steering_ids, target_probs, stop_ids,
                 suffix, temperature, top_k, top_p, pad_id, *, mode: str, max_new_tokens: int,
                 greedy: bool, filtering: bool):
  """Steering + decode loop (traced inside a jit).

  first_logits: [N, V] f32 (last prompt position); keys: [N] typed keys; steering_ids: [K] int32;
  target_probs: [N, K] f32 (used in ``target`` mode); stop_ids: [S] int32; suffix: [F] int32,
  the tokens forced after the steering token (F = 0: none; a steering token at the end of the
  user turn is followed by the end of that turn and the generation prompt), never a stop.
  Returns tokens [N, T] int32 and the steering index [N] int32 (-1 when not steered).
  """
  rows = first_logits.shape[0]
  steered = mode != "none"
  forced = suffix.shape[0] if steered else 0
  # The loop body merges its own model: a scanned model (``scan_layers``) cannot run
  # ``nnx.scan`` on Variables created at the enclosing trace level.
  graphdef, state = nnx.split(model)
  total = max_new_tokens + (1 + forced if steered else 0)
  tokens = jnp.full((rows, total), pad_id, jnp.int32)
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p,
                             greedy=greedy, filtering=filtering)

  def step_keys(t):
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, t)

  if steered:
    if mode == "model":
      steer_logits = first_logits[:, steering_ids]  # [N, K], temperature 1, renormalised
    else:
      steer_logits = jnp.log(target_probs)
    steer_idx = jax.vmap(jax.random.categorical)(step_keys(0), steer_logits).astype(jnp.int32)
    first = steering_ids[steer_idx]
    done = jnp.zeros((rows,), bool)
  else:
    steer_idx = jnp.full((rows,), -1, jnp.int32)
    first = sample(first_logits, step_keys(0))
    done = jnp.isin(first, stop_ids)

  def pick(t, logits, tokens, done):
    """Token t of every row (the first token at t = 0; pad after a stop), written to tokens."""
    drawn = jnp.where(done, pad_id, sample(logits, step_keys(t)))
    tok = jnp.where(t == 0, first, drawn)
    if forced:
      tok = jnp.where((t >= 1) & (t <= forced), suffix[jnp.clip(t - 1, 0, forced - 1)], tok)
    tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, t))
    return tok, tokens, done | (jnp.isin(tok, stop_ids) & (t > forced))

  # The loop carries the logits of the token it draws next: iteration t draws token t, then runs
  # the model on it for the logits of token t + 1. The [N, V] logits thus leave each iteration in
  # memory; computed and consumed in one iteration instead, XLA:CPU fused the output matmul with the
  # sampler's max / exp over the vocabulary into one kernel that ran at half the matmul's speed.
  def body(carry):
    t, logits, cache, tokens, done = carry
    tok, tokens, done = pick(t, logits, tokens, done)
    step_model = nnx.merge(graphdef, state, copy=True)
    hidden, cache = step_model.decode_step(tok[:, None], cache)
    logits = step_model.logits(hidden)[:, 0].astype(jnp.float32)
    return t + 1, logits, cache, tokens, done

  # Token t goes to new slot t: a segment of n slots runs while t < n (the last token, total - 1,
  # is drawn after the loop and never fed).
  last = total - 1
  if isinstance(cache, SharedPrefixCache):
    segments = [(min(n, last), n) for n in suffix_segments(max(last, 1))]
  else:
    segments = [(last, None)]
  carry = (jnp.asarray(0, jnp.int32), first_logits, cache, tokens, done)
  for end, slots in segments:
    t, logits, cache, tokens, done = carry
    cache = cache if slots is None else cache.grow(slots)
    carry = jax.lax.while_loop(lambda c, end=end: (c[0] < end) & ~jnp.all(c[4]), body,
                               (t, logits, cache, tokens, done))
  t, logits, _, tokens, done = carry
  _, tokens, _ = pick(t, logits, tokens, done)
  return tokens, steer_idx


def _sample_chunk(graphdef, state, input_ids, attention_mask, seed, first_prompt, first_round,
                  steering_ids, target_probs, stop_ids, suffix, temperature, top_k, top_p, pad_id,
                  *,
                  rounds: int, cache_length: int, mode: str, max_new_tokens: int, greedy: bool,
                  filtering: bool, shared_prefix: bool):
  """One chunk, one compiled program: prefill, rounds, per-sample keys, steering and decode loop.

  ``shared_prefix``: decode from a ``SharedPrefixCache`` (each prompt's cache once, the rounds'
  new tokens per row) instead of a plain cache with every prompt slot repeated ``rounds`` times.

  input_ids, attention_mask: [P, L] (prompts first_prompt .. first_prompt + P - 1, left-padded);
  seed: [] int32; first_prompt, first_round: [] int32; target_probs: [P, K] f32; suffix: [F]
  int32 forced after the steering token.
  Returns tokens [P*rounds, T] int32 and steering index [P*rounds] int32, row p * rounds + r holding
  round first_round + r of prompt first_prompt + p.
  """
  model = nnx.merge(graphdef, state)
  batch, length = input_ids.shape
  if shared_prefix:
    logits, cache = _prefill_shared(model, input_ids, attention_mask, rounds,
                                    suffix_segments(max(cache_length - length - 1, 1))[0])
  else:
    logits, cache = _prefill_rows(model, input_ids, attention_mask, rounds, cache_length)
  p_idx = first_prompt + jnp.repeat(jnp.arange(batch, dtype=jnp.int32), rounds)
  r_idx = first_round + jnp.tile(jnp.arange(rounds, dtype=jnp.int32), batch)
  keys = _sample_keys(jax.random.key(seed), p_idx, r_idx)
  # The rows (prompts x rounds) split over the mesh's batch axes, when there is a mesh: each
  # device decodes its share (no-ops without one, or when the rows do not divide).
  rows = lambda x: shd.constrain(x, ("batch",) + (None,) * (x.ndim - 1))
  logits, keys = rows(logits), rows(keys)
  if not shared_prefix:  # (the shared-prefix path runs without a mesh)
    cache = jax.tree.map(lambda x, axes: shd.constrain(x, tuple(axes)), cache, cache.logical_axes(),
                         is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  return _decode_rows(model, cache, logits, keys, steering_ids,
                      rows(jnp.repeat(target_probs, rounds, axis=0)), stop_ids, suffix, temperature,
                      top_k, top_p, pad_id, mode=mode, max_new_tokens=max_new_tokens, greedy=greedy,
                      filtering=filtering)


def _steering_distribution(graphdef, state, input_ids, attention_mask, steering_ids):
  model = nnx.merge(graphdef, state)
  hidden = model(input_ids, attention_mask)
  logits = _last_logits(model, hidden, attention_mask)[:, steering_ids]  # [B, K]
  return jax.nn.softmax(logits, axis=-1)


def _label_logps(graphdef, state, input_ids, attention_mask, labels, label_mask):
  """Sequence log-probs [B]: the sum over positions of log p(labels[:, t] | tokens <= t), from
  token tiles (never the [B, L, V] float32 logits), soft-capped as the model's logits are."""
  model = nnx.merge(graphdef, state)
  hidden = model(input_ids, attention_mask)
  tok = losses.token_logps_from_hidden(hidden, model.unembedding(), labels, label_mask,
                                       softcap=model.logit_softcap)
  return jnp.sum(tok, axis=-1)


def _prefill(graphdef, state, input_ids, attention_mask, *, rounds: int, cache_length: int):
  return _prefill_rows(nnx.merge(graphdef, state), input_ids, attention_mask, rounds, cache_length)


def _plan(num_prompts: int, rounds: int, batch_size: int) -> tuple[int, int]:
  """(prompts per call, rounds per call): about ``batch_size`` rows per call, padded shapes."""
  if rounds >= batch_size:
    return 1, batch_size
  per_call = max(batch_size // rounds, 1)
  return min(per_call, next_pow2(num_prompts)), rounds


def _steering_inputs(steering: str, steering_ids, target, num_prompts: int):
  """-> (steering ids [K] int32, target probabilities [P, K] float32), checked."""
  if steering not in STEERING_MODES:
    raise InputError(f"sampling: steering: expected one of {', '.join(STEERING_MODES)}, "
                     f"got {steering!r}")
  if steering != "none":
    if steering_ids is None or len(steering_ids) == 0:
      raise InputError(f"sampling: steering_ids: expected the K steering token ids for "
                       f"steering={steering!r}, got none")
    steer = np.asarray(steering_ids, np.int32)
  else:
    steer = np.zeros((1,), np.int32)
  k = steer.shape[0]
  if steering != "target":
    return steer, np.full((num_prompts, k), 1.0 / k, np.float32)
  if target is None:
    raise InputError("sampling: target: expected a [K] or [B, K] distribution for "
                     "steering='target', got none")
  probs = np.asarray(target, np.float32)
  if probs.shape == (k,):
    probs = np.broadcast_to(probs, (num_prompts, k))
  if (probs.shape != (num_prompts, k) or not np.all(np.isfinite(probs)) or np.any(probs < 0)
      or np.any(probs.sum(-1) <= 0)):
    raise InputError(f"sampling: target: expected non-negative weights of shape [{k}] or "
                     f"[{num_prompts}, {k}], got shape {list(np.shape(target))}")
  return steer, probs / probs.sum(-1, keepdims=True)


def _gather(pending, num_prompts: int, rounds: int):
  """The real (prompt, round) rows of every chunk, in prompt-major order."""
  p_all, r_all, t_all, s_all = [], [], [], []
  for p_idx, r_idx, tokens, steer_idx in pending:
    keep = (p_idx < num_prompts) & (r_idx < rounds)
    p_all.append(p_idx[keep])
    r_all.append(r_idx[keep])
    t_all.append(np.asarray(tokens)[keep])
    s_all.append(np.asarray(steer_idx)[keep])
  p_all, r_all = np.concatenate(p_all), np.concatenate(r_all)
  order = np.lexsort((r_all, p_all))
  return (np.concatenate(t_all)[order], np.concatenate(s_all)[order].astype(np.int32),
          p_all[order].astype(np.int32), r_all[order].astype(np.int32))


class Sampler:
  """Sampling programs of one model architecture (``graphdef`` from ``nnx.split``), each compiled
  once per shape; ``state`` (the weights) is an argument of every call.

  mesh: optional device mesh (every device of every process, e.g. ``{"data": -1}``): each chunk's
  rows are then split over its batch axes, and the results gathered to every process (multi-host
  evaluation: every process calls with the same arguments). ``state`` must live on that mesh.

  shared_prefix: how ``generate`` decodes the rounds of a prompt. ``None`` (the default) picks
  shared-prefix decoding whenever a chunk holds more than one round per prompt and there is no
  mesh; ``True`` asks for it (still only without a mesh), ``False`` keeps the plain path. Shared
  prefix: each prompt's prefilled cache is kept once ([P, kv_heads, L, head_dim]) and the queries of
  all its rounds attend to it in one batched matmul, while the rounds' new tokens go to a small
  per-row cache ([P * rounds, kv_heads, new tokens, head_dim]); one softmax over both parts
  (``llama.Attention._attend_shared``). Plain: the prompt cache rows are repeated ``rounds`` times
  (``repeat_cache``) and every row attends over its own copy. Same samples up to float summation
  order (the attention output is summed in two parts); every model of the family (Llama, Qwen2,
  Gemma 2 with its soft-caps and sliding windows, ``scan_layers`` or not) supports both. A sharded
  mesh always uses the plain path: the shared prompt part has P rows, not the N rows that the
  mesh's batch axes split.
  """

  _STATIC = ("rounds", "cache_length", "mode", "max_new_tokens", "greedy", "filtering",
             "shared_prefix")

  def __init__(self, graphdef, mesh=None, shared_prefix: bool | None = None):
    self.graphdef = graphdef
    self.mesh = mesh
    self.shared_prefix = shared_prefix
    self._chunk = jax.jit(functools.partial(_sample_chunk, graphdef), static_argnames=self._STATIC)
    self._steer = jax.jit(functools.partial(_steering_distribution, graphdef))
    self._label_logps = jax.jit(functools.partial(_label_logps, graphdef))
    self.prefill = jax.jit(functools.partial(_prefill, graphdef),
                           static_argnames=("rounds", "cache_length"))

  @classmethod
  def of(cls, model: nnx.Module, mesh=None,
         shared_prefix: bool | None = None) -> tuple[Sampler, Any]:
    """A sampler for ``model``'s architecture and ``model``'s state."""
    graphdef, state = nnx.split(model)
    return cls(graphdef, mesh, shared_prefix), state

  def uses_shared_prefix(self, rounds_per_call: int) -> bool:
    """Whether chunks of ``rounds_per_call`` rounds per prompt decode with a shared prefix."""
    if self.mesh is not None or self.shared_prefix is False:
      return False
    return bool(self.shared_prefix) or rounds_per_call > 1

  def _call(self, fn, *args, **kwargs):
    """``fn`` under the mesh (its inputs replicated on it), or plainly without one."""
    if self.mesh is None:
      return fn(*args, **kwargs)
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    devices = set(self.mesh.devices.flat)
    on_mesh = lambda x: isinstance(x, jax.Array) and x.sharding.device_set == devices
    # Host inputs replicated on the mesh (each process places its own devices' copies); arrays
    # already there (the weights) kept as they are.
    place = lambda x: jax.make_array_from_callback(np.shape(x), replicated,
                                                   lambda index: np.asarray(x)[index])
    args = jax.tree.map(lambda x: x if on_mesh(x) else place(x), args)
    with jax.set_mesh(self.mesh):
      return fn(*args, **kwargs)

  @property
  def compiled_programs(self) -> int:
    """How many sampling programs have been compiled (one per chunk shape and mode)."""
    return self._chunk._cache_size()  # noqa: SLF001

  def steering_distribution(self, state, input_ids, attention_mask, steering_ids) -> np.ndarray:
    """Exact steering-token distribution at the first assistant position, from one forward pass.

    input_ids, attention_mask: [B, L] (left or right padding; the last real token of each row is
    used); steering_ids: [K]. Returns [B, K] float32: softmax over the K steering-token logits
    alone (renormalised, temperature 1): exactly what ``model`` steering samples from.
    """
    out = self._call(self._steer, state, np.asarray(input_ids, np.int32),
                     np.asarray(attention_mask, np.int32), np.asarray(steering_ids, np.int32))
    return distributed.gather(out)

  def label_logps(self, state, input_ids, attention_mask, labels, label_mask) -> np.ndarray:
    """Exact log-probabilities of given continuations, from one forward pass.

    input_ids, attention_mask: [B, L] right-padded rows; labels: [B, L] (``labels[:, t]`` is the
    token after position t); label_mask: [B, L] float, 1 where a label counts. Returns [B]
    float32: the sum of the counted labels' log-probabilities.
    """
    out = self._call(self._label_logps, state, np.asarray(input_ids, np.int32),
                     np.asarray(attention_mask, np.int32), np.asarray(labels, np.int32),
                     np.asarray(label_mask, np.float32))
    return distributed.gather(out)

  def generate(self, state, prompts: Sequence[Sequence[int]], *, rounds: int = 1,
               config: DecodeConfig = DecodeConfig(), max_new_tokens: int | None = None,
               steering: str = "none", steering_ids: Sequence[int] | None = None, target: Any = None,
               stop_ids: Sequence[int] = (), pad_id: int = 0, seed: int = 0, batch_size: int = 256,
               tokenizer=None, steering_suffix: Sequence[int] = ()) -> Samples:
    """Samples ``rounds`` continuations of each prompt.

    prompts: token-id lists (chat template applied, generation prompt included); they are
    left-padded to one bucketed length. ``max_new_tokens`` overrides ``config.max_new_tokens`` (the
    steering token is not counted). ``steering``: ``model`` | ``target`` | ``none``;
    ``steering_ids``: [K] (needed unless ``none``); ``target``: [K] or [len(prompts), K]
    probabilities (``target`` mode). ``batch_size``: about how many rows are decoded together.
    ``tokenizer`` (optional) decodes ``Samples.text``. ``steering_suffix``: tokens fed after the
    steering token, not sampled and left out of the samples (a steering token at the end of the
    user turn: ``prompts`` end with the question, the suffix ends the turn and opens the answer;
    ``Encoder.steering_suffix``).
    """
    if not isinstance(rounds, int) or rounds < 1:
      raise InputError(f"sampling: rounds: expected an integer >= 1, got {rounds!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
      raise InputError(f"sampling: batch_size: expected an integer >= 1, got {batch_size!r}")
    max_new = config.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
    if max_new < 1:
      raise InputError(f"sampling: max_new_tokens: expected an integer >= 1, got {max_new}")
    num_prompts = len(prompts)
    steer, probs = _steering_inputs(steering, steering_ids, target, num_prompts)
    length = prompt_bucket(max(len(p) for p in prompts)) if prompts else 0
    ids, mask = left_pad(prompts, pad_id, length)
    stops = np.asarray(sorted(set(int(s) for s in stop_ids)) or [-1], np.int32)
    greedy = config.is_greedy
    suffix = np.asarray(list(steering_suffix) if steering != "none" else [], np.int32)
    static = dict(cache_length=length + max_new + (1 + len(suffix) if steering != "none" else 0),
                  mode=str(steering), max_new_tokens=max_new, greedy=greedy,
                  filtering=(config.top_k > 0 or config.top_p < 1.0) and not greedy)
    scalars = (np.float32(config.temperature if config.temperature > 0 else 1.0),
               np.int32(config.top_k), np.float32(config.top_p), np.int32(pad_id))
    per_call, rounds_per_call = _plan(num_prompts, rounds, batch_size)
    static["shared_prefix"] = self.uses_shared_prefix(rounds_per_call)
    seed_arr = np.int32(seed)
    pending = []
    for start in range(0, num_prompts, per_call):
      for round0 in range(0, -(-rounds // rounds_per_call) * rounds_per_call, rounds_per_call):
        idx = np.minimum(np.arange(start, start + per_call), num_prompts - 1)  # pad the chunk
        tokens, steer_idx = self._call(
            self._chunk, state, ids[idx], mask[idx], seed_arr, np.int32(start), np.int32(round0),
            steer, probs[idx], stops, suffix, *scalars, rounds=rounds_per_call, **static)
        pending.append((np.repeat(np.arange(start, start + per_call), rounds_per_call),
                        np.tile(np.arange(round0, round0 + rounds_per_call), per_call), tokens,
                        steer_idx))
    pending = [(p, r, *distributed.gather((t, i))) for p, r, t, i in pending]
    tokens, steer_index, p_idx, r_idx = _gather(pending, num_prompts, rounds)
    if len(suffix):  # the forced tokens are the prompt's, not the sample's
      tokens = np.concatenate([tokens[:, :1], tokens[:, 1 + len(suffix):]], axis=1)
    is_stop = np.isin(tokens, stops)
    if steering != "none":
      is_stop[:, 0] = False
    num_tokens = np.where(is_stop.any(axis=1), np.argmax(is_stop, axis=1) + 1,
                          tokens.shape[1]).astype(np.int32)
    out = Samples(tokens=tokens, num_tokens=num_tokens, steering_index=steer_index,
                  prompt_index=p_idx, round_index=r_idx)
    if tokenizer is not None:
      out.text = decode_text(tokenizer, out, steered=steering != "none", stop_ids=stops)
    return out


def decode_text(tokenizer, samples: Samples, *, steered: bool,
                stop_ids: Sequence[int]) -> list[str]:
  """Decoded continuation per row, without the steering token (column 0 when steered) or stop token.

  A Hugging Face fast tokenizer without clean-up of spaces decodes all rows in one call of its Rust
  backend (``decode_batch``, what ``tokenizer.decode`` runs row by row); other tokenizers, row by row.
  """
  tokens = np.asarray(samples.tokens)
  col = np.arange(tokens.shape[1])[None, :]
  keep = ((col >= (1 if steered else 0)) & (col < np.asarray(samples.num_tokens)[:, None])
          & ~np.isin(tokens, np.asarray(list(stop_ids), np.int64)))
  rows = [row[k].tolist() for row, k in zip(tokens, keep)]
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if (hasattr(backend, "decode_batch") and hasattr(tokenizer, "clean_up_tokenization_spaces")
      and not tokenizer.clean_up_tokenization_spaces):
    return list(backend.decode_batch(rows, skip_special_tokens=True))
  return [tokenizer.decode(ids, skip_special_tokens=True) for ids in rows]
