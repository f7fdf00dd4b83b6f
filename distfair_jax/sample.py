"""Batched, jit-compiled sampling with a KV cache and two-stage steering.

The core is pure: jit-compiled functions of ``(graphdef, state)`` from ``nnx.split`` plus arrays; the
model object only appears at the edges (``nnx.merge`` inside the traced function). One call of
:func:`generate` works in chunks of prompts, each chunk ONE compiled program (``_sample_chunk``, one
jit per prompts x rounds x prompt length x cache length x mode x max new tokens) and one dispatch; the
host fetches the tokens once, after every chunk is queued:

1. **Prefill**: the distinct prompts of a chunk, left-padded to a common bucketed length, go through
   ``model.prefill`` once; the cache rows and the logits at the last prompt position are then repeated
   ``rounds`` times on the batch axis, so every round of a prompt shares its single prefill.
2. **Steering**: ``model`` mode draws the steering token from the softmax over the K steering-token
   logits alone (renormalised, temperature 1) at the first assistant position; ``target`` mode draws it
   from a caller-given distribution; ``none`` skips it. The steering token is written as the first
   assistant token and decoding continues after it (where training put it).
3. **Decode**: a ``lax.while_loop`` over ``model.decode_step``, with temperature / top-k / top-p /
   greedy, a per-row stop at end-of-turn or EOS ids, and an early exit once every row has stopped.
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
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distfair_jax.errors import InputError

STEERING_MODES = ("model", "target", "none")

# Token strings that end an assistant turn in the chat templates we support (Llama 3, Qwen 2, tiny).
_STOP_TOKEN_STRINGS = ("<|eot_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "</s>")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """One decoding configuration, shared by every method compared (recorded in the outputs).

  ``temperature`` 0 or ``greedy`` means argmax decoding. ``top_k`` 0 and ``top_p`` 1.0 disable those
  filters. ``max_new_tokens`` bounds attribute answers (v1, v2); ``story_max_new_tokens`` bounds stories
  (v3). Neither counts the steering token.
  """
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  greedy: bool = False
  max_new_tokens: int = 16
  story_max_new_tokens: int = 96

  def __post_init__(self):
    checks = [
        ("temperature", self.temperature >= 0 and math.isfinite(self.temperature), "a number >= 0"),
        ("top_p", 0.0 < self.top_p <= 1.0, "a number in (0, 1]"),
        ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
        ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
         "an integer >= 1"),
        ("story_max_new_tokens",
         isinstance(self.story_max_new_tokens, int) and self.story_max_new_tokens >= 1,
         "an integer >= 1"),
    ]
    for name, ok, expected in checks:
      if not ok:
        raise InputError(f"decode config: {name}: expected {expected}, got {getattr(self, name)!r}")

  @property
  def is_greedy(self) -> bool:
    return self.greedy or self.temperature == 0

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class Samples:
  """Output of :func:`generate`; rows in prompt-major order (row ``p * rounds + r``).

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
# Edges: model object <-> (graphdef, state); static graphdef for jit.


class _ByIdentity:
  """Hashable-by-identity wrapper for a graphdef whose static attributes are not hashable."""

  def __init__(self, value):
    self.value = value

  def __hash__(self):
    return id(self.value)

  def __eq__(self, other):
    return isinstance(other, _ByIdentity) and other.value is self.value


def split_model(model_or_graph_state) -> tuple[Any, Any]:
  """``nnx.Module`` or ``(graphdef, state)`` -> ``(graphdef, state)``."""
  if isinstance(model_or_graph_state, nnx.Module):
    return nnx.split(model_or_graph_state)
  if isinstance(model_or_graph_state, (tuple, list)) and len(model_or_graph_state) == 2:
    return tuple(model_or_graph_state)
  raise TypeError(f"expected an nnx.Module or a (graphdef, state) pair, got "
                  f"{type(model_or_graph_state).__name__}")


def _static(graphdef):
  try:
    hash(graphdef)
    return graphdef
  except TypeError:
    return _ByIdentity(graphdef)


def _merge(static_graphdef, state):
  graphdef = static_graphdef.value if isinstance(static_graphdef, _ByIdentity) else static_graphdef
  return nnx.merge(graphdef, state)


# --------------------------------------------------------------------------------------------------
# Host-side helpers: padding, bucketing, keys, tokenizer ids.


def bucket_length(n: int, minimum: int = 16) -> int:
  """Padded length for a prompt of ``n`` tokens: powers of two up to 512, then multiples of 256."""
  n = max(int(n), 1, minimum)
  if n <= 512:
    return 1 << (n - 1).bit_length()
  return -(-n // 256) * 256


def _prompt_bucket(n: int) -> int:
  """Padded prompt length for the sampler: ``bucket_length`` but multiples of 16 above 32 (every
  padded slot is read again by each decode step of each round, so coarse buckets cost decode time)."""
  return min(bucket_length(n), -(-max(int(n), 1) // 16) * 16) if n > 32 else bucket_length(n)


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


def stop_token_ids(tokenizer) -> list[int]:
  """End-of-turn and EOS ids of a Hugging Face tokenizer (those that exist in its vocabulary)."""
  ids = set()
  eos = getattr(tokenizer, "eos_token_id", None)
  if isinstance(eos, int):
    ids.add(eos)
  elif isinstance(eos, (list, tuple)):
    ids.update(int(e) for e in eos)
  vocab = tokenizer.get_vocab()
  for tok in _STOP_TOKEN_STRINGS:
    if tok in vocab:
      ids.add(int(vocab[tok]))
  return sorted(ids)


def pad_token_id(tokenizer) -> int:
  """The tokenizer's pad id, else its EOS id, else 0."""
  for name in ("pad_token_id", "eos_token_id"):
    value = getattr(tokenizer, name, None)
    if isinstance(value, int):
      return value
  return 0


def encode_prompts(tokenizer, questions: Sequence[str]) -> list[list[int]]:
  """Chat-template token ids (user turn + generation prompt) for each question."""
  out = []
  for q in questions:
    text = tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                         add_generation_prompt=True)
    out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
  return out


# --------------------------------------------------------------------------------------------------
# Pure pieces.


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


@functools.partial(jax.jit, static_argnames=("graphdef", "rounds", "cache_length"))
def _prefill(graphdef, state, input_ids, attention_mask, *, rounds: int, cache_length: int):
  """The prefill alone, jit-compiled (benchmarks/gpu.py times it separately); see _prefill_rows."""
  return _prefill_rows(_merge(graphdef, state), input_ids, attention_mask, rounds, cache_length)


def _decode_rows(model, cache, first_logits, keys, steering_ids, target_probs, stop_ids,
                 temperature, top_k, top_p, pad_id, *, mode: str, max_new_tokens: int, greedy: bool,
                 filtering: bool):
  """Steering + decode loop (traced inside a jit).

  first_logits: [N, V] f32 (last prompt position); keys: [N] typed keys; steering_ids: [K] int32;
  target_probs: [N, K] f32 (used in ``target`` mode); stop_ids: [S] int32.
  Returns tokens [N, T] int32 and the steering index [N] int32 (-1 when not steered).
  """
  rows = first_logits.shape[0]
  steered = mode != "none"
  total = max_new_tokens + (1 if steered else 0)
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
  tokens = tokens.at[:, 0].set(first)

  def cond(carry):
    t, _, _, _, done = carry
    return (t < total) & ~jnp.all(done)

  def body(carry):
    t, prev, cache, tokens, done = carry
    hidden, cache = model.decode_step(prev[:, None], cache)
    logits = model.logits(hidden)[:, 0].astype(jnp.float32)
    tok = sample(logits, step_keys(t))
    tok = jnp.where(done, pad_id, tok)
    tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, t))
    done = done | jnp.isin(tok, stop_ids)
    return t + 1, tok, cache, tokens, done

  carry = (jnp.asarray(1, jnp.int32), first, cache, tokens, done)
  _, _, _, tokens, _ = jax.lax.while_loop(cond, body, carry)
  return tokens, steer_idx


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "rounds", "cache_length", "mode", "max_new_tokens", "greedy",
                     "filtering"))
def _sample_chunk(graphdef, state, input_ids, attention_mask, key, first_prompt, first_round,
                  steering_ids, target_probs, stop_ids, temperature, top_k, top_p, pad_id, *,
                  rounds: int, cache_length: int, mode: str, max_new_tokens: int, greedy: bool,
                  filtering: bool):
  """One chunk, one compiled program: prefill, rounds, per-sample keys, steering and decode loop.

  input_ids, attention_mask: [P, L] (prompts first_prompt .. first_prompt + P - 1, left-padded);
  key: typed key of the seed; first_prompt, first_round: [] int32; target_probs: [P, K] f32.
  Returns tokens [P*rounds, T] int32 and steering index [P*rounds] int32, row p * rounds + r holding
  round first_round + r of prompt first_prompt + p.
  """
  model = _merge(graphdef, state)
  batch = input_ids.shape[0]
  logits, cache = _prefill_rows(model, input_ids, attention_mask, rounds, cache_length)
  p_idx = first_prompt + jnp.repeat(jnp.arange(batch, dtype=jnp.int32), rounds)
  r_idx = first_round + jnp.tile(jnp.arange(rounds, dtype=jnp.int32), batch)
  keys = _sample_keys(key, p_idx, r_idx)
  return _decode_rows(model, cache, logits, keys, steering_ids,
                      jnp.repeat(target_probs, rounds, axis=0), stop_ids, temperature, top_k, top_p,
                      pad_id, mode=mode, max_new_tokens=max_new_tokens, greedy=greedy,
                      filtering=filtering)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _steering_distribution(graphdef, state, input_ids, attention_mask, steering_ids):
  model = _merge(graphdef, state)
  hidden = model(input_ids, attention_mask)
  logits = _last_logits(model, hidden, attention_mask)[:, steering_ids]  # [B, K]
  return jax.nn.softmax(logits, axis=-1)


# --------------------------------------------------------------------------------------------------
# Public API.


def steering_distribution(model_or_graph_state, input_ids, attention_mask,
                          steering_ids) -> np.ndarray:
  """Exact steering-token distribution at the first assistant position, from one forward pass.

  input_ids, attention_mask: [B, L] (left or right padding; the last real token of each row is used);
  steering_ids: [K]. Returns [B, K] float32: softmax over the K steering-token logits alone
  (renormalised, temperature 1): exactly what ``model`` steering samples from.
  """
  graphdef, state = split_model(model_or_graph_state)
  out = _steering_distribution(_static(graphdef), state, jnp.asarray(input_ids, jnp.int32),
                               jnp.asarray(attention_mask, jnp.int32),
                               jnp.asarray(steering_ids, jnp.int32))
  return np.asarray(out)


def _next_pow2(n: int) -> int:
  return 1 << max(int(n) - 1, 0).bit_length()


def _plan(num_prompts: int, rounds: int, batch_size: int) -> tuple[int, int]:
  """(prompts per call, rounds per call): about ``batch_size`` rows per call, padded shapes."""
  if rounds >= batch_size:
    return 1, batch_size
  per_call = max(batch_size // rounds, 1)
  return min(per_call, _next_pow2(num_prompts)), rounds


def generate(model_or_graph_state,
             prompts: Sequence[Sequence[int]],
             *,
             rounds: int = 1,
             config: DecodeConfig = DecodeConfig(),
             max_new_tokens: int | None = None,
             steering: str = "none",
             steering_ids: Sequence[int] | None = None,
             target: Any = None,
             stop_ids: Sequence[int] = (),
             pad_id: int = 0,
             seed: int = 0,
             batch_size: int = 256,
             tokenizer=None) -> Samples:
  """Samples ``rounds`` continuations of each prompt.

  prompts: token-id lists (chat template applied, generation prompt included); they are left-padded to
  one bucketed length. ``max_new_tokens`` overrides ``config.max_new_tokens`` (the steering token is not
  counted). ``steering``: ``model`` | ``target`` | ``none``; ``steering_ids``: [K] (needed unless
  ``none``); ``target``: [K] or [len(prompts), K] probabilities (``target`` mode). ``batch_size``: about
  how many rows are decoded together. ``tokenizer`` (optional) decodes ``Samples.text``.
  """
  if steering not in STEERING_MODES:
    raise InputError(f"sampling: steering: expected one of {', '.join(STEERING_MODES)}, "
                     f"got {steering!r}")
  if not isinstance(rounds, int) or rounds < 1:
    raise InputError(f"sampling: rounds: expected an integer >= 1, got {rounds!r}")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise InputError(f"sampling: batch_size: expected an integer >= 1, got {batch_size!r}")
  max_new = config.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
  if max_new < 1:
    raise InputError(f"sampling: max_new_tokens: expected an integer >= 1, got {max_new}")
  num_prompts = len(prompts)
  if steering != "none":
    if steering_ids is None or len(steering_ids) == 0:
      raise InputError(f"sampling: steering_ids: expected the K steering token ids for "
                       f"steering={steering!r}, got none")
    steer = np.asarray(steering_ids, np.int32)
  else:
    steer = np.zeros((1,), np.int32)
  k = steer.shape[0]
  if steering == "target":
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
    probs = probs / probs.sum(-1, keepdims=True)
  else:
    probs = np.full((num_prompts, k), 1.0 / k, np.float32)

  graphdef, state = split_model(model_or_graph_state)
  graphdef = _static(graphdef)
  length = _prompt_bucket(max(len(p) for p in prompts)) if prompts else 0
  ids, mask = left_pad(prompts, pad_id, length)
  cache_length = length + max_new + (1 if steering != "none" else 0)
  stops = np.asarray(sorted(set(int(s) for s in stop_ids)) or [-1], np.int32)
  greedy = config.is_greedy
  filtering = (config.top_k > 0 or config.top_p < 1.0) and not greedy
  temperature = jnp.float32(config.temperature if config.temperature > 0 else 1.0)
  scalars = (temperature, jnp.int32(config.top_k), jnp.float32(config.top_p), jnp.int32(pad_id))

  per_call, rounds_per_call = _plan(num_prompts, rounds, batch_size)
  calls_per_prompt = -(-rounds // rounds_per_call)
  # Work units: (first prompt index, round offset). Prompt chunks are padded with the last prompt.
  units = []
  for start in range(0, num_prompts, per_call):
    for c in range(calls_per_prompt):
      units.append((start, c * rounds_per_call))

  pending = []
  key = jax.random.key(seed)
  steer_arr, stops_arr = jnp.asarray(steer), jnp.asarray(stops)
  for start, round0 in units:
    idx = np.minimum(np.arange(start, start + per_call), num_prompts - 1)
    tokens, steer_idx = _sample_chunk(
        graphdef, state, ids[idx], mask[idx], key, np.int32(start), np.int32(round0), steer_arr,
        probs[idx], stops_arr, *scalars, rounds=rounds_per_call, cache_length=cache_length,
        mode=steering, max_new_tokens=max_new, greedy=greedy, filtering=filtering)
    p_idx = np.repeat(np.arange(start, start + per_call), rounds_per_call)
    r_idx = np.tile(np.arange(round0, round0 + rounds_per_call), per_call)
    pending.append((p_idx, r_idx, tokens, steer_idx))

  # Gather on host, keep the real (prompt, round) rows in prompt-major order.
  p_all, r_all, t_all, s_all = [], [], [], []
  for p_idx, r_idx, tokens, steer_idx in pending:
    keep = (p_idx < num_prompts) & (r_idx < rounds)
    p_all.append(p_idx[keep])
    r_all.append(r_idx[keep])
    t_all.append(np.asarray(tokens)[keep])
    s_all.append(np.asarray(steer_idx)[keep])
  p_all, r_all = np.concatenate(p_all), np.concatenate(r_all)
  order = np.lexsort((r_all, p_all))
  tokens = np.concatenate(t_all)[order]
  steer_index = np.concatenate(s_all)[order].astype(np.int32)
  is_stop = np.isin(tokens, stops)
  if steering != "none":
    is_stop[:, 0] = False
  has_stop = is_stop.any(axis=1)
  num_tokens = np.where(has_stop, np.argmax(is_stop, axis=1) + 1, tokens.shape[1]).astype(np.int32)
  out = Samples(tokens=tokens, num_tokens=num_tokens, steering_index=steer_index,
                prompt_index=p_all[order].astype(np.int32),
                round_index=r_all[order].astype(np.int32))
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
