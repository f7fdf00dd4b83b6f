"""What the stages share: the stage interface, log-prob helpers over both layouts, token counts.

Every loss function has the signature ``loss_fn(params, rngs, frozen, ref_params, batch) ->
(loss, (metrics, new_rngs))``: it merges the model from ``(graphdef, params, rngs, frozen)``
inside the traced function (the model object never crosses ``jax.jit``; ``nnx.merge(...,
copy=True)`` gives fresh Variables at the trace level, which dropout and ``nnx.remat`` write to),
and computes per-token log-probabilities tiled over the vocabulary
(``losses.token_logps_from_hidden``: the ``[batch, length, vocab]`` float32 logits never exist),
soft-capped as the model's logits are (``model.logit_softcap``, Gemma 2).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from distfair_jax import losses as L
from distfair_jax.config import Stage
from distfair_jax.data import batches as B
from distfair_jax.data import collate as collate_lib
from distfair_jax.data import tokenize
from distfair_jax.errors import InputError

__all__ = ["StageBase", "merge", "rng_state", "sequence_logps", "packed_group_logps", "forward_hidden",
           "token_count", "packed_token_count", "steering_mae_fn"]

LossFn = Callable[..., Any]


def merge(graphdef, *states) -> nnx.Module:
  """The model from its split, with fresh Variables (safe to mutate inside a traced function)."""
  return nnx.merge(graphdef, *states, copy=True)


def rng_state(model) -> nnx.State:
  """The model's RNG state after a forward (dropout advances its counter)."""
  return nnx.state(model, nnx.RngState)


def sequence_logps(model, seq: B.Sequences, tile_size: int):
  """-> (hidden [B, L, D], unembedding [D, V], token log-probs [B, L], sequence log-probs [B])."""
  hidden = model(seq.input_ids, seq.attention_mask)
  unemb = model.unembedding()
  tok = L.token_logps_from_hidden(hidden, unemb, seq.labels, seq.label_mask, tile_size,
                                  softcap=model.logit_softcap)
  return hidden, unemb, tok, L.sequence_logps(tok, seq.label_mask)


def forward_hidden(model, batch) -> jax.Array:
  """Hidden states of a batch of either layout: [B, L, D] rows or [R, T, D] packed."""
  packed = getattr(batch, "packed", None)
  if packed is not None:
    return model(packed.input_ids, positions=packed.positions, segment_ids=packed.segment_ids)
  seq = batch.seq
  return model(seq.input_ids, seq.attention_mask)


def packed_group_logps(model, packed: B.Packed, tile_size: int, no_grad_groups=()):
  """A packed batch (R rows, G label groups of two branches) -> (hidden [R, T, D], unembedding
  [D, V], log-probs [R, G, 2]: entry [r, g, k] sums the labels of branch 2g + k of row r).

  One forward over the packed rows; each label group gathers the hidden states that predict its
  labels. Groups in ``no_grad_groups`` read the hidden states and the output projection under
  ``stop_gradient``, so their tiled log-probs have no backward pass at all.
  """
  hidden = model(packed.input_ids, positions=packed.positions, segment_ids=packed.segment_ids)
  unemb = model.unembedding()
  branch = packed.label_branch  # [R, G, N]
  out = []
  for g in range(branch.shape[1]):
    src = jnp.take_along_axis(hidden, packed.label_source[:, g, :, None], axis=1)  # [R, N, D]
    w = unemb
    if g in no_grad_groups:
      src, w = jax.lax.stop_gradient(src), jax.lax.stop_gradient(unemb)
    mask = (branch[:, g] >= 0).astype(jnp.float32)
    tok = L.token_logps_from_hidden(src, w, packed.label_ids[:, g], mask, tile_size,
                                    softcap=model.logit_softcap) * mask
    first = (branch[:, g] == 2 * g).astype(jnp.float32)
    second = (branch[:, g] == 2 * g + 1).astype(jnp.float32)
    out.append(jnp.stack([jnp.sum(tok * first, axis=-1), jnp.sum(tok * second, axis=-1)], -1))
  return hidden, unemb, jnp.stack(out, axis=1)


def token_count(*seqs: B.Sequences) -> jax.Array:
  """Real tokens of rows-layout sequences."""
  return sum(jnp.sum(s.attention_mask) for s in seqs)


def packed_token_count(packed: B.Packed, branches: int) -> jax.Array:
  """Tokens of the sequences a packed batch stands for (each of a row's ``branches`` counts its
  prompt), so that tokens/s compares with the rows layout."""
  prompts = (packed.steering_position + 1).astype(jnp.float32)
  return branches * jnp.sum(prompts) + jnp.sum((packed.label_branch >= 0).astype(jnp.float32))


def steering_mae_fn(graphdef_eval, steering_ids) -> Callable:
  """-> fn(params, rngs, frozen, batch) -> [rows]: for each row, the mean over the K categories of
  |q_k - p_k|, q the model's exact steering distribution (renormalised over the K steering tokens)
  at the steering position and p the row's target."""

  def fn(params, rngs, frozen, batch):
    model = merge(graphdef_eval, params, rngs, frozen)
    hidden = forward_hidden(model, batch)
    position = batch.packed.steering_position if hasattr(batch, "packed") else \
        batch.steering_position
    logits = L.steering_logits_from_hidden(hidden, model.unembedding(), position,
                                           softcap=model.logit_softcap)
    q = jnp.exp(L.steering_log_probs(logits, steering_ids, renormalize=True))
    return jnp.mean(jnp.abs(q - batch.target), axis=-1)

  return fn


_ESTIMATE_RECORDS = 512  # the first 256 pairs size the layout


def packing_estimate(records: Sequence[dict], encoder: tokenize.Encoder) -> float:
  """Estimated packed / rows compute on the stage's first pairs (``tokenize.packed_cost_ratio``)."""
  pairs = tokenize.pair_records(records[:_ESTIMATE_RECORDS])
  return tokenize.packed_cost_ratio(
      [tuple(encoder.encode_record(r, "kto") for r in pair) for pair in pairs])


@dataclasses.dataclass(frozen=True)
class StageBase:
  """A training stage: its section config (frozen: the stage's static spec, part of the compiled
  program), the layout rule, the loss, the FLOP count and the typed batch it takes.

  Subclasses set the class attributes below as class keywords (``class HybridStage(StageBase,
  name="hybrid", ...)``) and implement ``loss_fn``, ``flops`` and ``abstract_batch``.
  """
  cfg: Any
  tile_size: int = L.DEFAULT_TILE_SIZE

  name: ClassVar[str] = ""           # the stage: a ``config.Stage`` choice, kept as its plain str
  section: ClassVar[str] = ""        # the config section that holds ``cfg``
  records_kind: ClassVar[str] = ""   # the records it trains on, and the data pipeline's kind
  seed_offset: ClassVar[int] = 0     # added to ``data.seed`` for its shuffle
  steered: ClassVar[bool] = False    # trains steering tokens (held-out steering MAE)
  needs_reference: ClassVar[bool] = False  # the step takes the reference model's parameters
  caches_reference: ClassVar[bool] = False  # reference log-probs computed once, in the batches
  batch_types: ClassVar[tuple] = ()

  def __init_subclass__(cls, **attributes):
    super().__init_subclass__()
    for key, value in attributes.items():
      if key not in StageBase.__annotations__ or key in ("cfg", "tile_size"):
        raise TypeError(f"{cls.__name__}: {key} is not a stage attribute")
      setattr(cls, key, Stage(value).value if key == "name" else value)

  def layout(self, devices: int, packing_pays: bool = True, batch_size: int | None = None) -> str:
    """``rows`` or ``packed`` for a batch of ``batch_size`` sequences (default: the stage's) split
    over ``devices`` (data x fsdp); ``packing_pays``: the data's estimate."""
    return "rows"

  def packing_pays(self, ratio: Callable[[], float]) -> bool:
    """Whether the packed layout pays for this stage; ``ratio()``: the run's estimated packed /
    rows compute (``packing_estimate``), computed only when a stage asks."""
    return True

  def layout_note(self, layout: str, ratio: Callable[[], float]) -> str | None:
    """A line for the log about the batch layout chosen (None: nothing to say)."""
    return None

  def reference_plan(self, ctx, layout: str, seed: int, total: int):
    """-> (the stage to train, None or fn(reference params) -> a pooled reference cache): how the
    stage gets its reference model's log-probs (``HybridStage``: online or pooled; the others
    need none)."""
    return self, None

  def batch_options(self) -> dict[str, str]:
    """Extra options of this stage's data pipeline (``pipeline.make_batches``)."""
    return {}

  def batch_multiple(self, layout: str, devices: int) -> int:
    """A global batch must hold a multiple of this many sequences: its rows split over the
    ``devices`` (data x fsdp)."""
    return devices * collate_lib.sequences_per_row(self.records_kind, layout)

  def check_batch_size(self, layout: str, devices: int, batch_size: int | None = None) -> None:
    """InputError unless the global batch's rows split over ``devices`` (data x fsdp)."""
    b = batch_size or self.cfg.batch_size
    multiple = self.batch_multiple(layout, devices)
    if b % multiple:
      why = (" (packed layout: one row per pair, so 2 x data*fsdp; or set hybrid.layout: rows)"
             if multiple != devices else " (data x fsdp devices)")
      raise InputError(f"{self.name}: batch_size: expected a multiple of {multiple}{why}, got {b}")

  def check_batch(self, batch) -> None:
    """Refuse a batch the step cannot use, with the reason (before anything is compiled)."""
    if not isinstance(batch, self.batch_types):
      raise InputError(f"{self.name}: batch: expected one of "
                       f"{', '.join(t.__name__ for t in self.batch_types)}, got "
                       f"{type(batch).__name__}")

  def loss_fn(self, graphdef, graphdef_eval, steering_ids) -> LossFn:
    """-> loss_fn(params, rngs, frozen, ref_params, batch) -> (loss, (metrics, new_rngs)).
    graphdef: the policy in train mode (dropout on); graphdef_eval: the same in eval mode, for
    every forward that takes no gradient (mismatched pairs, reference)."""
    raise NotImplementedError

  def flops(self, model_cfg, batch, processes: int = 1) -> float:
    """FLOPs of one step on ``batch`` (a process's rows; ``processes`` of them make the global
    batch). See ``train.flops``."""
    raise NotImplementedError

  def abstract_batch(self, length: int, num_categories: int, layout: str):
    """The global batch of sequences of ``length`` tokens (its worst case), as ShapeDtypeStructs."""
    raise NotImplementedError
