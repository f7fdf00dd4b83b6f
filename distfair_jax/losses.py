"""Pure-functional losses: token log-probs (vocab-tiled), steering-token KL, KTO, SFT, DPO, hybrid.

Every function here is a pure function of arrays, independent of the model, usable under
``jax.jit``, ``jax.vmap`` and with sharded inputs, and computes in float32 whatever the input dtype.
Shapes use ``B`` (batch), ``L`` (length), ``D`` (hidden size), ``V`` (vocabulary), ``K`` (number of
steering tokens / categories).

Conventions:
- Labels are aligned with the positions that predict them: ``logits[:, t]`` scores ``labels[:, t]``
  (the data pipeline already shifts, so callers need not).
- Masks: non-zero = the position counts. Masked positions give a log-prob of exactly 0 and receive
  no gradient; their labels may hold anything (padding ids, -100, ...).
- KTO and DPO metrics use the names users of TRL know (``rewards/chosen``, ``logps/rejected``, ...);
  for KTO "chosen" means desirable and "rejected" undesirable.

Typical use in a training step::

  hidden = model(input_ids, attention_mask)                                    # [B, L, D]
  tok = losses.token_logps_from_hidden(hidden, model.unembedding(), labels, label_mask)
  seq = losses.sequence_logps(tok, label_mask)                                 # [B]
  steer = losses.steering_logits_from_hidden(hidden, model.unembedding(), steering_position)
  kto = losses.kto_loss(seq, ref_seq, kl_seq, ref_kl_seq, desirable)
  kl = losses.steering_kl(steer, steering_ids, target, weights=desirable)
  loss, metrics = losses.hybrid_loss(kto, kl, ablation="full")

Models with final-logit soft-capping (Gemma 2: logits ``c * tanh(z / c)``) pass
``softcap=model.logit_softcap`` to ``token_logps_from_hidden`` and ``steering_logits_from_hidden``,
so that the log-probs (and their gradients, through the cap) are those of the capped logits.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from distfair_jax.errors import InputError

__all__ = [
    "ABLATIONS",
    "DEFAULT_TILE_SIZE",
    "KTO_BALANCE_RANGE",
    "check_kto_balance",
    "desirable_nll",
    "dpo_loss",
    "drop_absent_classes",
    "hybrid_loss",
    "kto_loss",
    "sequence_logps",
    "sft_loss",
    "soft_cap",
    "steering_kl",
    "steering_log_probs",
    "steering_logits_from_hidden",
    "token_logps",
    "token_logps_from_hidden",
]

Array = jax.Array

# Positions per tile in `token_logps_from_hidden` (each tile holds batch * tile_size tokens).
# Chosen with benchmarks/logps_memory.py (batch 2, length 512, hidden 2048, vocab 128256, float32,
# 2-core CPU): 64 keeps the compiled temporary memory of forward + backward at ~0.13 of the
# untiled version (128: ~0.26, 32: ~0.07, at a higher cost in time).
DEFAULT_TILE_SIZE = 64

# Valid values of `hybrid_loss(..., ablation=...)`.
ABLATIONS = ("full", "kl_only", "kto_only")

# KTO authors' recommended range for
# desirable_weight * n_desirable / (undesirable_weight * n_undesirable).
KTO_BALANCE_RANGE = (1.0, 4.0 / 3.0)

_F32 = jnp.float32


def _f32(x: Any) -> Array:
  return jnp.asarray(x).astype(_F32)


def soft_cap(x: Array, cap: float | None) -> Array:
  """``cap * tanh(x / cap)`` (Gemma 2's logit soft-capping, in x's dtype); x itself when cap is
  None."""
  if cap is None:
    return x
  c = jnp.asarray(cap, x.dtype)
  return jnp.tanh(x / c) * c


def _check_softcap(softcap: Any) -> float | None:
  if softcap is None:
    return None
  if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0:
    raise InputError(f"losses.py: softcap: expected a positive number or None, got {softcap!r}")
  return float(softcap)


def _mask_bool(mask: Any, shape: tuple[int, ...], field: str = "mask") -> Array:
  if mask is None:
    return jnp.ones(shape, dtype=bool)
  mask = jnp.asarray(mask)
  if mask.shape != tuple(shape):
    raise InputError(f"losses.py: {field}: expected shape {tuple(shape)}, got {mask.shape}")
  return mask != 0


def _safe_div(num: Array, den: Array) -> Array:
  """num / den, and 0 where den == 0 (no NaN, no NaN gradient)."""
  ok = den != 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _masked_mean(x: Array, where: Array) -> Array:
  where = where.astype(_F32)
  return _safe_div(jnp.sum(x * where), jnp.sum(where))


# ----------------------------------------------------------------------------------------------
# Token and sequence log-probabilities
# ----------------------------------------------------------------------------------------------


def token_logps(logits: Array, labels: Array, mask: Array | None) -> Array:
  """Per-token log-probabilities ``logit[label] - logsumexp(logits)``, without a full log_softmax.

  Args:
    logits: ``[B, L, V]`` (any float dtype; upcast to float32).
    labels: ``[B, L]`` int; ``logits[:, t]`` scores ``labels[:, t]`` (callers shift).
    mask: ``[B, L]``; non-zero where the token counts, or None for all positions.

  Returns:
    ``[B, L]`` float32; 0 at masked positions (which also get no gradient).
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if logits.ndim < 1 or labels.shape != logits.shape[:-1]:
    raise InputError(f"losses.py: labels: expected shape {logits.shape[:-1]} (logits without "
                     f"the vocab axis), got {labels.shape}")
  valid = _mask_bool(mask, labels.shape)
  logits = logits.astype(_F32)
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
  lse = jax.nn.logsumexp(logits, axis=-1)
  return jnp.where(valid, picked - lse, 0.0)


def _matmul_f32(a: Array, b: Array, spec: str) -> Array:
  """einsum accumulating in float32; a float32 operand next to a low-precision one is cast down
  (never the other way), so no float32 copy of a large low-precision matrix is made."""
  if a.dtype != b.dtype:
    low = a.dtype if jnp.finfo(a.dtype).bits < jnp.finfo(b.dtype).bits else b.dtype
    a, b = a.astype(low), b.astype(low)
  return jnp.einsum(spec, a, b, preferred_element_type=_F32)


def _to_tiles(x: Array, tile: int, n_tiles: int) -> Array:
  """``[B, L, ...]`` -> ``[n_tiles, B, tile, ...]`` (zero-padded along L)."""
  pad = n_tiles * tile - x.shape[1]
  if pad:
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape((x.shape[0], n_tiles, tile) + x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _from_tiles(x: Array, length: int) -> Array:
  """``[n_tiles, B, tile, ...]`` -> ``[B, length, ...]``."""
  x = jnp.moveaxis(x, 0, 1)
  x = x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])
  return x[:, :length]


def _tile_geometry(length: int, tile_size: int) -> tuple[int, int]:
  tile = max(1, min(tile_size, length))
  return tile, -(-length // tile)


def _tile_forward(h: Array, w: Array, y: Array, softcap: float | None
                  ) -> tuple[Array, Array, Array]:
  """One tile: ``h [B, T, D]``, ``w [D, V]``, ``y [B, T]`` -> (logits f32 (capped), lse,
  log-prob)."""
  logits = soft_cap(_matmul_f32(h, w, "btd,dv->btv"), softcap)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
  return logits, lse, picked - lse


def _through_cap(d_logits: Array, logits: Array, softcap: float | None) -> Array:
  """d loss / d (raw logits) from d loss / d (capped logits): d (c tanh(u / c)) / du = 1 -
  tanh^2 = 1 - (z / c)^2, z the capped logits."""
  if softcap is None:
    return d_logits
  return d_logits * (1.0 - jnp.square(logits / softcap))


def _tiled_logps_impl(hidden: Array, w: Array, labels: Array, tile_size: int,
                      softcap: float | None,
                      want_jac: bool) -> tuple[Array, Array, Array | None]:
  """Scan over token tiles.

  Returns (logps [B, L], lse [B, L], d logp / d hidden [B, L, D] float32 or None).
  """
  length = hidden.shape[1]
  tile, n_tiles = _tile_geometry(length, tile_size)
  vocab = w.shape[1]

  def body(_, xs):
    h, y = xs
    logits, lse, logp = _tile_forward(h, w, y, softcap)
    if not want_jac:
      return None, (logp, lse)
    # d logp_t / d h_t = w[:, y_t] - w @ softmax_t (one more matmul per tile, no residual of size V)
    probs = jnp.exp(logits - lse[..., None])
    onehot_minus_p = (jnp.arange(vocab) == y[..., None]).astype(_F32) - probs
    jac = _matmul_f32(_through_cap(onehot_minus_p, logits, softcap), w, "btv,dv->btd")
    return None, (logp, lse, jac)

  _, outs = jax.lax.scan(body, None, (_to_tiles(hidden, tile, n_tiles),
                                      _to_tiles(labels, tile, n_tiles)))
  logp, lse = _from_tiles(outs[0], length), _from_tiles(outs[1], length)
  jac = _from_tiles(outs[2], length) if want_jac else None
  return logp, lse, jac


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _tiled_logps(hidden: Array, w: Array, labels: Array, tile_size: int,
                 softcap: float | None) -> Array:
  return _tiled_logps_impl(hidden, w, labels, tile_size, softcap, want_jac=False)[0]


def _tiled_logps_fwd(hidden, w, labels, tile_size, softcap):
  # symbolic_zeros=True: differentiable inputs arrive as CustomVJPPrimal(value, perturbed).
  h_val, w_val, y_val = hidden.value, w.value, labels.value
  dtype_token = jnp.zeros((0,), h_val.dtype)  # carries hidden's dtype to the bwd rule
  if w.perturbed:
    # Full fine-tuning: keep only the per-token logsumexp; the bwd rule recomputes the logits
    # chunk by chunk (one extra matmul).
    logp, lse, _ = _tiled_logps_impl(h_val, w_val, y_val, tile_size, softcap, want_jac=False)
    return logp, (h_val, w_val, y_val, lse, None, dtype_token)
  # Frozen unembedding (LoRA, or only the hidden states need a gradient): the gradient is
  # g * (d logp / d hidden), computed in the forward pass; the bwd rule needs no matmul at all.
  logp, _, jac = _tiled_logps_impl(h_val, w_val, y_val, tile_size, softcap, want_jac=True)
  return logp, (None, None, None, None, jac, dtype_token)


def _tiled_logps_bwd(tile_size, softcap, res, g):
  hidden, w, labels, lse, jac, dtype_token = res
  if type(g) is jax.custom_derivatives.SymbolicZero:  # output not used in the loss
    g = jnp.zeros(g.shape, _F32)
  g = g.astype(_F32)
  if jac is not None:
    d_hidden = (g[..., None] * jac).astype(dtype_token.dtype)
    return d_hidden, None, None

  # The backward pass runs over vocabulary chunks, sized so that a chunk's largest blocks (its
  # logits [B, L, chunk] and its d unembedding columns [D, chunk]) hold about as many elements as
  # one forward tile [B, tile, V]. Each chunk's d unembedding columns come from a single matmul over
  # all tokens (float32 accumulation, as in the untiled version) and are written in place, so no
  # [D, V] temporary or accumulator exists; d hidden [B, L, D] accumulates in float32.
  batch, length, dim = hidden.shape
  vocab = w.shape[1]
  tile, _ = _tile_geometry(length, tile_size)
  chunk = max(1, min(vocab, (batch * tile * vocab) // max(batch * length, dim)))
  n_full = vocab // chunk

  def chunk_grads(w_c, start):
    logits = soft_cap(_matmul_f32(hidden, w_c, "bld,dv->blv"), softcap)
    probs = jnp.exp(logits - lse[..., None])
    onehot = (labels - start)[..., None] == jnp.arange(w_c.shape[1])
    d_logits = _through_cap(g[..., None] * (onehot.astype(_F32) - probs), logits, softcap)
    d_h = _matmul_f32(d_logits, w_c, "blv,dv->bld")
    d_w = _matmul_f32(hidden, d_logits, "bld,blv->dv").astype(w.dtype)
    return d_h, d_w

  def body(carry, c):
    d_h, d_w = carry
    start = c * chunk
    d_h_c, d_w_c = chunk_grads(jax.lax.dynamic_slice_in_dim(w, start, chunk, axis=1), start)
    return (d_h + d_h_c, jax.lax.dynamic_update_slice_in_dim(d_w, d_w_c, start, axis=1)), None

  init = (jnp.zeros(hidden.shape, _F32), jnp.zeros(w.shape, w.dtype))
  (d_h, d_w), _ = jax.lax.scan(body, init, jnp.arange(n_full, dtype=jnp.int32))
  if n_full * chunk < vocab:  # last, shorter chunk
    start = n_full * chunk
    d_h_c, d_w_c = chunk_grads(w[:, start:], start)
    d_h = d_h + d_h_c
    d_w = jax.lax.dynamic_update_slice_in_dim(d_w, d_w_c, start, axis=1)
  return d_h.astype(dtype_token.dtype), d_w, None


_tiled_logps.defvjp(_tiled_logps_fwd, _tiled_logps_bwd, symbolic_zeros=True)


def token_logps_from_hidden(hidden: Array, unembedding: Array, labels: Array, mask: Array | None,
                            tile_size: int = DEFAULT_TILE_SIZE, *,
                            softcap: float | None = None) -> Array:
  """Per-token log-probs from hidden states in token tiles (never all ``[B, L, V]`` logits at once).

  Equal, in value and in gradients with respect to ``hidden`` and ``unembedding``, to
  ``token_logps(soft_cap(hidden @ unembedding, softcap), labels, mask)`` with the matmul
  accumulated in float32 (``softcap`` None: no cap).

  The length axis is cut into tiles of ``tile_size`` positions (the last tile zero-padded, so any
  length works; ``tile_size >= L`` means one tile); a ``lax.scan`` computes one ``[B, tile, V]``
  float32 block of logits at a time. A custom VJP keeps the backward pass tiled too:
  - when ``unembedding`` is differentiated, only the per-token logsumexp ``[B, L]`` is saved; the
    backward pass recomputes the logits in vocabulary chunks ``[B, L, C]``, with C chosen so that
    ``max(B * L, D) * C`` is about ``B * tile_size * V`` (the size of a forward tile); each chunk's
    columns of d unembedding come from one float32-accumulated matmul over all tokens and are
    written in place (no ``[D, V]`` temporary; with the batch axis sharded, one all-reduce of
    d unembedding in all, as in the untiled version);
  - when it is not (frozen output layer, e.g. LoRA), the forward pass also computes
    d logp / d hidden ``[B, L, D]`` (float32) and the backward pass is a multiplication.
  Under ``jax.grad``, pass ``jax.lax.stop_gradient(hidden)`` (not a stop_gradient of the output)
  for sequences that need no gradient, such as KTO's mismatched pairs, to skip that work.

  Args:
    hidden: ``[B, L, D]`` hidden states after the final norm (any float dtype).
    unembedding: ``[D, V]`` output projection (``model.unembedding()``).
    labels: ``[B, L]`` int; position t scores ``labels[:, t]``.
    mask: ``[B, L]``; non-zero where the token counts, or None for all positions.
    tile_size: positions per tile (each tile holds ``B * tile_size`` tokens); a positive int.
    softcap: the model's final-logit soft-cap (``model.logit_softcap``), or None.

  Returns:
    ``[B, L]`` float32 log-probs, 0 at masked positions.
  """
  hidden, unembedding, labels = jnp.asarray(hidden), jnp.asarray(unembedding), jnp.asarray(labels)
  if hidden.ndim != 3:
    raise InputError(f"losses.py: hidden: expected shape [batch, length, d], got {hidden.shape}")
  if unembedding.ndim != 2 or unembedding.shape[0] != hidden.shape[2]:
    raise InputError(f"losses.py: unembedding: expected shape [{hidden.shape[2]}, vocab], "
                     f"got {unembedding.shape}")
  if labels.shape != hidden.shape[:2]:
    raise InputError(f"losses.py: labels: expected shape {hidden.shape[:2]}, got {labels.shape}")
  if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
    raise InputError(f"losses.py: tile_size: expected a positive int, got {tile_size!r}")
  valid = _mask_bool(mask, labels.shape)
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  logp = _tiled_logps(hidden, unembedding, safe, int(tile_size), _check_softcap(softcap))
  return jnp.where(valid, logp, 0.0)


def steering_logits_from_hidden(hidden: Array, unembedding: Array,
                                steering_position: Array, *,
                                softcap: float | None = None) -> Array:
  """Logits at the steering position, slicing the hidden state before the output projection.

  Args:
    hidden: ``[B, L, D]``.
    unembedding: ``[D, V]``.
    steering_position: ``[B]`` int, the position whose logits predict the steering token.
    softcap: the model's final-logit soft-cap (``model.logit_softcap``), or None.

  Returns:
    ``[B, V]`` float32 logits (soft-capped when ``softcap`` is given).
  """
  hidden, unembedding = jnp.asarray(hidden), jnp.asarray(unembedding)
  pos = jnp.asarray(steering_position).astype(jnp.int32)
  if hidden.ndim != 3 or pos.shape != hidden.shape[:1]:
    raise InputError(f"losses.py: steering_position: expected shape [{hidden.shape[0]}] for "
                     f"hidden [batch, length, d], got {pos.shape} for hidden {hidden.shape}")
  h = jnp.take_along_axis(hidden, pos[:, None, None], axis=1)[:, 0]  # [B, D]
  return soft_cap(_matmul_f32(h, unembedding, "bd,dv->bv"), _check_softcap(softcap))


def sequence_logps(token_logps: Array, mask: Array | None, average: bool = False) -> Array:
  """Sum (or mean, ``average=True``) of per-token log-probs over each sequence.

  Args:
    token_logps: ``[B, L]``.
    mask: ``[B, L]``, non-zero where the token counts, or None for all positions.
    average: mean over the counted tokens instead of the sum (0 for a sequence with none).

  Returns:
    ``[B]`` float32.
  """
  token_logps = _f32(token_logps)
  valid = _mask_bool(mask, token_logps.shape).astype(_F32)
  total = jnp.sum(token_logps * valid, axis=-1)
  if not average:
    return total
  return _safe_div(total, jnp.sum(valid, axis=-1))


# ----------------------------------------------------------------------------------------------
# Steering-token calibration
# ----------------------------------------------------------------------------------------------


def steering_log_probs(steer_logits: Array, steering_ids: Array,
                       renormalize: bool = False) -> Array:
  """Log-probabilities of the K steering tokens at the steering position.

  Args:
    steer_logits: ``[B, V]`` logits at the position that predicts the steering token.
    steering_ids: ``[K]`` (or ``[B, K]``) int token ids of the steering tokens.
    renormalize: False (default, as the paper's code): full-vocabulary log-softmax gathered at the
      K ids, so probability mass outside the steering tokens is penalised too. True: log-softmax
      over the K steering logits only.

  Returns:
    ``[B, K]`` float32.
  """
  logits = _f32(steer_logits)
  ids = jnp.asarray(steering_ids).astype(jnp.int32)
  if (logits.ndim != 2 or ids.ndim not in (1, 2)
      or (ids.ndim == 2 and ids.shape[0] != logits.shape[0])):
    raise InputError(f"losses.py: steering_ids: expected [K] or [batch, K] ids for steer_logits "
                     f"[batch, vocab], got {ids.shape} for {logits.shape}")
  ids = jnp.broadcast_to(ids, logits.shape[:1] + ids.shape[-1:])
  picked = jnp.take_along_axis(logits, ids, axis=-1)
  if renormalize:
    return jax.nn.log_softmax(picked, axis=-1)
  return picked - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


def steering_kl(steer_logits: Array, steering_ids: Array, target_probs: Array,
                weights: Array | None = None, renormalize: bool = False) -> tuple[Array, Array]:
  """KL(target || model) over the K steering tokens: ``sum_k p_k (log p_k - log q_k)``, 0 log 0 = 0.

  Args:
    steer_logits: ``[B, V]`` logits at the steering position.
    steering_ids: ``[K]`` (or ``[B, K]``) steering token ids.
    target_probs: ``[B, K]`` target distribution p (rows sum to 1; zeros allowed).
    weights: ``[B]`` or None (all 1). The mean is ``sum(w * kl) / sum(w)``, i.e. over the examples
      with non-zero weight; pass the desirable flags to restrict it to desirable examples, as the
      paper's code does. 0 when all weights are 0.
    renormalize: see `steering_log_probs`.

  Returns:
    ``(mean, per_example)``: a float32 scalar and ``[B]`` float32 (unweighted).
  """
  log_q = steering_log_probs(steer_logits, steering_ids, renormalize=renormalize)
  p = _f32(target_probs)
  if p.shape != log_q.shape:
    raise InputError(f"losses.py: target_probs: expected shape {log_q.shape}, got {p.shape}")
  positive = p > 0
  log_p = jnp.log(jnp.where(positive, p, 1.0))
  per_example = jnp.sum(jnp.where(positive, p * (log_p - log_q), 0.0), axis=-1)
  if weights is None:
    w = jnp.ones(per_example.shape, _F32)
  else:
    w = _f32(weights)
    if w.shape != per_example.shape:
      raise InputError(f"losses.py: weights: expected shape {per_example.shape}, got {w.shape}")
  return _safe_div(jnp.sum(w * per_example), jnp.sum(w)), per_example


# ----------------------------------------------------------------------------------------------
# KTO, SFT, DPO
# ----------------------------------------------------------------------------------------------


def kto_loss(policy_logps: Array, reference_logps: Array, policy_kl_logps: Array,
             reference_kl_logps: Array, desirable: Array, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             kl_mask: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """KTO loss (Ethayarajh et al. 2024) with the mismatched-pair reference point.

  r = policy_logps - reference_logps; z0 = max(0, mean over valid rows of (policy_kl_logps -
  reference_kl_logps)) under stop_gradient (a mean over the whole batch: under jit with a sharded
  batch axis, the all-device mean). Per example: desirable_weight * (1 - sigmoid(beta (r - z0)))
  if desirable, else undesirable_weight * (1 - sigmoid(beta (z0 - r))).

  Args:
    policy_logps, reference_logps: ``[B]`` sequence log-probs of the completions.
    policy_kl_logps, reference_kl_logps: ``[B]`` sequence log-probs of the mismatched pairs.
    desirable: ``[B]`` bool/int, non-zero for desirable examples.
    beta, desirable_weight, undesirable_weight: scalars.
    kl_mask: ``[B]`` rows that enter z0 (non-zero = valid), default all.

  Returns:
    ``(loss, metrics)``: the mean loss over all examples (float32 scalar) and float32 scalars
    ``kl`` (z0), ``rewards/chosen``, ``rewards/rejected`` (means of beta * r over desirable /
    undesirable rows, 0 when there are none: ``drop_absent_classes`` leaves those out of what
    is logged), ``rewards/margins`` (their difference),
    ``logps/chosen``, ``logps/rejected`` (mean policy log-probs), ``count/chosen``,
    ``count/rejected``.
  """
  pol, ref = _f32(policy_logps), _f32(reference_logps)
  pol_kl, ref_kl = _f32(policy_kl_logps), _f32(reference_kl_logps)
  if pol.ndim != 1 or not (ref.shape == pol_kl.shape == ref_kl.shape == pol.shape):
    raise InputError(f"losses.py: kto_loss: expected four [batch] arrays, got {pol.shape}, "
                     f"{ref.shape}, {pol_kl.shape}, {ref_kl.shape}")
  good = _mask_bool(desirable, pol.shape, "desirable")
  kl_valid = _mask_bool(kl_mask, pol.shape, "kl_mask")

  z0 = jax.lax.stop_gradient(jnp.maximum(_masked_mean(pol_kl - ref_kl, kl_valid), 0.0))
  rewards = pol - ref
  loss_good = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (rewards - z0)))
  loss_bad = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - rewards)))
  loss = jnp.mean(jnp.where(good, loss_good, loss_bad))

  scaled = jax.lax.stop_gradient(beta * rewards)
  pol_ng = jax.lax.stop_gradient(pol)
  chosen, rejected = _masked_mean(scaled, good), _masked_mean(scaled, ~good)
  metrics = {
      "kl": z0,
      "rewards/chosen": chosen,
      "rewards/rejected": rejected,
      "rewards/margins": chosen - rejected,
      "logps/chosen": _masked_mean(pol_ng, good),
      "logps/rejected": _masked_mean(pol_ng, ~good),
      "count/chosen": jnp.sum(good.astype(_F32)),
      "count/rejected": jnp.sum((~good).astype(_F32)),
  }
  return loss, metrics


def drop_absent_classes(metrics: Mapping[str, Any]) -> dict[str, Any]:
  """Host-side: ``metrics`` without the KTO entries of a class the batch did not have.

  Under jit the metrics have a fixed structure, so ``kto_loss`` reports 0 for the mean reward
  and log-prob of a class with no rows; what is logged leaves them out, as TRL does: no
  ``rewards/rejected``, ``logps/rejected`` nor ``rewards/margins`` when ``count/rejected`` is 0
  (likewise for chosen). Other metrics pass through.
  """
  out = dict(metrics)
  for cls in ("chosen", "rejected"):
    count = out.get(f"count/{cls}")
    if count is not None and float(count) == 0:
      for key in (f"rewards/{cls}", f"logps/{cls}", "rewards/margins"):
        out.pop(key, None)
  return out


_SFT_AVERAGES = ("token", "sequence")


def sft_loss(token_logps: Array, mask: Array | None, average: str = "token") -> Array:
  """Negative log-likelihood of the labelled tokens.

  Args:
    token_logps: ``[B, L]``.
    mask: ``[B, L]``, non-zero where the token counts, or None.
    average: "token": mean over all counted tokens of the batch; "sequence": mean over the
      sequences (with at least one counted token) of each sequence's mean, as the paper's stage 1.

  Returns:
    float32 scalar (0 when nothing is counted).
  """
  if average not in _SFT_AVERAGES:
    raise ValueError(f"sft_loss: average: expected one of {_SFT_AVERAGES}, got {average!r}")
  token_logps = _f32(token_logps)
  valid = _mask_bool(mask, token_logps.shape).astype(_F32)
  if average == "token":
    return -_safe_div(jnp.sum(token_logps * valid), jnp.sum(valid))
  count = jnp.sum(valid, axis=-1)
  per_seq = _safe_div(jnp.sum(token_logps * valid, axis=-1), count)
  return -_masked_mean(per_seq, count > 0)


def dpo_loss(policy_chosen: Array, policy_rejected: Array, reference_chosen: Array,
             reference_rejected: Array, *, beta: float = 0.1, label_smoothing: float = 0.0,
             ipo: bool = False) -> tuple[Array, dict[str, Array]]:
  """DPO loss (Rafailov et al. 2023), conservative DPO (label smoothing) and IPO.

  h = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected).
  Sigmoid / cDPO: ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
  IPO (Azar et al. 2023): ``(h - 1 / (2 beta))^2``; the IPO paper uses per-token averaged log-probs
  (``sequence_logps(..., average=True)``). ``label_smoothing`` applies to the sigmoid loss only.

  Args:
    policy_chosen, policy_rejected, reference_chosen, reference_rejected: ``[B]`` sequence
      log-probs.
    beta, label_smoothing: scalars; ipo: use the IPO loss.

  Returns:
    ``(loss, metrics)``: mean loss (float32 scalar) and float32 scalars ``rewards/chosen``,
    ``rewards/rejected`` (means of beta * (policy - reference)), ``rewards/accuracies``,
    ``rewards/margins``, ``logps/chosen``, ``logps/rejected``.
  """
  if ipo and isinstance(label_smoothing, (int, float)) and label_smoothing != 0:
    raise ValueError("dpo_loss: label_smoothing: applies to the sigmoid loss only; got "
                     f"{label_smoothing} with ipo=True")
  pc, pr = _f32(policy_chosen), _f32(policy_rejected)
  rc, rr = _f32(reference_chosen), _f32(reference_rejected)
  h = (pc - pr) - (rc - rr)
  if ipo:
    losses = (h - 1.0 / (2.0 * beta)) ** 2
  else:
    losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
              - label_smoothing * jax.nn.log_sigmoid(-beta * h))
  chosen = jax.lax.stop_gradient(beta * (pc - rc))
  rejected = jax.lax.stop_gradient(beta * (pr - rr))
  metrics = {
      "rewards/chosen": jnp.mean(chosen),
      "rewards/rejected": jnp.mean(rejected),
      "rewards/accuracies": jnp.mean((chosen > rejected).astype(_F32)),
      "rewards/margins": jnp.mean(chosen - rejected),
      "logps/chosen": jnp.mean(jax.lax.stop_gradient(pc)),
      "logps/rejected": jnp.mean(jax.lax.stop_gradient(pr)),
  }
  return jnp.mean(losses), metrics


# ----------------------------------------------------------------------------------------------
# Hybrid objective
# ----------------------------------------------------------------------------------------------


def _split_term(term: Any, name: str) -> tuple[Array | None, Mapping[str, Array]]:
  """A scalar, None, or the tuple returned by kto_loss / steering_kl -> (scalar, metrics)."""
  if term is None:
    return None, {}
  if isinstance(term, tuple):
    if len(term) != 2:
      raise ValueError(f"hybrid_loss: {name}: expected a scalar or a (loss, extra) pair, "
                       f"got a tuple of {len(term)}")
    value, extra = term
    metrics = dict(extra) if isinstance(extra, Mapping) else {}
  else:
    value, metrics = term, {}
  value = _f32(value)
  if value.shape != ():
    raise ValueError(f"hybrid_loss: {name}: expected a scalar loss, got shape {value.shape}")
  return value, metrics


def desirable_nll(policy_logps: Array, lengths: Array, desirable: Array) -> Array:
  """Negative log-likelihood per token of the desirable completions: the anchor that keeps their
  text likely while KTO pushes the undesirable ones down (as DPO's ``rpo_alpha`` term in TRL).

  Args:
    policy_logps: ``[B]`` summed log-probs of the completions (with gradient).
    lengths: ``[B]`` counted tokens of each completion.
    desirable: ``[B]`` bool/int, non-zero for desirable examples.

  Returns:
    float32 scalar: -sum of the desirable rows' log-probs / their token count (0 without any).
  """
  pol, n = _f32(policy_logps), _f32(lengths)
  if pol.ndim != 1 or n.shape != pol.shape:
    raise InputError(f"losses.py: desirable_nll: expected two [batch] arrays, got {pol.shape}, "
                     f"{n.shape}")
  good = _mask_bool(desirable, pol.shape, "desirable").astype(_F32)
  return -_safe_div(jnp.sum(pol * good), jnp.sum(n * good))


def hybrid_loss(kto: Any, steering: Any, *, ablation: str = "full", kl_weight: float = 1.0,
                nll: Any = None, nll_weight: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """The paper's stage-2 objective and its ablations.

  - ``"full"``: kto + kl_weight * steering
  - ``"kl_only"``: kl_weight * steering
  - ``"kto_only"``: kto

  plus ``nll_weight * nll`` in each (0 by default: the paper has no such term).

  Args:
    kto: the mean KTO loss: a scalar, or the ``(loss, metrics)`` tuple returned by `kto_loss`
      (its metrics are copied into the result), or None with ``ablation="kl_only"``.
    steering: the steering KL: a scalar, or the ``(mean, per_example)`` tuple returned by
      `steering_kl`, or None with ``ablation="kto_only"``.
    ablation: one of ``ABLATIONS``.
    kl_weight: weight of the steering KL.
    nll: the desirable completions' negative log-likelihood (`desirable_nll`), or None.
    nll_weight: its weight (> 0 needs ``nll``).

  Returns:
    ``(loss, metrics)``: float32 scalar loss; metrics hold ``loss``, ``kto_loss``,
    ``steering_kl`` and ``nll`` (each term is reported when given, even if the ablation or a zero
    weight leaves it out of the loss), plus the KTO metrics when ``kto`` is kto_loss's tuple.
  """
  if ablation not in ABLATIONS:
    raise ValueError(f"hybrid_loss: ablation: expected one of {', '.join(ABLATIONS)}, "
                     f"got {ablation!r}")
  kto_value, kto_metrics = _split_term(kto, "kto")
  steer_value, _ = _split_term(steering, "steering")
  if ablation != "kl_only" and kto_value is None:
    raise ValueError(f"hybrid_loss: kto: required with ablation={ablation!r}, got None")
  if ablation != "kto_only" and steer_value is None:
    raise ValueError(f"hybrid_loss: steering: required with ablation={ablation!r}, got None")
  nll_value, _ = _split_term(nll, "nll")
  if nll_weight and nll_value is None:
    raise ValueError(f"hybrid_loss: nll: required with nll_weight={nll_weight}, got None")

  if ablation == "full":
    loss = kto_value + kl_weight * steer_value
  elif ablation == "kl_only":
    loss = kl_weight * steer_value
  else:
    loss = kto_value
  if nll_weight:
    loss = loss + nll_weight * nll_value
  metrics = dict(kto_metrics)
  metrics["loss"] = jax.lax.stop_gradient(loss)
  if kto_value is not None:
    metrics["kto_loss"] = jax.lax.stop_gradient(kto_value)
  if steer_value is not None:
    metrics["steering_kl"] = jax.lax.stop_gradient(steer_value)
  if nll_value is not None:
    metrics["nll"] = jax.lax.stop_gradient(nll_value)
  return loss, metrics


def check_kto_balance(n_desirable: int, n_undesirable: int, desirable_weight: float = 1.0,
                      undesirable_weight: float = 1.0) -> float:
  """Warn when desirable and undesirable examples are imbalanced for KTO.

  KTO's authors recommend ``desirable_weight * n_desirable / (undesirable_weight * n_undesirable)``
  in ``KTO_BALANCE_RANGE`` = [1, 4/3]. Plain Python (call it on dataset counts, outside jit).

  Returns:
    The ratio (``inf`` when there are no undesirable examples), after a ``warnings.warn`` (a
    UserWarning) if it lies outside the range.
  """
  for field, value in (("n_desirable", n_desirable), ("n_undesirable", n_undesirable)):
    if value < 0:
      raise InputError(f"losses.py: {field}: expected a count >= 0, got {value}")
  for field, value in (("desirable_weight", desirable_weight),
                       ("undesirable_weight", undesirable_weight)):
    if not value > 0:
      raise InputError(f"losses.py: {field}: expected a weight > 0, got {value}")
  if n_desirable == 0 and n_undesirable == 0:
    raise InputError("losses.py: n_desirable, n_undesirable: expected at least one example, got 0")
  den = undesirable_weight * n_undesirable
  ratio = math.inf if den == 0 else desirable_weight * n_desirable / den
  low, high = KTO_BALANCE_RANGE
  if not low <= ratio <= high:
    warnings.warn(
        f"KTO examples are imbalanced: desirable_weight * n_desirable / (undesirable_weight * "
        f"n_undesirable) = {desirable_weight} * {n_desirable} / ({undesirable_weight} * "
        f"{n_undesirable}) = {ratio:.4g}; KTO's authors recommend a value in [1, 4/3] "
        f"(adjust desirable_weight or undesirable_weight)", UserWarning, stacklevel=2)
  return ratio
