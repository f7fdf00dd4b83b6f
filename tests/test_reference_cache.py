"""The reference log-probs computed before a stage (``distfair_jax.train.reference_cache``).

- the pool keeps each distinct sequence once, whatever its padding, and maps every row back;
- pooled log-probs equal a step-by-step computation, on 8 devices (rows sharded over them);
- ``auto``'s rule: the pool's share of the sequences against the layout's own reference pass;
- a hybrid stage with ``reference: auto`` trains as with ``online`` (the same losses and parameters
  to float rounding) on the rows and on the packed layout, where auto picks the pool on the
  method's data (its (wording, answer) pairs repeat) and logs why. Two processes: test_multihost.
"""

import os

import jax
import numpy as np
import pytest

from distfair_jax import sharding as shd
from distfair_jax.data import batches as B
from distfair_jax.train import reference_cache as RC

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _seqs(rows, length):
  """Right-padded Sequences from token lists (labels = next token, mask on the last half)."""
  ids = np.zeros((len(rows), length), np.int32)
  att, lab, mask = np.zeros_like(ids), np.zeros_like(ids), np.zeros((len(rows), length), np.float32)
  for r, toks in enumerate(rows):
    n = len(toks)
    ids[r, :n], att[r, :n] = toks, 1
    lab[r, :n - 1] = toks[1:]
    mask[r, n // 2:n - 1] = 1
  return B.Sequences(ids, att, lab, mask)


def _batch(targets, mismatched, length):
  b = len(targets)
  return B.HybridBatch(_seqs(targets, length), _seqs(mismatched, length),
                       np.zeros(b, np.int32), np.zeros(b, np.int32),
                       np.full((b, 2), 0.5, np.float32), (np.arange(b) < b // 2).astype(np.int32))


A, Bq, C, D = [5, 6, 7, 8], [5, 6, 9], [4, 4, 4, 4, 4, 4], [5, 6, 7, 9]
STEPS = [(0, _batch([A, Bq], [Bq, A], 8)), (1, _batch([C, A], [A, C], 16)),  # A padded 8 and 16
         (2, _batch([A, Bq], [D, A], 8))]


def test_the_pool_keeps_each_distinct_sequence_once_and_maps_rows_back():
  pool = RC.SequencePool.from_batches(STEPS)
  assert len(pool.entries) == 4 and pool.seen == 12
  assert pool.distinct_share == pytest.approx(4 / 12)
  entry = lambda k: [list(pool.entries[i][0]) for i in k]
  assert entry(pool.steps[0][0]) == [A, Bq] and entry(pool.steps[1][0]) == [C, A]
  assert entry(pool.steps[2][1]) == [D, A]
  chunks = pool.chunks(3, (8, 16))
  lengths = [len(pool.entries[i][0]) for ids, _ in chunks for i in ids]
  assert lengths == sorted(lengths) and [L for _, L in chunks] == [8, 8]


def _fake_logps(seqs):
  """A stand-in for the reference: sum over labels of (token id x mask), per row."""
  return (seqs.labels * seqs.label_mask).sum(-1)


def test_pooled_log_probs_equal_step_by_step_on_eight_devices():
  mesh = shd.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  fn = jax.jit(_fake_logps)
  steps = [(s, _batch([A, Bq, C, D, A, Bq, C, D][s:] + [A, Bq, C, D, A, Bq, C, D][:s],
                      [Bq, C, D, A, A, A, C, C], 8)) for s in range(2)]
  cache = RC.PooledCache.compute(RC.SequencePool.from_batches(steps), fn, rows=8,
                                 buckets=(8, 16), mesh=mesh)
  ref = cache.reference(0)
  np.testing.assert_allclose(ref.targets, _fake_logps(steps[0][1].seq))
  np.testing.assert_allclose(ref.mismatched, _fake_logps(steps[0][1].mismatched))
  placed = cache.attach(1, steps[1][1], mesh)  # on the mesh, sharded as the batch's rows
  np.testing.assert_allclose(np.asarray(placed.reference.targets), _fake_logps(steps[1][1].seq))
  assert placed.reference.targets.sharding == placed.desirable.sharding
  assert not cache.pool.steps  # each step's entries are handed out once


def test_auto_pools_where_the_pool_costs_less_than_the_steps_own_passes():
  assert RC.pays(0.5) and RC.pays(0.9) and not RC.pays(0.95)  # rows layout
  assert RC.pays(0.04, step_cost=0.4) and not RC.pays(0.38, step_cost=0.4)  # packed


SMALL = """\
defaults: [{base}]
stages: [hybrid]
model:
  overrides: {{num_hidden_layers: 1, hidden_size: 64, intermediate_size: 128, num_attention_heads: 2,
              num_key_value_heads: 1, head_dim: 32}}
data: {{rows_per_occupation: 6, max_length: 64, max_prompt_length: 48}}
hybrid: {{epochs: 2, batch_size: 8, max_steps: 0, optim: {{learning_rate: 1.0e-3, warmup_steps: 2}}}}
heldout: {{max_batches: 1}}
logging: {{tensorboard: false, progress: false}}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  from distfair_jax.data import build_dataset
  from distfair_jax.data.tokenizer import build_tiny_tokenizer
  d = tmp_path_factory.mktemp("refcache")
  (d / "small.yaml").write_text(SMALL.format(base=os.path.join(ROOT, "configs", "base.yaml")))
  build_tiny_tokenizer(str(d / "tok"))
  records = build_dataset("gender_real_us", rows_per_occupation=6, test_rounds=0, seed=0).records
  return d, records


def _train(setup, name, *overrides):
  """One hybrid stage from the initial model -> (final params as leaves, per-step losses)."""
  import json
  from distfair_jax.config import load_config
  from distfair_jax.train.loop import run_stage
  from distfair_jax.train.preemption import SigtermFlag
  from distfair_jax.train.stages import make_stage
  from distfair_jax.train.trainer import _context
  d, records = setup
  cfg = load_config(str(d / "small.yaml"), [f"run_dir={d / name}", f"model.tokenizer={d / 'tok'}",
                                            *overrides])
  ctx = _context(cfg, records)
  with SigtermFlag() as flag:
    params, _, _ = run_stage(ctx, make_stage("hybrid", cfg), ctx.model.params, flag)
  rows = [json.loads(l) for l in (d / name / "metrics.jsonl").read_text().splitlines()]
  losses = {r["step"]: r["loss"] for r in rows if r["split"] == "train"}
  return jax.tree.leaves(jax.device_get(params)), losses


@pytest.mark.parametrize("layout, mode, mesh", [
    ("rows", "auto", ("mesh.data=2", "mesh.tensor=-1")),  # auto pools: 2 epochs, repeated pairs
    ("packed", "cached", ("mesh.data=4", "mesh.tensor=-1"))])
def test_a_pooled_reference_trains_as_the_online_one(setup, capsys, layout, mode, mesh):
  common = (f"hybrid.layout={layout}", "logging.every_steps=1", *mesh)
  online, l_online = _train(setup, f"online-{layout}", "hybrid.reference=online", *common)
  capsys.readouterr()
  pooled, l_pooled = _train(setup, f"{mode}-{layout}", f"hybrid.reference={mode}", *common)
  log = capsys.readouterr().err
  assert ("hybrid: reference log-probs computed before the stage, once per distinct sequence:"
          in log), log
  assert f"the {layout} layout's own pass costs" in log
  assert sorted(l_pooled) == sorted(l_online) and len(l_online) > 2
  for step in l_online:
    assert l_pooled[step] == pytest.approx(l_online[step], rel=1e-4, abs=1e-6), step
  assert max(float(np.abs(a - b).max()) for a, b in zip(online, pooled)) < 1e-4
  if layout == "packed":  # here the pool (43% of the sequences) costs more than packed passes (40%)
    _train(setup, "auto-packed", "hybrid.reference=auto", *common)
    assert "hybrid: reference online (auto: " in capsys.readouterr().err


def test_kept_log_probs_load_only_for_their_own_pool(tmp_path):
  pool = RC.SequencePool.from_batches(STEPS)
  cache = RC.PooledCache(pool, np.arange(4, dtype=np.float32) - 7.5)
  cache.save(tmp_path / "ref.npz")
  again = RC.PooledCache.load(RC.SequencePool.from_batches(STEPS), tmp_path / "ref.npz")
  np.testing.assert_array_equal(again.logps, cache.logps)
  other = RC.SequencePool.from_batches(STEPS[:2])  # another pool: D is not in it
  assert RC.PooledCache.load(other, tmp_path / "ref.npz") is None
  assert RC.PooledCache.load(pool, tmp_path / "absent.npz") is None
  (tmp_path / "bad.npz").write_bytes(b"not an npz")
  assert RC.PooledCache.load(pool, tmp_path / "bad.npz") is None
  whole = (tmp_path / "ref.npz").read_bytes()  # a damaged disk: the zip cut short
  (tmp_path / "cut.npz").write_bytes(whole[:len(whole) // 2])
  assert RC.PooledCache.load(pool, tmp_path / "cut.npz") is None


def test_a_stage_resumed_with_a_pooled_reference_ends_as_an_uninterrupted_one(setup, capsys):
  """The pool covers every step whatever the resume point, so the resumed steps read the same
  reference log-probs as an uninterrupted run's; a resumed stage reads them from its stage
  directory rather than running the reference again, unless the kept file is not this pool's."""
  import shutil
  d, _ = setup
  common = ("hybrid.reference=cached", "hybrid.layout=rows", "mesh.data=2", "mesh.tensor=-1",
            "logging.every_steps=1", "checkpoint.every_steps=3", "checkpoint.keep=100",
            "checkpoint.async_save=false")
  whole, l_whole = _train(setup, "resume", *common)
  ckpts = d / "resume" / "hybrid" / "checkpoints"
  kept = d / "resume" / "hybrid" / "reference_logps.npz"
  assert kept.exists()
  steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  assert steps[0] == 3 and len(steps) > 2
  for stale in (False, True):
    for step in sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())[1:]:
      shutil.rmtree(ckpts / str(step))  # back to the first checkpoint, as if killed after it
    if stale:  # another pool's log-probs: computed again
      kept.write_bytes(b"x")
    capsys.readouterr()
    resumed, l_resumed = _train(setup, "resume", *common)
    log = capsys.readouterr().err
    assert ("reference log-probs read from" in log) != stale, log  # stale: computed again
    assert sorted(l_resumed) == sorted(l_whole)
    for step in l_whole:
      assert l_resumed[step] == pytest.approx(l_whole[step], rel=1e-6, abs=1e-7), step
    assert max(float(np.abs(a - b).max()) for a, b in zip(whole, resumed)) <= 1e-6
