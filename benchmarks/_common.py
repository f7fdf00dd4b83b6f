"""Helpers shared by the benchmark scripts: thread setup, machine facts, atomic JSON, synthetic hybrid
batches, and a jit-compiled hybrid step of ``distfair_jax.train.step`` on one device.

Import this module before jax and torch: :func:`set_threads` must run first to take effect, so the
scripts call it at the top, from their ``main``, before importing either library.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from typing import Any, Sequence

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# The ~56M-parameter model of the CPU benchmarks (``LlamaConfig`` fields; untied output layer):
# train_step.py's "50m" size and sampling.py's ``--preset 50m``.
MODEL_50M: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=4, head_dim=64, rms_norm_eps=1e-5,
    rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False)


# ------------------------------------------------------------------------------------------------
# Environment


def set_threads(cores: int | None = None) -> int:
  """Gives JAX (XLA's Eigen pool) and torch (MKL + OpenMP) the same cores: all of them by default.

  Must run before jax / torch are imported. OpenBLAS (numpy, only used to build batches) gets one
  thread so that its pool never competes with the timed code. Returns the core count used.
  """
  cores = cores or os.cpu_count() or 1
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(cores)
  os.environ["OPENBLAS_NUM_THREADS"] = "1"
  # GNU OpenMP's default busy-waiting makes torch's 2-thread parallel regions stall for whole
  # scheduler slices whenever the machine has other work (measured: a micro step 0.03 s -> 0.3-1.7 s
  # at load 8 on 2 cores); passive waiting removes that and costs nothing measurable when idle.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  # A CPU benchmark on one device: drop the tests' simulated multi-device flag if inherited.
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  os.environ["XLA_FLAGS"] = " ".join(flags)
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  return cores


def fast_compile_flags() -> None:
  """For --smoke runs: XLA CPU codegen without LLVM optimisations (compiles ~2x faster; the smoke
  figures are not performance figures). Must run before jax is imported."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  os.environ["XLA_FLAGS"] = flags.strip()


def machine_info() -> dict[str, Any]:
  """Host, CPU, load and library versions (whatever of them is available)."""
  info: dict[str, Any] = {"platform": platform.platform(), "python": sys.version.split()[0],
                          "cpu_count": os.cpu_count()}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          info["cpu"] = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  try:
    info["load_average"] = [round(x, 2) for x in os.getloadavg()]
  except OSError:
    pass
  for mod in ("jax", "jaxlib", "flax", "optax", "torch", "transformers"):
    m = sys.modules.get(mod)
    if m is not None:
      info[mod] = getattr(m, "__version__", "?")
  jax = sys.modules.get("jax")
  if jax is not None:
    dev = jax.devices()[0]
    info["jax_device"] = f"{dev.platform}: {getattr(dev, 'device_kind', '?')}"
  torch = sys.modules.get("torch")
  if torch is not None:
    info["torch_threads"] = torch.get_num_threads()
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY",
              "XLA_FLAGS"):
    info[var] = os.environ.get(var, "")
  return info


def command_line() -> str:
  return "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def refuses_out(script: str, path: str, overwrite: bool) -> bool:
  """Whether ``--out`` exists and may not be replaced (said on stderr): checked before any work."""
  if os.path.exists(path) and not overwrite:
    print(f"{script}: --out: {path} exists; pass --overwrite to replace it", file=sys.stderr)
    return True
  return False


def start(smoke: bool) -> None:
  """Threads for jax (:func:`set_threads`), and for ``--smoke`` the fast-compiling XLA flags."""
  set_threads()
  if smoke:
    fast_compile_flags()


def write_json(path: str, data: Any, overwrite: bool) -> None:
  """Writes ``data`` as JSON to ``path`` atomically (``distfair_jax.fileio``); refuses to replace an
  existing file unless ``overwrite``."""
  from distfair_jax import fileio
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
  fileio.write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def spread(values: Sequence[float]) -> dict[str, float]:
  """{min, median, max} of a non-empty sequence."""
  return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
  """A plain-text table (right-aligned columns)."""
  cells = [[str(h) for h in header]] + [[_fmt(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def _fmt(x: Any) -> str:
  if isinstance(x, float):
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
  return str(x)


# ------------------------------------------------------------------------------------------------
# Synthetic hybrid batch


def hybrid_batch(vocab: int, batch: int, length: int, steering_ids: Sequence[int], seed: int = 0,
                 min_fill: float = 0.75, layout: str = "rows"):
  """A synthetic hybrid (KTO + steering) batch: the data pipeline's typed batch of numpy arrays.

  ``batch`` rows = batch / 2 desirable / undesirable pairs; each pair shares a random prompt of
  ``min_fill * length / 4`` tokens and has two completions (the steering token, then random answer tokens)
  filling its rows to [min_fill * length, length] tokens: long completions, the case least favourable
  to the packed layout. ``layout="rows"``: a ``HybridBatch`` of [B, length] arrays as
  ``data.collate.collate`` makes it (mismatched pairs: prompt i + completion of row (i + 1) mod B);
  ``"packed"``: a ``PackedHybridBatch`` of the same sequences, one row per pair
  (``pack_shared_prefix``; its length a multiple of ``length``).
  """
  import types
  import numpy as np
  from distfair_jax.data import collate
  if batch < 2 or batch % 2:
    raise ValueError(f"batch: expected an even number >= 2, got {batch}")
  rng = np.random.default_rng(seed)
  k, pairs = len(steering_ids), batch // 2
  steer_ids = np.asarray(steering_ids, np.int32)
  low = max(int(s) for s in steer_ids) + 1 if max(steer_ids) < vocab // 2 else 1
  examples = []
  plen = max(2, int(min_fill * length) // 4)  # one prompt length: mismatched rows fit in length too
  for _ in range(pairs):
    total = rng.integers(max(plen + 2, int(min_fill * length)), length + 1, size=2)
    prompt = rng.integers(low, vocab, size=plen).tolist()
    category = int(rng.integers(0, k))
    target = rng.dirichlet(np.ones(k)).astype(np.float32)
    pair = []
    for t, desirable in zip(total, (1, 0)):
      answer = rng.integers(low, vocab, size=int(t) - plen - 1).tolist()
      pair.append({"prompt": prompt, "completion": [int(steer_ids[category])] + answer,
                   "category": category, "target": target, "desirable": desirable})
    examples.append(tuple(pair))
  encoder = types.SimpleNamespace(fit=lambda p, c: c, pad_id=0, max_length=length)
  return collate.collate(examples, "kto", encoder, buckets=(length,), layout=layout)


def real_kto_batch(batch: int, dataset: str = "gender_real_us",
                   seed: int = 0) -> tuple[Any, Any, list[int], int]:
  """The method's real workload: ``batch / 2`` KTO pairs of ``dataset`` (attribute questions, short
  answers) tokenized with the tiny tokenizer as the data pipeline does (length buckets from 32).

  Returns (rows-layout batch, packed-layout batch of the same pairs, steering token ids,
  tokenizer vocabulary size).
  """
  import numpy as np
  from distfair_jax.data import build, collate, tokenize
  from distfair_jax.data.tokenizer import build_tiny_tokenizer
  tok = build_tiny_tokenizer()
  ds = build.build_dataset(dataset, rows_per_occupation=max(4, batch), test_rounds=1, seed=seed)
  pairs = [ds["kto"][i:i + 2] for i in range(0, len(ds["kto"]), 2)]
  order = np.random.default_rng(seed).permutation(len(pairs))[:batch // 2]
  records = [r for i in order for r in pairs[i]]
  encoder = tokenize.Encoder(tok, attribute=ds.spec.attribute)
  rows, packed = (collate.tokenize_batch(records, tok, "kto", encoder=encoder, layout=layout)
                  for layout in ("rows", "packed"))
  return rows, packed, [int(x) for x in encoder.steering_ids], len(tok)


def trim_rows(batch):
  """A rows-layout ``HybridBatch`` cut to its longest sequence (what a PyTorch collator pads to)."""
  import jax
  n = int(max(batch.seq.attention_mask.sum(1).max(), batch.mismatched.attention_mask.sum(1).max()))
  cut = lambda seq: jax.tree.map(lambda v: v[:, :n], seq)
  return batch.replace(seq=cut(batch.seq), mismatched=cut(batch.mismatched))


def torch_arrays(batch) -> dict[str, Any]:
  """A rows-layout ``HybridBatch`` as the flat arrays of the PyTorch formulation."""
  out = {"steering_position": batch.steering_position, "target": batch.target,
         "desirable": batch.desirable}
  for prefix, seq in (("", batch.seq), ("kl_", batch.mismatched)):
    out.update({prefix + k: getattr(seq, k)
                for k in ("input_ids", "attention_mask", "labels", "label_mask")})
  return out


# ------------------------------------------------------------------------------------------------
# Our hybrid step on one device


class HybridStep:
  """The real hybrid step (``train.stages.HybridStage`` through ``train.step``) compiled on one
  device.

  ``run(batch)`` does one optimizer step and returns the metrics (not blocked on); ``state`` is
  donated and replaced each call. ``reference="cached"`` steps read the reference log-probs from
  the batch; :meth:`put` adds them.
  """

  def __init__(self, model, steering_ids, *, reference: str = "online", tile_size: int = 128,
               learning_rate: float = 1e-5, device=None):
    import jax
    import jax.numpy as jnp
    from distfair_jax import sharding as shd
    from distfair_jax.config import HybridConfig, OptimConfig
    from distfair_jax.model.loader import split_model
    from distfair_jax.train.stages import HybridStage
    from distfair_jax.train.state import init_train_state
    from distfair_jax.train.step import stage_step

    device = device or jax.devices()[0]
    self.mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=[device])
    self.stage = HybridStage(HybridConfig(reference=reference), tile_size=tile_size)
    model.train()
    graphdef, graphdef_eval, params, rngs, frozen = split_model(model, lora=False)
    built = stage_step(self.stage, graphdef, graphdef_eval, jnp.asarray(steering_ids, jnp.int32),
                       OptimConfig(learning_rate=learning_rate, warmup_steps=0), 1000)
    params = jax.device_put(params, device)
    self.ref_params = jax.tree.map(jnp.copy, params)
    self.rngs = jax.device_put(rngs, device)
    self.frozen = jax.device_put(frozen, device)
    self.state = init_train_state(built.tx, params, self.rngs, self.mesh)
    state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
    self.step = jax.jit(built.step_fn, donate_argnums=(0,),
                        out_shardings=(state_shardings, None))
    self.reference_fn = jax.jit(self.stage.reference_fn(graphdef_eval))
    self._shd = shd

  def put(self, batch):
    """Host batch -> device arrays (with the cached reference log-probs for ``reference='cached'``)."""
    dev = self._shd.put_batch(batch, self.mesh)
    if self.stage.caches_reference:
      dev = dev.replace(reference=self.reference_fn(self.ref_params, self.rngs, self.frozen, dev))
    return dev

  def run(self, device_batch) -> dict[str, Any]:
    ref = self.ref_params if self.stage.needs_reference else None
    self.state, metrics = self.step(self.state, self.frozen, ref, device_batch)
    return metrics

  def block(self, metrics) -> None:
    import jax
    jax.block_until_ready((self.state, metrics))

  def compiles(self) -> int:
    """Number of programs the step jit holds (1 when nothing recompiled)."""
    size = getattr(self.step, "_cache_size", None)
    return int(size()) if callable(size) else -1
