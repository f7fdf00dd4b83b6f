"""The train steps: one pure function ``(state, frozen, reference, batch) -> (state, metrics)`` per stage.

Each step merges the model from ``(graphdef, params, rngs, frozen)`` inside the traced function (the
model object never crosses ``jax.jit``), computes per-token log-probabilities tiled over the vocabulary
(``losses.token_logps_from_hidden``: the ``[batch, length, vocab]`` float32 logits never exist at once),
and applies the pure losses of ``distfair_jax.losses``:

- ``sft`` / ``ift``: ``losses.sft_loss`` on the labelled completion tokens.
- ``hybrid`` (the method), packed layout (the default; ``data.tokenize.pack_shared_prefix``): one
  policy forward per pair over [prompt | desirable | undesirable | two mismatched completions], the
  prompt computed once for the four sequences, the mismatched log-probs under ``stop_gradient``; the
  reference forward likewise (or its log-probs cached in the batch, ``reference="cached"``).
  Rows layout: a policy forward over the target sequences (with gradient), one over the mismatched
  KL pairs (parameters under ``stop_gradient``, so no backward pass is spent on it), and the
  reference forward over both at once. Either way the steering logits are read at the steering
  position before the output projection; ``losses.hybrid_loss`` with the configured ablation. KTO
  terms are computed in every ablation so that ``kl_only`` runs still report the rewards.
- ``dpo``: policy and reference forwards over chosen and rejected sequences; packed layout, one row
  per record, [prompt | chosen | rejected], the prompt computed once for both.

``jit_step`` compiles it with explicit in/out shardings and the state donated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from distfair_jax import losses as L
from distfair_jax.train.state import TrainState, current_learning_rate

__all__ = ["StepSpec", "make_loss_fn", "make_reference_fn", "make_train_step", "make_eval_fn",
           "check_batch", "is_packed"]

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Static settings of a step (hashable: part of the compiled program)."""
  kind: str  # sft | ift | hybrid | dpo
  tile_size: int = L.DEFAULT_TILE_SIZE
  sft_average: str = "sequence"
  beta: float = 0.1
  desirable_weight: float = 1.0
  undesirable_weight: float = 1.0
  kl_weight: float = 1.0
  ablation: str = "full"
  renormalize: bool = False
  reference: str = "online"  # online | cached
  label_smoothing: float = 0.0
  ipo: bool = False

  @property
  def needs_reference_params(self) -> bool:
    return self.kind == "dpo" or (self.kind == "hybrid" and self.reference == "online")


def is_packed(batch: dict[str, Any]) -> bool:
  """Whether a hybrid batch has the shared-prefix layout (``data.tokenize.pack_shared_prefix``)."""
  return "packed_input_ids" in batch


_PACKED_KEYS = ("packed_input_ids", "packed_positions", "packed_segment_ids", "label_source",
                "label_ids", "label_branch")
# step kind -> (name in messages, data-pipeline kind, keys besides _PACKED_KEYS, label groups and
# what they hold)
_PACKED_KINDS = {
    "hybrid": ("hybrid", "kto", ("steering_position", "target"), 2, "pairs, 2 (targets, mismatched)"),
    "dpo": ("DPO", "dpo", (), 1, "records, 1 (chosen and rejected)"),
}


def _check_packed(kind: str, batch: dict[str, Any]) -> None:
  name, data_kind, extra, groups, layout = _PACKED_KINDS[kind]
  for key in _PACKED_KEYS + extra:
    if key not in batch:
      raise ValueError(f"packed {name} batch lacks {key!r} (build it with the data pipeline's "
                       f"kind={data_kind!r}, layout='packed')")
  if batch["label_source"].shape[1:2] != (groups,):
    raise ValueError(f"packed {name} batch: label_source: expected [{layout}, N], got shape "
                     f"{tuple(batch['label_source'].shape)}")


def check_batch(spec: StepSpec, batch: dict[str, Any]) -> None:
  """Refuse batches the step cannot use, with the reason (before anything is compiled)."""
  if spec.kind in _PACKED_KINDS and is_packed(batch):
    _check_packed(spec.kind, batch)
  elif spec.kind == "hybrid":
    n = len(batch["input_ids"])
    if n < 2:
      raise ValueError(
          "the hybrid (KTO) step needs at least 2 examples per batch: the KTO reference point z0 is "
          "estimated from mismatched pairs (prompt i with the completion of example i+1), which a batch "
          "of one cannot form; use hybrid.batch_size >= 2")
    for key in ("kl_input_ids", "kl_attention_mask", "kl_labels", "kl_label_mask", "desirable",
                "target", "steering_position"):
      if key not in batch:
        raise ValueError(f"hybrid batch lacks {key!r} (build it with the data pipeline's kind='kto')")


def _pad_length(x: jax.Array, length: int) -> jax.Array:
  """Right-pad axis 1 of x [batch, l, ...] with zeros to ``length``."""
  pad = length - x.shape[1]
  if pad == 0:
    return x
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))


def _sequence_logps(model, input_ids, attention_mask, labels, label_mask, tile_size):
  """-> (hidden [B, L, D], unembedding [D, V], sequence log-probs [B])."""
  hidden = model(input_ids, attention_mask)
  unemb = model.unembedding()
  tok = L.token_logps_from_hidden(hidden, unemb, labels, label_mask, tile_size)
  return hidden, unemb, tok, L.sequence_logps(tok, label_mask)


def _packed_group_logps(model, batch: Batch, tile_size: int, no_grad_groups=()):
  """A packed batch (R rows, G label groups of two branches) -> (hidden [R, T, D], unembedding
  [D, V], log-probs [R, G, 2]: entry [r, g, k] sums the labels of branch 2g + k of row r).

  One forward over the packed rows; each label group gathers the hidden states that predict its
  labels. Groups in ``no_grad_groups`` read the hidden states and the output projection under
  ``stop_gradient``, so their tiled log-probs have no backward pass at all.
  """
  hidden = _forward_hidden(model, batch)
  unemb = model.unembedding()
  branch = batch["label_branch"]  # [R, G, N]
  out = []
  for g in range(branch.shape[1]):
    src = jnp.take_along_axis(hidden, batch["label_source"][:, g, :, None], axis=1)  # [R, N, D]
    w = unemb
    if g in no_grad_groups:
      src, w = jax.lax.stop_gradient(src), jax.lax.stop_gradient(unemb)
    mask = (branch[:, g] >= 0).astype(jnp.float32)
    tok = L.token_logps_from_hidden(src, w, batch["label_ids"][:, g], mask, tile_size) * mask
    first = (branch[:, g] == 2 * g).astype(jnp.float32)
    second = (branch[:, g] == 2 * g + 1).astype(jnp.float32)
    out.append(jnp.stack([jnp.sum(tok * first, axis=-1), jnp.sum(tok * second, axis=-1)], -1))
  return hidden, unemb, jnp.stack(out, axis=1)


def _packed_logps(model, batch: Batch, tile_size: int):
  """A packed KTO batch (P rows) -> (hidden [P, T, D], unembedding [D, V], target log-probs [2P],
  mismatched log-probs [2P]), both in the rows layout's order [desirable..., undesirable...]; the
  mismatched group takes no gradient."""
  hidden, unemb, lp = _packed_group_logps(model, batch, tile_size, no_grad_groups=(1,))
  return (hidden, unemb, jnp.concatenate([lp[:, 0, 0], lp[:, 0, 1]]),
          jnp.concatenate([lp[:, 1, 0], lp[:, 1, 1]]))


def _forward_hidden(model, batch: Batch) -> jax.Array:
  """Hidden states of either layout: [B, L, D] rows or [P, T, D] packed."""
  if is_packed(batch):
    return model(batch["packed_input_ids"], positions=batch["packed_positions"],
                 segment_ids=batch["packed_segment_ids"])
  return model(batch["input_ids"], batch["attention_mask"])


def _packed_token_count(batch: Batch, branches: int) -> jax.Array:
  """Tokens of the sequences a packed batch stands for (each of a row's ``branches`` counts its
  prompt), so that tokens/s compares with the rows layout."""
  prompts = (batch["steering_position"] + 1).astype(jnp.float32)
  return branches * jnp.sum(prompts) + jnp.sum((batch["label_branch"] >= 0).astype(jnp.float32))


def _concat_pairs(batch: Batch, a: str, b: str):
  """Stack the ``{a}*`` and ``{b}*`` sequence arrays along the batch, padded to a common length."""
  keys = ("input_ids", "attention_mask", "labels", "label_mask")
  la, lb = batch[a + "input_ids"].shape[1], batch[b + "input_ids"].shape[1]
  n = max(la, lb)
  return [jnp.concatenate([_pad_length(batch[a + k], n), _pad_length(batch[b + k], n)]) for k in keys]


def _token_count(batch: Batch, prefixes) -> jax.Array:
  return sum(jnp.sum(batch[p + "attention_mask"]) for p in prefixes)


def make_reference_fn(graphdef_eval, spec: StepSpec) -> Callable:
  """(reference_params, rngs, frozen, batch) -> {"reference_logps": [B], "reference_kl_logps": [B]}:
  the reference model's sequence log-probs of the targets and of the mismatched pairs."""

  def reference_fn(ref_params, rngs, frozen, batch):
    ref = nnx.merge(graphdef_eval, *jax.tree.map(lambda x: x, (ref_params, rngs, frozen)))
    if is_packed(batch):
      _, _, logps, kl_logps = _packed_logps(ref, batch, spec.tile_size)
      return {"reference_logps": logps, "reference_kl_logps": kl_logps}
    ids, mask, labels, lmask = _concat_pairs(batch, "", "kl_")
    _, _, _, logps = _sequence_logps(ref, ids, mask, labels, lmask, spec.tile_size)
    b = batch["input_ids"].shape[0]
    return {"reference_logps": logps[:b], "reference_kl_logps": logps[b:]}

  return reference_fn


def make_loss_fn(graphdef, graphdef_eval, spec: StepSpec, steering_ids: jax.Array | None) -> Callable:
  """-> loss_fn(params, rngs, frozen, ref_params, batch) -> (loss, (metrics, new_rngs)).

  graphdef: the policy in train mode (dropout on); graphdef_eval: the same in eval mode, used for every
  forward that takes no gradient (mismatched pairs, reference).
  """
  tile = spec.tile_size

  def fresh(*trees):
    # Fresh Variable objects at this trace level: dropout advances its RNG counter and nnx.remat writes
    # layer state back, which nnx refuses on Variables created outside the traced function.
    return jax.tree.map(lambda x: x, trees)

  def sft_loss(params, rngs, frozen, ref_params, batch):
    rngs, frozen = fresh(rngs, frozen)
    model = nnx.merge(graphdef, params, rngs, frozen)
    _, _, tok, _ = _sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                   batch["label_mask"], tile)
    loss = L.sft_loss(tok, batch["label_mask"], average=spec.sft_average)
    metrics = {"loss": loss, "tokens": _token_count(batch, [""])}
    return loss, (metrics, nnx.state(model, nnx.RngState))

  def hybrid_loss(params, rngs, frozen, ref_params, batch):
    rngs, frozen, ref_params = fresh(rngs, frozen, ref_params)
    policy = nnx.merge(graphdef, params, rngs, frozen)
    if is_packed(batch):
      # One pass over [prompt | desirable | undesirable | 2 mismatched] per pair; the mismatched
      # log-probs take no gradient (the KTO reference point is a constant).
      hidden, unemb, logps, kl_logps = _packed_logps(policy, batch, tile)
      kl_logps = jax.lax.stop_gradient(kl_logps)
      pairs = batch["packed_input_ids"].shape[0]
      desirable = jnp.arange(2 * pairs) < pairs
      steer_logits = L.steering_logits_from_hidden(hidden, unemb, batch["steering_position"])
      steer = L.steering_kl(steer_logits, steering_ids, batch["target"],
                            renormalize=spec.renormalize)
      tokens = _packed_token_count(batch, branches=4)
    else:
      hidden, unemb, _, logps = _sequence_logps(policy, batch["input_ids"], batch["attention_mask"],
                                                batch["labels"], batch["label_mask"], tile)
      desirable = batch["desirable"].astype(bool)
      steer_logits = L.steering_logits_from_hidden(hidden, unemb, batch["steering_position"])
      steer = L.steering_kl(steer_logits, steering_ids, batch["target"],
                            weights=desirable.astype(jnp.float32), renormalize=spec.renormalize)
      # Mismatched pairs under the current policy: no gradient, so no backward pass over them.
      frozen_policy = nnx.merge(graphdef_eval, *fresh(jax.lax.stop_gradient(params), rngs, frozen))
      _, _, _, kl_logps = _sequence_logps(frozen_policy, batch["kl_input_ids"],
                                          batch["kl_attention_mask"], batch["kl_labels"],
                                          batch["kl_label_mask"], tile)
      tokens = _token_count(batch, ["", "kl_"])
    if spec.reference == "online":
      ref = make_reference_fn(graphdef_eval, spec)(ref_params, rngs, frozen, batch)
    else:
      ref = {k: batch[k] for k in ("reference_logps", "reference_kl_logps")}
    ref = jax.lax.stop_gradient(ref)
    kto = L.kto_loss(logps, ref["reference_logps"], kl_logps, ref["reference_kl_logps"], desirable,
                     beta=spec.beta, desirable_weight=spec.desirable_weight,
                     undesirable_weight=spec.undesirable_weight)
    loss, metrics = L.hybrid_loss(kto, steer, ablation=spec.ablation, kl_weight=spec.kl_weight)
    metrics = dict(metrics)
    metrics.update(kto[1])
    metrics["loss"] = loss
    metrics["tokens"] = tokens
    return loss, (metrics, nnx.state(policy, nnx.RngState))

  def dpo_loss(params, rngs, frozen, ref_params, batch):
    rngs, frozen, ref_params = fresh(rngs, frozen, ref_params)
    policy = nnx.merge(graphdef, params, rngs, frozen)
    ref = nnx.merge(graphdef_eval, *fresh(ref_params, rngs, frozen))
    if is_packed(batch):  # one row per record: [prompt | chosen | rejected]
      pair = lambda lp: jnp.concatenate([lp[:, 0, 0], lp[:, 0, 1]])
      logps = pair(_packed_group_logps(policy, batch, tile)[2])
      ref_logps = pair(_packed_group_logps(ref, batch, tile)[2])
      b = batch["packed_input_ids"].shape[0]
      tokens = _packed_token_count(batch, branches=2)
    else:
      ids, mask, labels, lmask = _concat_pairs(batch, "chosen_", "rejected_")
      _, _, _, logps = _sequence_logps(policy, ids, mask, labels, lmask, tile)
      _, _, _, ref_logps = _sequence_logps(ref, ids, mask, labels, lmask, tile)
      b = batch["chosen_input_ids"].shape[0]
      tokens = _token_count(batch, ["chosen_", "rejected_"])
    ref_logps = jax.lax.stop_gradient(ref_logps)
    loss, metrics = L.dpo_loss(logps[:b], logps[b:], ref_logps[:b], ref_logps[b:], beta=spec.beta,
                               label_smoothing=spec.label_smoothing, ipo=spec.ipo)
    metrics = dict(metrics)
    metrics["loss"] = loss
    metrics["tokens"] = tokens
    return loss, (metrics, nnx.state(policy, nnx.RngState))

  fns = {"sft": sft_loss, "ift": sft_loss, "hybrid": hybrid_loss, "dpo": dpo_loss}
  if spec.kind not in fns:
    raise ValueError(f"unknown step kind {spec.kind!r}; expected one of {sorted(fns)}")
  if spec.kind == "hybrid" and steering_ids is None:
    raise ValueError("the hybrid step needs the steering token ids")
  return fns[spec.kind]


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum: int = 1) -> Callable:
  """-> step(state, frozen, ref_params, batch) -> (state, metrics): one optax update (or one
  micro-step of ``optax.MultiSteps`` when grad_accum > 1)."""

  def step(state: TrainState, frozen, ref_params, batch: Batch):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (metrics, new_rngs)), grads = grad_fn(state.params, state.rngs, frozen, ref_params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["learning_rate"] = current_learning_rate(state.opt_state, schedule, state.step // grad_accum)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rngs=new_rngs), metrics

  return step


def make_eval_fn(loss_fn: Callable, graphdef_eval, spec: StepSpec,
                 steering_ids: jax.Array | None) -> Callable:
  """-> eval(params, rngs, frozen, ref_params, batch) -> metrics (no update): the stage's loss
  metrics and, where the stage has steering tokens, ``steering_mae [B]``: for each row, the mean over
  the K categories of |q_k - p_k|, q the model's exact steering distribution (renormalised over the K
  steering tokens) at the steering position and p the row's target."""

  def eval_fn(params, rngs, frozen, ref_params, batch):
    _, (metrics, _) = loss_fn(params, rngs, frozen, ref_params, batch)
    metrics = dict(metrics)
    if steering_ids is not None and "steering_position" in batch and spec.kind in ("sft", "hybrid"):
      model = nnx.merge(graphdef_eval, *jax.tree.map(lambda x: x, (params, rngs, frozen)))
      hidden = _forward_hidden(model, batch)
      logits = L.steering_logits_from_hidden(hidden, model.unembedding(), batch["steering_position"])
      q = jnp.exp(L.steering_log_probs(logits, steering_ids, renormalize=True))
      metrics["steering_mae"] = jnp.mean(jnp.abs(q - batch["target"]), axis=-1)
    return metrics

  return eval_fn
