"""Stage 2, the method: KTO + steering-token KL, the reference being the stage-1 model.

Packed layout (``data.collate``, one row per pair): one policy forward over [prompt | desirable |
undesirable | two mismatched completions], the prompt computed once for the four sequences, the
mismatched log-probs under ``stop_gradient`` (their label group reads stop_gradient'd hidden
states: no backward pass); the reference forward likewise, or its log-probs cached in the batch
(``hybrid.reference: cached``). Rows layout: a policy forward over the target sequences (with
gradient), one over the mismatched pairs (parameters under ``stop_gradient``), and the reference
forward over both at once. Either way the steering logits are read at the steering position before
the output projection, and ``losses.hybrid_loss`` combines the terms with the configured ablation.
``kl_only`` trains the steering KL alone: it runs no reference model (neither a reference pass in
the step nor a pooled cache before the stage) and reports no KTO rewards.

Layout rule (``hybrid.layout: auto``): packed when the pairs split over the data x fsdp devices and
packing pays on the stage's data (``common.packing_estimate`` of its pairs below
``PACKING_PAYS_BELOW``: the margin covers the longer rows' attention).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from distfair_jax import losses as L
from distfair_jax.config import Ablation, HybridConfig, Layout, Reference, Stage
from distfair_jax.data import batches as B
from distfair_jax.errors import InputError
from distfair_jax import console
from distfair_jax import distributed
from distfair_jax.data import pipeline
from distfair_jax.train import flops as flops_lib
from distfair_jax.train import reference_cache as RC
from distfair_jax.train.stages.common import (StageBase, merge, packed_group_logps,
                                              packed_token_count, rng_state, sequence_logps,
                                              token_count)

__all__ = ["HybridStage", "PACKING_PAYS_BELOW"]

PACKING_PAYS_BELOW = 0.8
# The pooled reference log-probs, kept in the stage directory for a resumed stage.
REFERENCE_LOGPS = "reference_logps.npz"


def _concat(a: B.Sequences, b: B.Sequences) -> B.Sequences:
  """Two sets of sequences stacked along the batch, padded to a common length."""
  n = max(a.input_ids.shape[1], b.input_ids.shape[1])
  pad = lambda x: jnp.pad(x, [(0, 0), (0, n - x.shape[1])])
  return jax.tree.map(lambda x, y: jnp.concatenate([pad(x), pad(y)]), a, b)


def _packed_logps(model, packed: B.Packed, tile_size: int):
  """-> (hidden [P, T, D], unembedding, target log-probs [2P], mismatched log-probs [2P]), both
  in the rows layout's order [desirable..., undesirable...]; the mismatched group has no gradient."""
  hidden, unemb, lp = packed_group_logps(model, packed, tile_size, no_grad_groups=(1,))
  return (hidden, unemb, jnp.concatenate([lp[:, 0, 0], lp[:, 0, 1]]),
          jnp.concatenate([lp[:, 1, 0], lp[:, 1, 1]]))


@dataclasses.dataclass(frozen=True)
class HybridStage(StageBase, name=Stage.hybrid, section="hybrid", records_kind="kto", seed_offset=2,
                  steered=True, batch_types=(B.HybridBatch, B.PackedHybridBatch)):
  cfg: HybridConfig = HybridConfig()

  @property
  def uses_reference(self) -> bool:
    """Whether the loss reads the reference model at all (KTO's rewards; not ``kl_only``)."""
    return self.cfg.ablation != Ablation.kl_only

  @property
  def needs_reference(self) -> bool:  # type: ignore[override]
    """``auto`` counts as online until the loop resolves it (``with_reference``): the larger step."""
    return self.uses_reference and self.cfg.reference != Reference.cached

  @property
  def caches_reference(self) -> bool:  # type: ignore[override]
    return self.uses_reference and self.cfg.reference == Reference.cached

  def with_reference(self, mode: Reference) -> HybridStage:
    return dataclasses.replace(self, cfg=dataclasses.replace(self.cfg, reference=mode))

  # -- the reference: online, or pooled once before the stage ----------------------------------------

  def reference_plan(self, ctx, layout, seed, total):
    """Resolves ``hybrid.reference`` for this stage -> (stage, None or fn(reference params,
    resumed) -> ``reference_cache.PooledCache``: a resumed stage reads the pool's log-probs kept
    in its stage directory where they are this pool's, else they are computed and kept).
    ``cached``: the pool. ``auto``: the pool where its compute (the distinct share of the stage's
    sequences) is at most ``CACHE_PAYS_BELOW`` of the steps' own reference passes (rows layout: all
    of its sequences; packed: the packed / rows compute ratio), online otherwise. The choice reads
    every step, so a resumed stage makes the uninterrupted one's."""
    mode = self.cfg.reference
    if mode == Reference.online or not self.uses_reference:
      return self, None
    name, m = self.name, ctx.model
    pool = self._pool(ctx, seed, total)
    step_cost = 1.0 if layout == "rows" else ctx.packing_ratio(ctx.train_records[self.records_kind])
    what = (f"{len(pool.entries)} distinct sequences of the {pool.seen} its {total} steps hold "
            f"({100 * pool.distinct_share:.1f}%; the {layout} layout's own pass costs "
            f"{100 * step_cost:.0f}% of theirs)")
    if mode == Reference.auto and not RC.pays(pool.distinct_share, step_cost):
      console.log(f"{name}: reference online (auto: {what})")
      return self.with_reference(Reference.online), None
    console.log(f"{name}: reference log-probs computed before the stage, once per distinct "
                f"sequence: {what}")
    tile, buckets = self.tile_size, ctx.encoder.buckets
    fn = jax.jit(lambda params, rngs, frozen, seqs: sequence_logps(
        merge(m.graphdef_eval, params, rngs, frozen), seqs, tile)[3])

    kept = ctx.run.stage_dir(name) / REFERENCE_LOGPS

    def pooled_cache(ref_params, resumed: bool):
      cache = RC.PooledCache.load(pool, kept) if resumed else None
      if not distributed.any_process(cache is None):  # every process read it
        console.log(f"{name}: reference log-probs read from {kept} (computed before the stop)")
        return cache
      cache = RC.PooledCache.compute(pool, lambda seqs: fn(ref_params, ctx.rngs, m.frozen, seqs),
                                     rows=RC.chunk_rows(self.cfg.batch_size), buckets=buckets,
                                     mesh=ctx.mesh, progress=ctx.show_progress,
                                     desc=f"{name}: reference")
      if console.is_main_process():
        cache.save(kept)
      return cache
    return self.with_reference(Reference.cached), pooled_cache

  def _pool(self, ctx, seed, total) -> RC.SequencePool:
    """The stage's distinct sequences: its global batches in the rows layout (the same units per
    step as the training pipeline in either layout), on every process."""
    pipe = pipeline.make_batches(ctx.train_records[self.records_kind], ctx.encoder,
                                 self.records_kind, self.cfg.batch_size, seed=seed,
                                 num_epochs=self.cfg.epochs, layout="rows",
                                 group_by_length=self.cfg.group_by_length, shard_index=0,
                                 shard_count=1, **self.batch_options()).iterator()
    return RC.SequencePool.from_batches((step, next(pipe)) for step in range(total))

  # -- layout --------------------------------------------------------------------------------------

  def batch_options(self) -> dict[str, str]:
    return {"kl_pairs": str(self.cfg.kl_pairs)}

  def layout(self, devices: int, packing_pays: bool = True, batch_size: int | None = None) -> str:
    if self.cfg.layout != Layout.auto:
      return str(self.cfg.layout)
    pairs = (batch_size or self.cfg.batch_size) // 2
    return "packed" if pairs % devices == 0 and packing_pays else "rows"

  def packing_pays(self, ratio) -> bool:
    """``hybrid.layout: auto`` packs when the pairs' packed / rows compute (``ratio()``, the
    run's estimate) is below ``PACKING_PAYS_BELOW``; a set layout is taken as it is."""
    if str(self.cfg.layout) != "auto":
      return True
    return ratio() < PACKING_PAYS_BELOW

  def layout_note(self, layout: str, ratio) -> str | None:
    return (f"{self.name}: batch layout {layout}" + (
        " (one row per pair: the prompt computed once for its four sequences)"
        if layout == "packed" else "") + (f"; estimated packed / rows compute "
                                           f"{ratio():.2f}"
                                           if str(self.cfg.layout) == "auto" else ""))

  def check_batch(self, batch) -> None:
    super().check_batch(batch)
    if isinstance(batch, B.HybridBatch) and batch.rows < 2:
      raise InputError(
          "hybrid: batch_size: expected at least 2 examples per batch: the KTO reference point z0 "
          "is estimated from mismatched pairs (prompt i with the completion of example i+1), which "
          "a batch of one cannot form; use hybrid.batch_size >= 2")

  # -- loss ----------------------------------------------------------------------------------------

  def reference_fn(self, graphdef_eval):
    """-> fn(reference_params, rngs, frozen, batch) -> ReferenceLogps: the reference model's
    sequence log-probs of the targets and of the mismatched pairs."""
    tile = self.tile_size

    def reference_fn(ref_params, rngs, frozen, batch) -> B.ReferenceLogps:
      ref = merge(graphdef_eval, ref_params, rngs, frozen)
      if isinstance(batch, B.PackedHybridBatch):
        _, _, logps, kl_logps = _packed_logps(ref, batch.packed, tile)
        return B.ReferenceLogps(logps, kl_logps)
      _, _, _, logps = sequence_logps(ref, _concat(batch.seq, batch.mismatched), tile)
      b = batch.seq.input_ids.shape[0]
      return B.ReferenceLogps(logps[:b], logps[b:])

    return reference_fn

  def _policy_terms(self, graphdef, graphdef_eval, steering_ids, params, rngs, frozen, batch):
    """-> (policy, target log-probs, mismatched log-probs, desirable mask, steering KL, tokens,
    the targets' token counts)."""
    tile, renormalize = self.tile_size, self.cfg.renormalize
    policy = merge(graphdef, params, rngs, frozen)
    if isinstance(batch, B.PackedHybridBatch):
      # One pass over [prompt | desirable | undesirable | 2 mismatched] per pair; the mismatched
      # log-probs take no gradient (the KTO reference point is a constant).
      hidden, unemb, logps, kl_logps = _packed_logps(policy, batch.packed, tile)
      kl_logps = jax.lax.stop_gradient(kl_logps)
      pairs = batch.packed.input_ids.shape[0]
      desirable = jnp.arange(2 * pairs) < pairs
      steer_logits = L.steering_logits_from_hidden(hidden, unemb, batch.packed.steering_position,
                                                   softcap=policy.logit_softcap)
      steer = L.steering_kl(steer_logits, steering_ids, batch.target, renormalize=renormalize)
      branch = batch.packed.label_branch[:, 0]  # group 0: [desirable | undesirable] per row
      lengths = jnp.concatenate([jnp.sum(branch == 0, -1), jnp.sum(branch == 1, -1)])
      return (policy, logps, kl_logps, desirable, steer, packed_token_count(batch.packed, 4),
              lengths)
    hidden, unemb, _, logps = sequence_logps(policy, batch.seq, tile)
    desirable = batch.desirable.astype(bool)
    steer_logits = L.steering_logits_from_hidden(hidden, unemb, batch.steering_position,
                                                 softcap=policy.logit_softcap)
    steer = L.steering_kl(steer_logits, steering_ids, batch.target,
                          weights=desirable.astype(jnp.float32), renormalize=renormalize)
    lengths = jnp.sum(batch.seq.label_mask, -1)
    if not self.uses_reference:  # kl_only: KTO's reference point is never read
      return policy, logps, None, desirable, steer, token_count(batch.seq), lengths
    # Mismatched pairs under the current policy: no gradient, so no backward pass over them.
    frozen_policy = merge(graphdef_eval, jax.lax.stop_gradient(params), rngs, frozen)
    _, _, _, kl_logps = sequence_logps(frozen_policy, batch.mismatched, tile)
    return (policy, logps, kl_logps, desirable, steer, token_count(batch.seq, batch.mismatched),
            lengths)

  def loss_fn(self, graphdef, graphdef_eval, steering_ids):
    if steering_ids is None:
      raise ValueError("the hybrid step needs the steering token ids")
    c = self.cfg
    reference_fn = self.reference_fn(graphdef_eval)

    def hybrid_loss(params, rngs, frozen, ref_params, batch):
      policy, logps, kl_logps, desirable, steer, tokens, lengths = self._policy_terms(
          graphdef, graphdef_eval, steering_ids, params, rngs, frozen, batch)
      nll = L.desirable_nll(logps, lengths, desirable) if c.nll_weight else None
      weights = dict(ablation=str(c.ablation), kl_weight=c.kl_weight, nll=nll,
                     nll_weight=c.nll_weight)
      if not self.uses_reference:  # kl_only: the steering KL alone, no reference model
        loss, metrics = L.hybrid_loss(None, steer, **weights)
        return loss, ({**metrics, "tokens": tokens}, rng_state(policy))
      if self.caches_reference:
        if batch.reference is None:
          raise ValueError("hybrid.reference cached: the batch carries no reference log-probs")
        ref = batch.reference
      else:
        ref = reference_fn(ref_params, rngs, frozen, batch)
      ref = jax.lax.stop_gradient(ref)
      kto = L.kto_loss(logps, ref.targets, kl_logps, ref.mismatched, desirable, beta=c.beta,
                       desirable_weight=c.desirable_weight,
                       undesirable_weight=c.undesirable_weight)
      loss, metrics = L.hybrid_loss(kto, steer, **weights)
      metrics = {**metrics, **kto[1], "loss": loss, "tokens": tokens}
      return loss, (metrics, rng_state(policy))

    return hybrid_loss

  # -- sizes ---------------------------------------------------------------------------------------

  def flops(self, model_cfg, batch, processes: int = 1) -> float:
    online = self.needs_reference
    if isinstance(batch, B.PackedHybridBatch):
      p = batch.packed
      rows, length = p.input_ids.shape
      r, g, n = p.label_ids.shape
      body, labels = flops_lib.packed_flops(model_cfg, rows * processes, length,
                                            r * g * processes, n)
      ref = (body + labels) if online else 0.0
      # labels: half targets (with gradient, 3x), half mismatched (1x)
      return 3 * body + 3 * labels / 2 + labels / 2 + ref
    f = lambda s: flops_lib.sequence_flops(model_cfg, s.input_ids.shape[0] * processes,
                                           s.input_ids.shape[1])
    ref = (f(batch.seq) + f(batch.mismatched)) if online else 0.0
    mismatched = f(batch.mismatched) if self.uses_reference else 0.0
    return 3 * f(batch.seq) + mismatched + ref

  def abstract_batch(self, length: int, num_categories: int, layout: str):
    b = self.cfg.batch_size
    if layout == "packed":
      return B.PackedHybridBatch.abstract(b // 2, length, num_categories, self.caches_reference)
    return B.HybridBatch.abstract(b, length, num_categories, self.caches_reference)
