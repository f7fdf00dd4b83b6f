"""The training recipe: stages (SFT then hybrid; or IFT then DPO), checkpoints, metrics, resume.

``train(cfg)`` runs ``cfg.stages`` in order under ``cfg.run_dir``::

    run_dir/
      config.yaml            the resolved config (a rerun with a different one is refused)
      tokenizer/             the tokenizer used (built-in tiny one, or a copy)
      metrics.jsonl          one row per logged step and per evaluation
      tensorboard/           event files
      <stage>/checkpoints/   orbax checkpoints (state, data iterator, config), keep-N
      <stage>/final/         trainable params at the end of the stage + summary.json (stage done)

Each stage starts from the previous stage's final parameters (the first from the base model) and, for
``hybrid`` and ``dpo``, uses them frozen as the reference. A rerun of the same command skips finished
stages and resumes an unfinished one from its latest complete checkpoint, with the data iterator
restored, so it ends with the same parameters and metrics as an uninterrupted run.

SIGTERM (TPU preemption) saves a checkpoint at the next step boundary and exits with code 143; a
non-finite loss stops the run (``TrainingError``) without saving the bad state, so the latest
checkpoint is the last good one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from distfair_jax import checkpoint_io
from distfair_jax import sharding as shd
from distfair_jax.config import Config, config_to_dict
from distfair_jax.errors import InputError
from distfair_jax.model import lora as lora_lib
from distfair_jax.train import flops as flops_lib
from distfair_jax.train.checkpoint import StageCheckpointer, abstract_like
from distfair_jax.train.state import init_train_state, make_optimizer, split_model
from distfair_jax.train.step import (StepSpec, check_batch, make_eval_fn, make_loss_fn,
                                     make_reference_fn, make_train_step)
from distfair_jax.train.writer import MetricsWriter

__all__ = ["train", "Trainer", "TrainingError", "Preempted", "STAGE_KINDS", "batch_layout"]

# stage name -> (data pipeline kind, records key, settings section of Config)
STAGE_KINDS = {"sft": ("sft", "sft", "sft"), "ift": ("ift", "ift", "sft"),
               "hybrid": ("kto", "kto", "hybrid"), "dpo": ("dpo", "dpo", "dpo")}
FINAL = "final"
SUMMARY = "summary.json"
PREEMPTED_EXIT_CODE = 143


class TrainingError(RuntimeError):
  """Training cannot go on (a non-finite loss, for one); the message says what and where."""


class Preempted(SystemExit):
  """Raised after SIGTERM once the checkpoint is saved; exits the process with code 143."""

  def __init__(self, message: str):
    super().__init__(PREEMPTED_EXIT_CODE)
    self.message = message


def batch_layout(cfg: Config, stage: str, batch_size: int, batch_devices: int,
                 packing_pays: bool = True) -> str:
  """The batch layout of ``stage`` (rows or packed), ``auto`` resolved. DPO: packed (one row per
  record either way, so never more tokens). Hybrid: packed when the pairs split over the
  ``batch_devices`` (data x fsdp) and ``packing_pays`` (the data's estimate; see
  ``Trainer.hybrid_layout``)."""
  if stage == "dpo":
    return "rows" if cfg.dpo.layout == "rows" else "packed"
  if stage != "hybrid":
    return "rows"
  if cfg.hybrid.layout != "auto":
    return cfg.hybrid.layout
  return "packed" if (batch_size // 2) % batch_devices == 0 and packing_pays else "rows"


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


def _comparable(cfg_dict: dict) -> dict:
  """The parts of a config that change a run's results (not logging or checkpoint cadence)."""
  d = json.loads(json.dumps(cfg_dict))
  for key in ("logging", "checkpoint", "run_dir"):  # a run directory may be moved
    d.pop(key, None)
  d.get("eval", {}).pop("every_steps", None)
  return d


class _SigtermFlag:
  """Sets a flag on SIGTERM (restored on exit); the loop checks it at each step boundary."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: preemption handling is the caller's job
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


class Trainer:
  """Holds what the stages share: mesh, model split, tokenizer, data, writer.

  records: optional ``{kind: [record, ...]}`` to train on instead of building ``cfg.data.dataset``
  (the demo uses it for the biased base model); kinds sft, kto, ift, dpo.
  """

  def __init__(self, cfg: Config, *, records: dict[str, list[dict]] | None = None,
               base_params: str | None = None):
    self.cfg = cfg
    self._packed_cost_ratio: float | None = None  # hybrid.layout auto, estimated once
    # orbax needs absolute paths (bucket URLs pass through)
    self.run_dir = cfg.run_dir if "://" in cfg.run_dir else os.path.abspath(cfg.run_dir)
    os.makedirs(self.run_dir, exist_ok=True)
    self._check_config()
    self.mesh = shd.make_mesh(dataclasses.asdict(cfg.mesh))
    self.writer = MetricsWriter(self.run_dir, tensorboard=cfg.logging.tensorboard,
                                enabled=jax.process_index() == 0)
    self._setup_data(records)
    self._setup_model(base_params)

  # ---------------------------------------------------------------------------------------------
  # setup

  def _check_config(self) -> None:
    path = os.path.join(self.run_dir, "config.yaml")
    import yaml
    current = config_to_dict(self.cfg)
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        previous = yaml.safe_load(f)
      if _comparable(previous) != _comparable(current):
        diff = sorted(k for k in set(_flat(_comparable(previous))) | set(_flat(_comparable(current)))
                      if _flat(_comparable(previous)).get(k) != _flat(_comparable(current)).get(k))
        raise InputError(f"{path}: this run directory holds a run with a different config "
                         f"(differs in {', '.join(diff[:5])}); use another run_dir to start a new run")
    if jax.process_index() == 0:
      tmp = path + ".tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(current, f, sort_keys=False)
      os.replace(tmp, path)

  def _setup_data(self, records) -> None:
    from distfair_jax.data import build as build_lib
    dcfg = self.cfg.data
    if records is None:
      if dcfg.records_dir:
        records = build_lib.read_dataset(dcfg.records_dir)
        spec = build_lib.resolve_spec(_manifest_dataset(dcfg.records_dir))
      else:
        spec = build_lib.resolve_spec(dcfg.spec or dcfg.dataset)
        ds = build_lib.build_dataset(spec, rows_per_occupation=dcfg.rows_per_occupation,
                                     test_rounds=0, seed=dcfg.seed,
                                     stories_per_occupation=(dcfg.rows_per_occupation
                                                             if dcfg.stories else 0))
        records = ds.records
    else:
      spec = build_lib.resolve_spec(dcfg.spec or dcfg.dataset)
    self.spec = spec
    self.attribute = spec.attribute
    self.train_records: dict[str, list[dict]] = {}
    self.heldout_records: dict[str, list[dict]] = {}
    for kind, rows in records.items():
      if kind.startswith("test_"):
        continue
      train, heldout = split_heldout(rows, dcfg.heldout_fraction, seed=dcfg.seed)
      self.train_records[kind], self.heldout_records[kind] = train, heldout

  def _setup_model(self, base_params: str | None) -> None:
    from distfair_jax.model.llama import Llama
    from distfair_jax import tokenizer as tokenizer_lib
    mcfg_run = self.cfg.model
    if mcfg_run.checkpoint:
      from distfair_jax import convert
      if mcfg_run.overrides:
        raise InputError(f"model.overrides: expected none with model.checkpoint (the checkpoint "
                         f"fixes the shapes), got {dict(mcfg_run.overrides)}")
      mcfg = convert.load_model_config(mcfg_run.checkpoint)
      tok_src = mcfg_run.tokenizer or mcfg_run.checkpoint
      params_dir = base_params or os.path.join(mcfg_run.checkpoint, convert.PARAMS_DIR)
    else:
      from distfair_jax.model import presets
      mcfg = presets.get_preset(mcfg_run.preset, **dict(mcfg_run.overrides))
      tok_src = mcfg_run.tokenizer
      params_dir = base_params
    mcfg = mcfg.replace(dtype=mcfg_run.dtype, param_dtype=mcfg_run.param_dtype, remat=mcfg_run.remat)
    self.model_config = mcfg
    self.tokenizer = self._load_tokenizer(tok_src, tokenizer_lib)
    if len(self.tokenizer) > mcfg.vocab_size:
      raise InputError(f"{tok_src or 'tokenizer'}: vocab: the tokenizer has {len(self.tokenizer)} "
                       f"tokens but the model's vocab_size is {mcfg.vocab_size}")
    factory = lambda: Llama(mcfg, rngs=nnx.Rngs(self.cfg.seed))
    if params_dir:
      abstract = nnx.eval_shape(factory)
      gdef, abs_params, rest = nnx.split(abstract, nnx.Param, ...)
      shardings = shd.state_shardings(abs_params, self.mesh)
      pure = checkpoint_io.load_params(params_dir, nnx.to_pure_dict(abs_params),
                                       sharding=nnx.to_pure_dict(shardings))
      nnx.replace_by_pure_dict(abs_params, pure)
      model = nnx.merge(gdef, abs_params, rest)
    else:
      model = shd.create_sharded(factory, self.mesh)
    lcfg = self.cfg.lora
    if lcfg.enabled:
      lora_lib.apply_lora(model, lcfg.targets, rank=lcfg.rank, alpha=lcfg.alpha,
                          dropout=lcfg.dropout, seed=self.cfg.seed)
      nnx.update(model, shd.shard_state(nnx.state(model), self.mesh))
    self.model = model
    graphdef, params, rngs, frozen = split_model(model, lcfg.enabled)
    model.eval()  # dropout off: the graph of every forward that takes no gradient
    self.graphdef_eval = split_model(model, lcfg.enabled)[0]
    model.train()
    self.graphdef = graphdef
    self.base_params = params  # the stage chain's starting point
    self.rngs = rngs
    self.frozen = frozen
    self.param_shardings = shd.state_shardings(params, self.mesh)
    self.frozen_shardings = shd.state_shardings(frozen, self.mesh)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    n_train = sum(x.size for x in jax.tree.leaves(params))
    self.n_params, self.n_trainable = int(n_params), int(n_train)
    frac = shd.replicated_fraction(nnx.state(model, nnx.Param))
    sizes = dict(self.mesh.shape)
    if (sizes.get("fsdp", 1) > 1 or sizes.get("tensor", 1) > 1) and frac > 0.1:
      raise TrainingError(f"{frac:.0%} of the parameters are replicated on a mesh with fsdp="
                          f"{sizes.get('fsdp')} tensor={sizes.get('tensor')}: the sharding rules do "
                          f"not fit this model's shapes")
    from distfair_jax.data.tokenize import steering_token_ids
    self.steering_ids = jnp.asarray(
        steering_token_ids(self.attribute, self.tokenizer, prompt_format=self.cfg.data.prompt_format),
        jnp.int32)
    _log(f"model: {mcfg_run.checkpoint or mcfg_run.preset}, {self.n_params / 1e6:.1f}M params, "
         f"{self.n_trainable / 1e6:.3f}M trainable{' (LoRA)' if lcfg.enabled else ''}; mesh "
         f"{dict(self.mesh.shape)}; replicated {frac:.1%}")

  def _load_tokenizer(self, src: str | None, tokenizer_lib):
    from transformers import AutoTokenizer
    if src:
      return AutoTokenizer.from_pretrained(src)
    path = os.path.join(self.run_dir, "tokenizer")
    if os.path.exists(os.path.join(path, "tokenizer.json")):
      return AutoTokenizer.from_pretrained(path)
    tok = tokenizer_lib.build_tiny_tokenizer()
    if jax.process_index() == 0:
      tok.save_pretrained(path)
    return tok

  # ---------------------------------------------------------------------------------------------
  # stages

  def stage_dir(self, name: str) -> str:
    return os.path.join(self.run_dir, name)

  def stage_done(self, name: str) -> bool:
    return os.path.exists(os.path.join(self.stage_dir(name), FINAL, SUMMARY))

  def load_final(self, name: str):
    """Trainable params at the end of stage ``name``, placed like the policy params."""
    pure = checkpoint_io.load_params(os.path.join(self.stage_dir(name), FINAL, "params"),
                                     nnx.to_pure_dict(self.base_params),
                                     sharding=nnx.to_pure_dict(self.param_shardings))
    params = jax.tree.map(lambda x: x, self.base_params)
    nnx.replace_by_pure_dict(params, pure)
    return params

  def run(self) -> dict[str, Any]:
    """Runs every configured stage (skipping finished ones); returns their summaries."""
    summaries = {}
    params = self.base_params
    with _SigtermFlag() as sigterm:
      for name in self.cfg.stages:
        if self.stage_done(name):
          _log(f"{name}: done already, loading its final parameters")
          params = self.load_final(name)
          with open(os.path.join(self.stage_dir(name), FINAL, SUMMARY), encoding="utf-8") as f:
            summaries[name] = json.load(f)
          continue
        params, summaries[name] = self.run_stage(name, params, sigterm)
    self.writer.close()
    self.final_params = params
    return summaries

  def stage_spec(self, name: str) -> StepSpec:
    kind = STAGE_KINDS[name][0]
    if name == "hybrid":
      h = self.cfg.hybrid
      return StepSpec(kind="hybrid", beta=h.beta, desirable_weight=h.desirable_weight,
                      undesirable_weight=h.undesirable_weight, kl_weight=h.kl_weight,
                      ablation=h.ablation, renormalize=h.renormalize, reference=h.reference)
    if name == "dpo":
      d = self.cfg.dpo
      return StepSpec(kind="dpo", beta=d.beta, label_smoothing=d.label_smoothing, ipo=d.ipo)
    return StepSpec(kind=kind, sft_average=self.cfg.sft.average)

  def make_batches(self, name: str, records: list[dict], batch_size: int, epochs: int, seed: int):
    from distfair_jax.data import pipeline
    kind = STAGE_KINDS[name][0]
    d = self.cfg.data
    layout = self.hybrid_layout(batch_size) if name == "hybrid" else batch_layout(
        self.cfg, name, batch_size, 1)
    return pipeline.make_batches(records, self.tokenizer, kind, batch_size, seed=seed,
                                 num_epochs=epochs, max_length=d.max_length,
                                 max_prompt_length=d.max_prompt_length,
                                 prompt_format=d.prompt_format, attribute=self.attribute,
                                 layout=layout)

  def hybrid_layout(self, batch_size: int) -> str:
    """``hybrid.layout``, with ``auto`` resolved: packed when the pairs split over data x fsdp and
    the stage's data make it cheaper (``tokenize.packed_cost_ratio`` < 0.8: the margin covers the
    longer rows' attention)."""
    div = self.mesh.shape.get("data", 1) * self.mesh.shape.get("fsdp", 1)
    pays = self.cfg.hybrid.layout != "auto" or self._packed_cost() < 0.8
    return batch_layout(self.cfg, "hybrid", batch_size, div, packing_pays=pays)

  def _packed_cost(self) -> float:
    """``tokenize.packed_cost_ratio`` of the first 256 hybrid training pairs (computed once)."""
    if self._packed_cost_ratio is None:
      from distfair_jax.data import tokenize
      d = self.cfg.data
      enc = tokenize.Encoder(self.tokenizer, prompt_format=d.prompt_format,
                             max_length=d.max_length, max_prompt_length=d.max_prompt_length)
      pairs = tokenize.pair_records(self.train_records[STAGE_KINDS["hybrid"][1]][:512])
      examples = [tuple(enc.encode_record(r, "kto") for r in pair) for pair in pairs]
      self._packed_cost_ratio = tokenize.packed_cost_ratio(examples)
    return self._packed_cost_ratio

  def _batch_rows_multiple(self, name: str, batch_size: int) -> int:
    """Sequences per batch must be a multiple of this: data * fsdp devices, times 2 for a packed
    hybrid batch (one row per desirable / undesirable pair)."""
    div = self.mesh.shape.get("data", 1) * self.mesh.shape.get("fsdp", 1)
    return div * 2 if name == "hybrid" and self.hybrid_layout(batch_size) == "packed" else div

  def run_stage(self, name: str, init_params, sigterm: _SigtermFlag):
    """Trains stage ``name`` from ``init_params``; returns (final params, summary)."""
    scfg = getattr(self.cfg, STAGE_KINDS[name][2])
    records = self.train_records[STAGE_KINDS[name][1]]
    spec = self.stage_spec(name)
    seed = self.cfg.data.seed + {"sft": 1, "ift": 1, "hybrid": 2, "dpo": 3}[name]
    multiple = self._batch_rows_multiple(name, scfg.batch_size)
    if scfg.batch_size % multiple:
      why = (" (hybrid.layout packed: one row per pair, so 2 x data*fsdp; or set hybrid.layout: rows)"
             if multiple != self.mesh.shape.get("data", 1) * self.mesh.shape.get("fsdp", 1) else
             " (data x fsdp devices)")
      raise InputError(f"{name}: batch_size: expected a multiple of {multiple}{why}, got "
                       f"{scfg.batch_size}")
    if spec.kind == "hybrid":
      layout = self.hybrid_layout(scfg.batch_size)
      _log(f"{name}: batch layout {layout}" + (
          " (one row per pair: the prompt computed once for its four sequences)"
          if layout == "packed" else "") + (f"; estimated packed / rows compute "
                                              f"{self._packed_cost():.2f}"
                                              if self.cfg.hybrid.layout == "auto" else ""))
    pipe = self.make_batches(name, records, scfg.batch_size, scfg.epochs, seed)
    total = pipe.num_steps if not scfg.max_steps else min(scfg.max_steps, pipe.num_steps)
    if total < 1:
      raise InputError(f"{name}: batch_size: {scfg.batch_size} is larger than the stage's "
                       f"{len(records)} training records")
    accum = scfg.optim.grad_accum
    tx, schedule = make_optimizer(scfg.optim, max(1, total // accum))
    needs_ref = spec.needs_reference_params
    ref_params = init_params if (needs_ref or spec.kind == "hybrid") else None

    loss_fn = make_loss_fn(self.graphdef, self.graphdef_eval, spec, self.steering_ids)
    step_fn = make_train_step(loss_fn, tx, schedule, accum)
    eval_fn = make_eval_fn(loss_fn, self.graphdef_eval, spec, self.steering_ids)

    # Copy the initial params: the state is donated to the step, the reference must survive it.
    params = jax.tree.map(jnp.copy, init_params)
    state = init_train_state(tx, params, self.rngs, self.mesh)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    ckpt = StageCheckpointer(os.path.join(self.stage_dir(name), "checkpoints"),
                             keep=self.cfg.checkpoint.keep,
                             every_steps=self.cfg.checkpoint.every_steps,
                             async_save=self.cfg.checkpoint.async_save)
    start = 0
    latest = ckpt.latest_step()
    data_state = None
    if latest is not None:
      state, data_state = ckpt.restore(latest, abstract_like(state))
      start = latest
      self.writer.truncate_after(name, start)
      _log(f"{name}: resuming from step {start} of {total}")

    ref_for_step = ref_params if needs_ref else None
    cached = None
    if spec.kind == "hybrid" and spec.reference == "cached":
      cached = self._reference_cache(name, spec, ref_params, scfg, seed, start, total)
      ref_for_step = None
    batches = pipe.iterator(data_state)
    jit_step = jax.jit(step_fn, donate_argnums=(0,),
                       out_shardings=(state_shardings, None))
    jit_eval = jax.jit(eval_fn)
    config_dict = config_to_dict(self.cfg)

    def device_batch(batch, step):
      if cached is not None:
        batch = dict(batch, **cached[step])
      return shd.put_batch(batch, self.mesh)

    progress = tqdm(total=total, initial=start, desc=name, unit="step", dynamic_ncols=True,
                    disable=not self.cfg.logging.progress or jax.process_index() != 0)
    last_metrics: dict[str, float] = {}
    step = start
    compiled_steps: dict = {}  # batch shapes -> AOT-compiled step (one per length bucket)
    try:
      while step < total:
        if sigterm.requested:
          ckpt.save(step, state, batches.get_state(), config_dict)
          ckpt.close()
          progress.close()
          msg = (f"{name}: SIGTERM: checkpoint saved at step {step} in {self.stage_dir(name)}; "
                 f"rerun the same command to resume")
          _log(msg)
          raise Preempted(msg)
        host_batch = next(batches)
        check_batch(spec, host_batch)
        batch = device_batch(host_batch, step)
        shape_key = tuple(sorted((k, v.shape) for k, v in batch.items()))
        if shape_key not in compiled_steps:
          compiled = jit_step.lower(state, self.frozen, ref_for_step, batch).compile()
          if not compiled_steps:
            self._report_memory(name, compiled)
          compiled_steps[shape_key] = compiled
        t0 = time.perf_counter()
        state, metrics = compiled_steps[shape_key](state, self.frozen, ref_for_step, batch)
        metrics = jax.device_get(metrics)
        dt = time.perf_counter() - t0
        step += 1
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
          ckpt.wait()
          last = ckpt.latest_step()
          raise TrainingError(
              f"{name}: non-finite loss ({loss}) at step {step}; stopped without saving this state; "
              f"the last good checkpoint is "
              f"{'step ' + str(last) if last is not None else 'none (none was saved yet)'} in "
              f"{os.path.join(self.stage_dir(name), 'checkpoints')}; lower the learning rate or check "
              f"the data")
        last_metrics = self._step_metrics(spec, metrics, host_batch, dt)
        if step % self.cfg.logging.every_steps == 0 or step == total:
          self.writer.write(name, step, last_metrics)
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}")
        if self.cfg.eval.every_steps and step % self.cfg.eval.every_steps == 0 and step < total:
          self.evaluate(name, spec, jit_eval, state, ref_params, step)
        if ckpt.should_save(step):
          ckpt.save(step, state, batches.get_state(), config_dict)
    finally:
      progress.close()
    eval_metrics = self.evaluate(name, spec, jit_eval, state, ref_params, step)
    ckpt.save(step, state, batches.get_state(), config_dict)
    ckpt.close()
    summary = {"stage": name, "steps": step, "train": last_metrics, "eval": eval_metrics}
    self._save_final(name, state.params, summary)
    self.rngs = state.rngs
    return state.params, summary

  def _reference_cache(self, name, spec, ref_params, scfg, seed, start, total):
    """Reference log-probs of every remaining step's batch, computed once up front."""
    ref_fn = jax.jit(make_reference_fn(self.graphdef_eval, spec))
    batches = self.make_batches(name, self.train_records[STAGE_KINDS[name][1]], scfg.batch_size,
                                scfg.epochs, seed).iterator()
    cache = {}
    for step in tqdm(range(total), desc=f"{name}: reference", unit="step",
                     disable=not self.cfg.logging.progress or jax.process_index() != 0):
      batch = next(batches)
      if step < start:
        continue
      out = ref_fn(ref_params, self.rngs, self.frozen, shd.put_batch(batch, self.mesh))
      cache[step] = {k: np.asarray(jax.device_get(v)) for k, v in out.items()}
    return cache

  def _step_metrics(self, spec: StepSpec, metrics, batch, dt: float) -> dict[str, float]:
    out = {k: float(np.asarray(v)) for k, v in metrics.items() if np.ndim(v) == 0}
    n_dev = self.mesh.size
    tokens = {}
    for key, prefix in (("target", ""), ("kl", "kl_"), ("chosen", "chosen_"),
                        ("rejected", "rejected_"), ("packed", "packed_")):
      if prefix + "input_ids" in batch:
        rows, length = batch[prefix + "input_ids"].shape[:2]
        tokens[key] = (rows * jax.process_count(), length)  # host batches hold this process's rows
    if "label_ids" in batch:  # packed: [rows, groups, N] labels
      r, g, n = batch["label_ids"].shape
      tokens["labels"] = (r * g * jax.process_count(), n)
    flops = flops_lib.step_flops(self.model_config, spec.kind, tokens, spec.reference)
    out["tokens_per_second"] = out.pop("tokens", 0.0) / dt
    out["step_time"] = dt
    out["tflops_per_device"] = flops / dt / n_dev / 1e12
    peak = flops_lib.peak_tflops(jax.devices()[0])
    if peak:
      out["mfu"] = out["tflops_per_device"] / peak
    return out

  def _report_memory(self, name: str, compiled) -> None:
    try:
      mem = compiled.memory_analysis()
    except Exception:  # not every backend reports it
      mem = None
    if mem is None:
      return
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    sizes = {f: getattr(mem, f, 0) for f in fields}
    _log(f"{name}: compiled step memory per device: arguments "
         f"{sizes['argument_size_in_bytes'] / 2**20:.1f} MiB, outputs "
         f"{sizes['output_size_in_bytes'] / 2**20:.1f} MiB (donated), temporaries "
         f"{sizes['temp_size_in_bytes'] / 2**20:.1f} MiB")
    if jax.process_index() == 0:
      with open(os.path.join(self.run_dir, f"{name}_memory.json"), "w", encoding="utf-8") as f:
        json.dump(sizes, f)

  def evaluate(self, name, spec, jit_eval, state, ref_params, step) -> dict[str, float]:
    """Mean held-out metrics of the stage's loss (and exact steering MAE) at ``step``."""
    records = self.heldout_records.get(STAGE_KINDS[name][1]) or []
    scfg = getattr(self.cfg, STAGE_KINDS[name][2])
    bs = min(scfg.batch_size, len(records) - len(records) % 2) if spec.kind == "hybrid" else \
        min(scfg.batch_size, len(records))
    if bs < (2 if spec.kind == "hybrid" else 1):
      return {}
    div = self._batch_rows_multiple(name, bs)
    bs = (bs // div) * div
    if bs < (2 if spec.kind == "hybrid" else 1):
      return {}
    pipe = self.make_batches(name, records, bs, 1, seed=0)
    batches = pipe.iterator()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    ref = ref_params if spec.needs_reference_params else None
    cached = spec.kind == "hybrid" and spec.reference == "cached"
    ref_fn = jax.jit(make_reference_fn(self.graphdef_eval, spec)) if cached else None  # compiled once
    for _ in range(min(pipe.num_steps, self.cfg.eval.max_batches)):
      host = next(batches)
      if cached:
        out = ref_fn(ref_params, self.rngs, self.frozen, shd.put_batch(host, self.mesh))
        host = dict(host, **{k: np.asarray(v) for k, v in jax.device_get(out).items()})
      metrics = jax.device_get(jit_eval(state.params, state.rngs, self.frozen, ref,
                                        shd.put_batch(host, self.mesh)))
      for k, v in metrics.items():
        v = np.asarray(v, np.float64)
        sums[k] = sums.get(k, 0.0) + float(v.sum() if v.ndim else v)
        counts[k] = counts.get(k, 0) + (v.size if v.ndim else 1)
    out = {k: sums[k] / counts[k] for k in sums if k != "tokens"}
    self.writer.write(name, step, out, split="eval")
    if "steering_mae" in out:
      _log(f"{name}: step {step}: held-out loss {out.get('loss', float('nan')):.4f}, exact steering "
           f"MAE {out['steering_mae']:.4f}")
    return out

  def _save_final(self, name: str, params, summary: dict) -> None:
    final = os.path.join(self.stage_dir(name), FINAL)
    if os.path.exists(final):
      shutil.rmtree(final)  # a final dir without summary.json is an interrupted save
    checkpoint_io.save_params(os.path.join(final, "params"), params)
    if jax.process_index() == 0:
      tmp = os.path.join(final, SUMMARY + ".tmp")
      with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
      os.replace(tmp, os.path.join(final, SUMMARY))

  # ---------------------------------------------------------------------------------------------
  # export

  def merged_model(self, params=None):
    """The model with ``params`` (default: the last stage's), LoRA adapters folded in."""
    params = self.final_params if params is None else params
    model = nnx.merge(self.graphdef, params, self.rngs, self.frozen)
    if self.cfg.lora.enabled:
      model = lora_lib.merge_lora(model)
    return model


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _manifest_dataset(records_dir: str) -> str:
  path = os.path.join(records_dir, "manifest.json")
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
    source = manifest.get("source", "builtin")
    return manifest["dataset"] if source in (None, "builtin") else source
  except (OSError, KeyError, json.JSONDecodeError) as e:
    raise InputError(f"{path}: dataset: expected a manifest naming the dataset ({e})") from None


def split_heldout(records: list[dict], fraction: float, *, seed: int) -> tuple[list[dict], list[dict]]:
  """Split records by prompt text: a ``fraction`` of the distinct prompts (seeded) is held out, so
  a prompt is never both trained on and evaluated (KTO pairs share a prompt and stay together)."""
  if fraction <= 0 or not records:
    return list(records), []
  prompts = sorted({r["prompt"] for r in records})
  rng = np.random.default_rng(seed)
  n_out = max(1, int(round(len(prompts) * fraction))) if len(prompts) > 1 else 0
  held = set(rng.permutation(len(prompts))[:n_out].tolist())
  held_prompts = {prompts[i] for i in held}
  train = [r for r in records if r["prompt"] not in held_prompts]
  heldout = [r for r in records if r["prompt"] in held_prompts]
  return train, heldout


def train(cfg: Config, **kwargs) -> dict[str, Any]:
  """Runs ``cfg.stages`` under ``cfg.run_dir`` (resuming if possible); returns stage summaries."""
  return Trainer(cfg, **kwargs).run()
