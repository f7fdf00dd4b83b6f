"""grain pipelines: deterministic, one pass per epoch, sharded without overlap, exact resume."""

from __future__ import annotations

import collections
import json

import jax
import numpy as np
import pytest

from distfair_jax.data import build, collate, pipeline, tokenize
from distfair_jax.errors import InputError
from distfair_jax.data.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
  return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def tok(tokenizer):
  """The run's Encoder (what make_batches takes)."""
  return tokenize.Encoder(tokenizer)


@pytest.fixture(scope="module")
def ds():
  return build.build_dataset("gender_real_us", rows_per_occupation=3, test_rounds=1)


def _rows(seq):
  """Each row's real tokens as a tuple (of a ``Sequences``)."""
  ids, mask = seq.input_ids, seq.attention_mask
  return [tuple(ids[i][mask[i] > 0].tolist()) for i in range(len(ids))]


def _all(p):
  return list(p.iterator())


def _equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return type(a) is type(b) and len(la) == len(lb) and all(
      np.array_equal(x, y) for x, y in zip(la, lb))


def _concat_equals(a, b, whole):
  """The process shards, in process order, are the global batch."""
  assert type(a) is type(whole)
  for x, y, g in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(whole)):
    np.testing.assert_array_equal(np.concatenate([x, y]), g)


def test_deterministic_and_one_pass_per_epoch(tok, ds):
  recs = ds["sft"]  # 42 records
  p = pipeline.make_batches(recs, tok, "sft", 8, seed=5, num_epochs=2, shard_index=0,
                            shard_count=1)
  assert p.steps_per_epoch == 5 == pipeline.steps_per_epoch(len(recs), "sft", 8)
  assert p.num_steps == 10
  a = _all(p)
  b = _all(pipeline.make_batches(recs, tok, "sft", 8, seed=5, num_epochs=2, shard_index=0,
                                 shard_count=1))
  assert len(a) == 10 and all(_equal(x, y) for x, y in zip(a, b))
  c = _all(pipeline.make_batches(recs, tok, "sft", 8, seed=6, num_epochs=1, shard_index=0,
                                 shard_count=1))
  assert not all(_equal(x, y) for x, y in zip(a, c))
  single = collate.tokenize_batch(recs, None, "sft", encoder=tok)
  everything = collections.Counter(_rows(single.seq))
  for epoch in (a[:5], a[5:]):
    seen = collections.Counter(r for batch in epoch for r in _rows(batch.seq))
    assert sum(seen.values()) == 40 and not seen - everything  # 40 of 42: remainder dropped
  assert [_rows(x.seq) for x in a[:5]] != [_rows(x.seq) for x in a[5:]]  # reshuffled each epoch
  for batch in a:  # bucketed length: the smallest bucket that fits the longest row
    longest = int(batch.seq.attention_mask.sum(1).max())
    assert batch.seq.input_ids.shape[1] == tokenize.bucket_for(longest,
                                                               tokenize.bucket_lengths(1024))
  assert len(_all(pipeline.make_batches(recs, tok, "sft", 8, seed=5, drop_remainder=False,
                                        shard_index=0, shard_count=1))) == 6


def test_kto_pairs_shuffled_as_units(tok, tokenizer, ds):
  p = pipeline.make_batches(ds["kto"], tok, "kto", 6, seed=1, shard_index=0, shard_count=1)
  assert p.steps_per_epoch == 14 == pipeline.steps_per_epoch(len(ds["kto"]), "kto", 6)
  pairs = {(d["prompt"], d["response"], u["response"])
           for d, u in tokenize.pair_records(ds["kto"])}
  for batch in _all(p):
    np.testing.assert_array_equal(batch.desirable, [1, 1, 1, 0, 0, 0])
    rows = _rows(batch.seq)
    for j in range(3):
      sp = batch.steering_position[j]
      assert rows[j][:sp + 1] == rows[j + 3][:sp + 1]
      prompt_text = tokenizer.decode(rows[j][:sp + 1], skip_special_tokens=True)
      d = tokenizer.decode(rows[j][sp + 2:-1])
      u = tokenizer.decode(rows[j + 3][sp + 2:-1])
      assert any(prompt_text.endswith(pp + "assistant\n\n") and (dd, uu) == (d, u)
                 for pp, dd, uu in pairs)
    kl = _rows(batch.mismatched)
    for i in range(6):
      sp = batch.steering_position[i]
      nxt = (i + 1) % 6
      assert kl[i] == rows[i][:sp + 1] + rows[nxt][batch.steering_position[nxt] + 1:]
  for bad in (1, 3):
    with pytest.raises(InputError, match=r"batch_size: expected an even KTO batch >= 2"):
      pipeline.make_batches(ds["kto"], tok, "kto", bad, seed=0, shard_index=0, shard_count=1)


@pytest.mark.parametrize("kind", ["sft", "kto"])
def test_sharded_without_overlap(tok, ds, kind):
  recs = ds[kind]
  kw = dict(seed=3, num_epochs=1, shard_count=2)
  full = _all(pipeline.make_batches(recs, tok, kind, 8, seed=3, shard_index=0, shard_count=1))
  s0 = _all(pipeline.make_batches(recs, tok, kind, 8, shard_index=0, **kw))
  s1 = _all(pipeline.make_batches(recs, tok, kind, 8, shard_index=1, **kw))
  assert len(full) == len(s0) == len(s1)
  for g, a, b in zip(full, s0, s1):
    assert a.seq.input_ids.shape == b.seq.input_ids.shape == (4, g.seq.input_ids.shape[1])
    _concat_equals(a, b, g)
  rows0 = {r for batch in s0 for r in _rows(batch.seq)}
  rows1 = {r for batch in s1 for r in _rows(batch.seq)}
  if kind == "sft":
    assert not rows0 & rows1
  with pytest.raises(InputError, match="multiple of the 3 processes"):
    pipeline.make_batches(recs, tok, kind, 8, seed=0, shard_index=0, shard_count=3)


def test_packed_kto_sharded_by_pairs(tok, ds):
  """layout="packed": one row per pair, the same pairs in the same order as the rows layout, and
  the process shards concatenate to the global packed batch."""
  kw = dict(seed=3, num_epochs=1)
  rows = _all(pipeline.make_batches(ds["kto"], tok, "kto", 8, shard_index=0, shard_count=1, **kw))
  full = _all(pipeline.make_batches(ds["kto"], tok, "kto", 8, shard_index=0, shard_count=1,
                                    layout="packed", **kw))
  s0, s1 = (_all(pipeline.make_batches(ds["kto"], tok, "kto", 8, shard_index=i, shard_count=2,
                                       layout="packed", **kw)) for i in (0, 1))
  assert len(rows) == len(full) == len(s0)
  for r, g, a, b in zip(rows, full, s0, s1):
    assert g.packed.input_ids.shape[0] == 4 and a.packed.input_ids.shape[0] == 2
    np.testing.assert_array_equal(g.packed.steering_position, r.steering_position[:4])
    _concat_equals(a, b, g)
  with pytest.raises(InputError, match=r"2 x a multiple of the 4 processes \(packed layout"):
    pipeline.make_batches(ds["kto"], tok, "kto", 4, seed=0, shard_index=0, shard_count=4,
                          layout="packed")


def test_resumes_exactly_from_saved_state(tok, ds):
  make = lambda: pipeline.make_batches(ds["kto"], tok, "kto", 4, seed=9, num_epochs=2,
                                       shard_index=0, shard_count=1)
  uninterrupted = _all(make())
  it = make().iterator()
  first = [next(it) for _ in range(23)]  # past the end of epoch 1 (21 steps)
  state = json.loads(json.dumps(it.get_state()))  # JSON-able
  resumed = list(make().iterator(state))
  assert len(first) + len(resumed) == len(uninterrupted) == 42
  for x, y in zip(first + resumed, uninterrupted):
    assert _equal(x, y)


def test_bad_pipeline_arguments(tok, ds):
  with pytest.raises(InputError, match="kind: expected one of"):
    pipeline.make_batches(ds["sft"], tok, "ppo", 4, seed=0, shard_index=0, shard_count=1)
  with pytest.raises(InputError, match="records: expected at least one full batch"):
    pipeline.make_batches(ds["sft"][:3], tok, "sft", 4, seed=0, shard_index=0, shard_count=1)
  with pytest.raises(InputError, match="seed: expected an integer"):
    pipeline.make_batches(ds["sft"], tok, "sft", 4, seed=-1, shard_index=0, shard_count=1)
  with pytest.raises(InputError, match="drop_remainder: expected True"):
    pipeline.make_batches(ds["sft"], tok, "sft", 4, seed=0, shard_index=0, shard_count=2,
                          drop_remainder=False)
  with pytest.raises(InputError, match="expected a desirable record followed by"):
    pipeline.make_batches(ds["kto"][1:-1], tok, "kto", 4, seed=0, shard_index=0, shard_count=1)


def test_default_shard_is_the_jax_process(tok, ds, monkeypatch):
  """Without shard arguments a process reads its own rows: process 1 of 2 gets the second half of
  every global batch."""
  whole = _all(pipeline.make_batches(ds["sft"], tok, "sft", 4, seed=0, shard_index=0,
                                     shard_count=1))
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  p = pipeline.make_batches(ds["sft"], tok, "sft", 4, seed=0)
  assert (p.shard_index, p.shard_count) == (1, 2)
  mine = _all(p)
  assert len(mine) == len(whole)
  for a, g in zip(mine, whole):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(g)):
      np.testing.assert_array_equal(x, y[2:])


def test_length_grouped_batches_cover_each_unit_once_in_similar_lengths():
  lengths = [3] * 90 + [60] * 30  # one-word answers and a quarter of stories
  for epoch in (0, 1):
    batches = pipeline.length_grouped_batches(lengths, 8, seed=1, epoch=epoch,
                                              drop_remainder=False)
    assert sorted(np.concatenate(batches).tolist()) == list(range(120))
    mixed = [b for b in batches if len({lengths[i] for i in b}) > 1]
    assert len(mixed) <= 1  # at most one batch straddles the two lengths per window
  again = pipeline.length_grouped_batches(lengths, 8, seed=1, epoch=0)
  other = pipeline.length_grouped_batches(lengths, 8, seed=1, epoch=1)
  assert [b.tolist() for b in again] == [b.tolist() for b in pipeline.length_grouped_batches(
      lengths, 8, seed=1, epoch=0)]
  assert [b.tolist() for b in again] != [b.tolist() for b in other]
  # The batches' order is shuffled, not longest first.
  assert [lengths[b[0]] for b in again] != sorted([lengths[b[0]] for b in again], reverse=True)
  # With a remainder: one partial batch dropped, every other unit kept.
  dropped = pipeline.length_grouped_batches(lengths[:-3], 8, seed=1, epoch=0)
  assert len(dropped) == 14 and all(len(b) == 8 for b in dropped)


@pytest.mark.parametrize("kind", ["sft", "kto"])
def test_group_by_length_pads_few_batches_to_the_stories(tok, kind):
  """Story rows among one-word answers: grouped, only about the stories' share of the batches
  is padded to a story's length (plain shuffle: nearly all); one pass per epoch; exact resume."""
  data = build.build_dataset("gender_real_us", rows_per_occupation=6, test_rounds=1,
                             stories_per_occupation=2)
  recs = data[kind]

  def lengths(p):
    return [(b.packed if hasattr(b, "packed") else b.seq).input_ids.shape[1] for b in _all(p)]

  kw = dict(seed=3, num_epochs=2, shard_index=0, shard_count=1)
  grouped = pipeline.make_batches(recs, tok, kind, 8, group_by_length=True, **kw)
  plain = pipeline.make_batches(recs, tok, kind, 8, **kw)
  assert grouped.num_steps == plain.num_steps
  long_g = sum(n > 64 for n in lengths(grouped)) / grouped.num_steps
  long_p = sum(n > 64 for n in lengths(plain)) / plain.num_steps
  assert long_g < 0.4 < 0.6 < long_p, (long_g, long_p)  # stories: 2 of every 8 rows
  # Each epoch sees every unit once (kto: every pair).
  one = pipeline.make_batches(recs, tok, kind, 2, group_by_length=True, seed=3, num_epochs=1,
                              shard_index=0, shard_count=1)
  rows = collections.Counter(r for b in _all(one) for r in _rows(b.seq))
  plain_rows = collections.Counter(r for b in _all(pipeline.make_batches(
      recs, tok, kind, 2, seed=3, num_epochs=1, shard_index=0, shard_count=1)) for r in _rows(b.seq))
  assert rows == plain_rows
  # Resume: the iterator's state restarts at the same batch.
  it = grouped.iterator()
  for _ in range(5):
    next(it)
  state = it.get_state()
  assert _equal(next(it), next(grouped.iterator(state)))
