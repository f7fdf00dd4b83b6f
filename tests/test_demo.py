"""`distfair demo --quick`: the miniature benchmark end to end (CI's smoke run of the embedded default)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from distfair_jax import demo
from distfair_jax.demo import dataset as demo_dataset
from distfair_jax.demo import runner as demo_runner
from distfair_jax.demo import selection as demo_selection
from distfair_jax.errors import InputError


@pytest.mark.slow
def test_quick_demo_runs_every_method_and_the_base_is_biased(tmp_path):
  run_dir = tmp_path / "demo"
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  # A relative --run-dir, as in the README (orbax itself needs absolute paths).
  proc = subprocess.run([sys.executable, "-m", "distfair_jax.cli", "demo", "--quick", "--dataset",
                         "gender_real_uk", "--run-dir", "demo", "--no-progress"], env=env,
                        capture_output=True, text=True, timeout=900, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(run_dir / "results.json", encoding="utf-8") as f:
    results = json.load(f)
  table = results["gender_real_uk"]
  assert set(table) == set(demo.METHODS)
  # The paper's out-of-distribution test: the UK-trained models on the US prompts and targets.
  ood = results["gender_real_uk_on_gender_real_us"]
  assert set(ood) == set(demo.METHODS) and ood["ours"]["v2"]["mae"] < ood["zero_shot"]["v2"]["mae"]
  sweep = json.loads((run_dir / "decoding_sweep.json").read_text())["gender_real_uk"]
  assert list(sweep) == [f"T={t:g}, top_p={p:g}" for t, p in demo.DECODING_SWEEP]
  for method, versions in table.items():
    for version in demo.QUICK.versions:
      m = versions[version]
      assert math.isfinite(m["mae"]) and 0 <= m["mae"] <= 1, (method, m)
      lo, hi = m["mae_ci"]
      assert lo <= hi
      assert 0 <= m["unparsed_rate"] <= 1
    if method in demo.STEERED:
      assert math.isfinite(versions["v2"]["exact_mae"])
    # Every method, steered or not, has its exact answer probabilities and non-answer mass.
    assert 0 <= versions["v2"]["exact_answer_mae"] <= 1 and 0 <= versions["v2"]["non_answer"] <= 1
  # The stand-in for an off-the-shelf LLM is biased: far from the target, and far behind ours.
  assert table["zero_shot"]["v2"]["mae"] > 0.15
  assert table["zero_shot"]["v2"]["mae"] > table["ours"]["v2"]["mae"] + 0.05
  # Every method's table row and the comparison plot are there, and the stdout table too.
  assert (run_dir / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  text = (run_dir / "results.md").read_text(encoding="utf-8")
  assert "## KL(target || achieved)" in text and "## Decoding sensitivity (ours, v2)" in text
  # How much KTO's mismatched pairing moves ours: the original's pairs beside the default.
  pairs = json.loads((run_dir / "kl_pairs.json").read_text())["gender_real_uk"]
  assert list(pairs) == ["kl_pairs: shifted", "kl_pairs: reference"]
  assert "## KTO's mismatched pairs (ours, v2)" in text
  assert "## Wall time" in text and text.startswith("# distfair demo (quick, seed 0)")
  assert text.index("## Headline") < text.index("## All figures") < text.index("## KL(")
  for method in demo.METHODS:
    assert f"| {method} |" in text and f"| {method} |" in proc.stdout
  # A rerun reuses every finished stage and evaluation, also through another path to the same
  # directory (a symlink): no evaluation is redone.
  evals = sorted(run_dir.glob("gender_real_uk/*/eval/metrics.json"))
  assert len(evals) >= len(demo.METHODS)
  written = {p: p.stat().st_mtime_ns for p in evals}
  link = tmp_path / "link"
  link.symlink_to(run_dir, target_is_directory=True)
  again = subprocess.run([sys.executable, "-m", "distfair_jax.cli", "demo", "--quick", "--dataset",
                          "gender_real_uk", "--run-dir", str(link), "--no-progress"], env=env,
                         capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "done already" in again.stderr
  assert {p: p.stat().st_mtime_ns for p in evals} == written
  with open(run_dir / "results.json", encoding="utf-8") as f:
    assert json.load(f) == results


@pytest.mark.slow
def test_quick_demo_on_your_own_attribute(tmp_path):
  """`distfair demo --quick --dataset configs/datasets/age_groups_us.yaml`: the README's worked
  example of a user's own attribute (3 age groups, their own targets) steered on the tiny model."""
  spec = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "datasets", "age_groups_us.yaml")
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  proc = subprocess.run([sys.executable, "-m", "distfair_jax.cli", "demo", "--quick", "--dataset",
                         spec, "--run-dir", "demo", "--no-progress"], env=env, capture_output=True,
                        text=True, timeout=900, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / "demo" / "results.json").read_text(encoding="utf-8"))
  assert list(results) == ["age_groups_us"] and "| age_groups_us | ours |" in proc.stdout
  table = results["age_groups_us"]
  assert set(table) == set(demo.METHODS)
  # Its own tokenizer (the built-in texts plus the spec's): the answers are whole tokens.
  from distfair_jax.data.tokenizer import load_tokenizer_dir
  tok = load_tokenizer_dir(tmp_path / "demo" / "age_groups_us" / "tokenizer")
  assert len(tok("Young", add_special_tokens=False)["input_ids"]) == 1
  # The biased base is far from the targets; ours steers towards them, calibrated and fluent.
  zero, ours = table["zero_shot"]["v2"], table["ours"]["v2"]
  assert zero["mae"] > 0.2 and ours["mae"] < zero["mae"] - 0.1, (zero, ours)
  assert ours["exact_mae"] < 0.1 and ours["unparsed_rate"] < 0.25, ours


def test_user_specs_scale_rows_and_resume_a_demo_that_never_trained(tmp_path):
  from distfair_jax.data.build import resolve_spec
  assert demo.scaled(demo.QUICK, 14) == demo.QUICK and demo.scaled(demo.QUICK, 25) == demo.QUICK
  six = demo.scaled(demo.QUICK, 6)
  assert six.rows_per_occupation == 3 * demo.QUICK.rows_per_occupation
  assert len(resolve_spec(os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "configs", "datasets", "age_groups_us.yaml")).occupations) == 6
  # A first attempt that stopped before any training leaves nothing another setting contradicts.
  run = tmp_path / "d"
  (run / "gender_real_us" / "base").mkdir(parents=True)
  (run / "demo.json").write_text(json.dumps({"quick": True, "seed": 0}))
  assert not demo_runner._any_stage_started(str(run))  # pylint: disable=protected-access
  (run / "gender_real_us" / "base" / "ift" / "checkpoints" / "3").mkdir(parents=True)
  assert demo_runner._any_stage_started(str(run))  # pylint: disable=protected-access
  # Once started, a demo resumes only with the same settings, but how its layers run may change.
  import dataclasses
  info = {"quick": True, "seed": 0, "settings": dataclasses.asdict(demo.QUICK)}
  (run / "demo.json").write_text(json.dumps(info))
  faster = {**info, "settings": {**info["settings"], "scan_layers": True, "remat": "full"}}
  demo_runner._check_marker(str(run), faster)  # pylint: disable=protected-access
  assert json.loads((run / "demo.json").read_text()) == json.loads(json.dumps(faster))
  with pytest.raises(InputError, match="holds a demo with other settings"):
    demo_runner._check_marker(str(run), {**info, "settings": {**info["settings"], "rounds": 7}})
  # A demo recorded before a setting existed resumes with its default, not with another value.
  older = {**info, "settings": {k: v for k, v in info["settings"].items() if k != "nll_weight"}}
  (run / "demo.json").write_text(json.dumps(older))
  demo_runner._check_marker(str(run), info)  # pylint: disable=protected-access
  (run / "demo.json").write_text(json.dumps(older))
  with pytest.raises(InputError, match="holds a demo with other settings"):
    demo_runner._check_marker(str(run), {**info, "settings": {**info["settings"],
                                                              "nll_weight": 1.0}})
  with pytest.raises(InputError, match=r"demo: dataset: expected one of .* or a YAML spec file, "
                                       r"got 'ages'"):
    demo.run_demo(["ages"], str(tmp_path / "x"), quick=True)


def test_stereotype_is_skewed_beyond_the_real_figures():
  from distfair_jax.data.build import dataset_spec
  spec = dataset_spec("gender_real_us")
  nurses = demo.stereotype(spec, "Registered nurses", 0.95)
  np.testing.assert_allclose(nurses, [0.05, 0.95])
  assert spec.target("Registered nurses")[1] < 0.95  # real: 2413 / 2817 female
  race = demo.stereotype(dataset_spec("race_even_us"), "Software developers", 0.9)
  assert race.argmax() == 3 and math.isclose(race.sum(), 1.0)
  recs = demo.stereotyped_records(spec, rows_per_occupation=20, stories_per_occupation=2, share=0.95,
                                  seed=0)
  nurse_answers = [r["category"] for r in recs if r["occupation"] == "Registered nurses"
                   and r["response"] in ("Male", "Female")]
  assert nurse_answers.count(1) == 19 and nurse_answers.count(0) == 1
  assert any(len(r["response"].split()) > 10 for r in recs)  # stories too


def test_one_selection_rule_avoids_non_answers():
  """The lowest exact answer MAE wins, but never a rate whose non-answer mass exceeds 20% while
  one with less exists, nor one that opens over 5% of held-out stories with a bare category word
  where another within both bounds exists; with none under 20%, the lowest MAE; ties go to the
  smaller rate."""
  from distfair_jax.demo import select
  assert select({1e-3: 0.05, 1e-4: 0.08}, {1e-3: 0.35, 1e-4: 0.10}) == 1e-4
  assert select({1e-3: 0.05, 1e-4: 0.08}, {1e-3: 0.15, 1e-4: 0.10}) == 1e-3
  assert select({1e-3: 0.30, 1e-4: 0.20}, {1e-3: 0.50, 1e-4: 0.90}) == 1e-4
  assert select({1e-3: 0.1, 1e-4: 0.1}, {1e-3: 0.0, 1e-4: 0.0}) == 1e-4
  # A rate that lost the stories (bare answers to story prompts) is passed over like non-answers.
  assert select({1e-3: 0.05, 1e-4: 0.08}, {1e-3: 0.0, 1e-4: 0.0}, {1e-3: 0.9, 1e-4: 0.01}) == 1e-4
  assert select({1e-3: 0.05, 1e-4: 0.08}, {1e-3: 0.0, 1e-4: 0.0}, {1e-3: 0.16, 1e-4: 0.01}) == 1e-4
  assert select({1e-3: 0.05, 1e-4: 0.08}, {1e-3: 0.0, 1e-4: 0.0}, {1e-3: 0.04, 1e-4: 0.01}) == 1e-3
  # No rate passes both: within the non-answer bound, the one that loses its stories least ...
  assert select({1e-3: 0.01, 3e-4: 0.02, 1e-5: 0.2}, {1e-3: 0.0, 3e-4: 0.0, 1e-5: 0.4},
                {1e-3: 0.9, 3e-4: 0.06, 1e-5: 0.01}) == 3e-4
  # ... and with none within it, the lowest MAE.
  assert select({1e-3: 0.01, 1e-5: 0.2}, {1e-3: 0.3, 1e-5: 0.4}, {1e-3: 0.9, 1e-5: 0.0}) == 1e-3
  # Junk prose: sampled held-out stories the v3 judge cannot read (over 20%) fail the story check
  # even where the bare-answer mass passes it ...
  mae, none, bare = {1e-3: 0.03, 1e-4: 0.08}, {1e-3: 0.0, 1e-4: 0.0}, {1e-3: 0.01, 1e-4: 0.01}
  assert select(mae, none, bare, {1e-3: 0.64, 1e-4: 0.12}) == 1e-4
  assert select(mae, none, bare, {1e-3: 0.19, 1e-4: 0.12}) == 1e-3
  # ... and where every rate fails, the one whose stories fail least (by the larger excess).
  assert select(mae, none, {1e-3: 0.01, 1e-4: 0.08}, {1e-3: 0.64, 1e-4: 0.25}) == 1e-4
  assert select(mae, none, {1e-3: 0.01, 1e-4: 0.5}, {1e-3: 0.3, 1e-4: 0.1}) == 1e-3


def test_story_check_counts_bare_answers_on_a_wording_never_trained(monkeypatch):
  """The selection's sampled story check: a story the v3 judge cannot read and a bare category
  word both fail; its second wording (``templates.select_story``) is none a stage trains or tests
  on, one prompt per occupation given."""
  from types import SimpleNamespace
  from distfair_jax.data import build
  spec = build.resolve_spec("gender_real_us")
  occupations = ["Registered nurses", "Software developers"]
  unseen = demo_selection.unseen_story_prompts(spec, occupations)
  assert list(unseen.values()) == occupations
  tpl = spec.templates
  used = {*tpl.train, *tpl.train_story, *tpl.v1, tpl.v2, tpl.v3}
  assert all(o in p for p, o in unseen.items())
  assert not {p for p in unseen} & {build.templates_lib.render(
      t, occupation=o, region=spec.region, attribute=spec.attribute)
      for t in used for o in occupations}
  responses = ["Female", "oinferment 0 1", "Mary has nursed for years; she loves her ward.",
               "male.", "John writes code all day, and he enjoys it."]
  monkeypatch.setattr(demo_selection.eval_lib, "sample_version", lambda *a, **k: [
      {"prompt": "p", "occupation": "Registered nurses", "response": r} for r in responses])
  me = SimpleNamespace(s=demo.REAL, attribute=spec.attribute, seed=0)
  rows = demo_selection.story_check(me, None, None, None, ["p"], {"p": occupations[0]},
                                    steered=True)
  # two bare words and one unreadable story
  assert [r["failed"] for r in rows] == [True, True, False, True, False]


def test_the_headline_says_whether_ours_is_below_ift_and_dpo_per_dataset():
  """results.md's first table: per dataset, each method's v2 exact answer MAE, "yes" where ours
  is below both IFT and DPO, and the fine-tuned methods' failed v3 stories (unparsed + bare)."""
  def m(exact, unparsed=None, bare=None):
    v3 = {} if unparsed is None else {"unparsed_rate": unparsed,
                                      **({} if bare is None else {"bare_answer_rate": bare})}
    return {"v2": {"exact_answer_mae": exact}, "v3": v3}
  results = {"a": {"zero_shot": m(0.43), "ift": m(0.064, 0.007, 0.001), "dpo": m(0.067, 0.011),
                   "ours": m(0.016, 0.042, 0.079)},
             "b": {"ift": m(0.05, 0.0, 0.0), "dpo": m(0.02, 0.0, 0.0), "ours": m(0.03, 0.3, 0.0)},
             "c": {"ift": m(0.05)}}
  table = demo.headline_table(results)
  head = table.splitlines()[0]
  assert head == ("| dataset | zero_shot v2 exact answer MAE | ift v2 exact answer MAE | dpo v2 exact "
                  "answer MAE | ours v2 exact answer MAE | ours below IFT and DPO | ift v3 failed "
                  "| dpo v3 failed | ours v3 failed |")
  assert "| a | 0.430 | 0.064 | 0.067 | 0.016 | yes | 0.8% | 1.1% | 12.1% |" in table
  assert "| b |  | 0.050 | 0.020 | 0.030 | no | 0.0% | 0.0% | 30.0% |" in table
  assert "| c |  | 0.050 |  |  |  |  |  |  |" in table  # nothing to compare


def test_aggregate_seeds_means_sds_and_table():
  """Several seeds: the mean and sample standard deviation of each figure, the seeds' own figures
  kept; a figure missing in one seed is left out; the table shows mean ± sd."""
  def res(mae, exact):
    v2 = {"mae": mae, "mae_corrected": mae, "unparsed_rate": 0.0, "exact_answer_mae": exact,
          "non_answer": 0.1, "exact_mae": None, "kl": mae / 10, "kl_sum": mae,
          "mae_floor": 0.03 + mae / 10}
    return {"ds": {"ours": {"v2": v2}}}
  out = demo.aggregate_seeds({0: res(0.1, 0.02), 1: res(0.3, 0.04), 2: res(0.2, 0.03)})
  m = out["ds"]["ours"]["v2"]
  assert m["mae"] == pytest.approx(0.2) and m["mae_sd"] == pytest.approx(0.1)
  assert m["exact_answer_mae_sd"] == pytest.approx(0.01) and "exact_mae" not in m
  assert m["seeds"] == [0, 1, 2] and [r["mae"] for r in m["per_seed"]] == [0.1, 0.3, 0.2]
  table = demo.seeds_table(out, ["v2"])
  one = {"ds": {"ours": {"v2": {"kl": 0.02, "kl_sum": 0.28, "kl_std": 0.01}}}}
  assert "| ds | ours | 0.28 / 0.020 (0.010) |" in demo.kl_table(one, ["v2"])
  assert "over 3 seeds" in table
  assert "| ds | ours | 0.200 ± 0.100 | 0.050 ± 0.010 | 0.030 ± 0.010 |" in table
  assert "| dataset | method | v2 MAE | v2 MAE floor | v2 exact answer MAE |" in table
  assert "| ds | ours | 0.20 ± 0.10 / 0.020 ± 0.010 |" in demo.kl_table(out, ["v2"])
  with pytest.raises(InputError, match="seeds"):
    demo.run_demo(["gender_real_us"], "/nonexistent/x", seeds=[0, 0])


def test_seeds_run_each_seed_in_its_own_directory(tmp_path, monkeypatch):
  """--seeds 0,1: each seed's whole demo under RUN_DIR/seed<N> (its own results kept), and
  RUN_DIR's results.json / results.md / comparison.png the aggregate over them."""
  calls, rates = [], []

  class FakeDemo:
    def __init__(self, dataset, run_dir, *, settings, seed, tokenizer_dir, progress,
                 base_model=None, ablations=True, rates_from=None):
      self.dataset, self.seed, self.timings = dataset, seed, {}
      calls.append((run_dir, seed))
      rates.append(rates_from)

    def out_of_distribution(self):
      return {}

    def decoding_sweep(self):
      return {"T=1, top_p=1": {"mae": 0.1 + self.seed / 10}}

    def kl_pairs_variant(self):
      return {"kl_pairs: reference": {"mae": 0.2 + self.seed / 10}}

    def run(self):
      v = {"mae": 0.1 + self.seed / 10, "mae_ci": [0.0, 0.3], "mae_corrected": 0.1,
           "unparsed_rate": 0.0, "exact_answer_mae": 0.05, "non_answer": 0.0, "exact_mae": None}
      return {method: {"v2": dict(v)} for method in demo.METHODS}

  monkeypatch.setattr(demo_runner, "Demo", FakeDemo)
  monkeypatch.setattr(demo_runner, "_tokenizer", lambda run_dir, ds: str(tmp_path / "tok"))
  out = demo.run_demo(["gender_real_us"], str(tmp_path / "d"), quick=True, seeds=[0, 1])
  assert calls == [(str(tmp_path / "d" / "seed0"), 0), (str(tmp_path / "d" / "seed1"), 1)]
  assert rates == [None, None]  # the miniature: every seed selects (tune_first_seed off)
  for s in (0, 1):
    own = json.loads((tmp_path / "d" / f"seed{s}" / "results.json").read_text())
    assert own["gender_real_us"]["ours"]["v2"]["mae"] == pytest.approx(0.1 + s / 10)
  assert out["gender_real_us"]["ours"]["v2"]["mae"] == pytest.approx(0.15)
  assert json.loads((tmp_path / "d" / "results.json").read_text()) == json.loads(json.dumps(out))
  md = (tmp_path / "d" / "results.md").read_text()
  assert "over 2 seeds" in md and "| gender_real_us | kl_pairs: reference | 0.250 ± 0.071 |" in md
  assert (tmp_path / "d" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
  # demo.REAL's tune_first_seed: the later seeds train at the first seed's selected rates.
  import dataclasses
  assert demo.REAL.tune_first_seed and not demo.DEFAULT.tune_first_seed
  calls.clear()
  rates.clear()
  demo.run_demo(["gender_real_us"], str(tmp_path / "e"), quick=True, seeds=[2, 0, 1],
                settings=dataclasses.replace(demo.QUICK, tune_first_seed=True))
  assert rates == [None, str(tmp_path / "e" / "seed2"), str(tmp_path / "e" / "seed2")]


@pytest.mark.slow
def test_demo_from_a_given_model_trains_lora_from_it_and_no_base(tmp_path, monkeypatch):
  """`distfair demo --model CKPT`: every method from the given converted model (zero-shot is that
  model), LoRA fine-tuning on every linear projection with the paper's 1-2B rank, alpha and
  dropout, the same adapters for every method, its own tokenizer; the selection samples held-out
  stories and judges them."""
  import dataclasses
  from flax import nnx
  from distfair_jax.convert import hf as convert
  from distfair_jax.model.llama import Llama
  from distfair_jax.model.presets import get_preset
  from distfair_jax.data.tokenizer import build_tiny_tokenizer
  from distfair_jax.train.rundir import RunDir
  config = get_preset("tiny")
  ckpt = tmp_path / "my model"
  convert.save_pretrained(str(ckpt), Llama(config, rngs=nnx.Rngs(3)), config,
                          build_tiny_tokenizer())
  settings = dataclasses.replace(demo.settings_for(quick=True, model=str(ckpt)),
                                 rows_per_occupation=4, story_rows_per_occupation=1,
                                 rounds=4, versions=("v2", "v3"), story_max_new_tokens=8,
                                 n_bootstrap=20, sft_epochs=1, story_check_rounds=2)
  assert settings.lora_rank == 32 and not settings.analyses
  assert settings.lora_targets == ("all-linear",) == demo.REAL.lora_targets
  for model in (str(ckpt), None):  # --steering-placement: the original's, for either model
    placed = demo.settings_for(quick=True, model=model, steering_placement="user_turn")
    assert placed.steering_placement == "user_turn" != settings.steering_placement
  run_dir = tmp_path / "run"
  results = demo.run_demo(["gender_real_us"], str(run_dir), model=str(ckpt), settings=settings,
                          progress=False, ablations=[])
  table = results["gender_real_us"]
  assert set(table) == set(demo.METHODS) - {"kl_only", "kto_only"}  # the ablations not asked for
  assert not list((run_dir / "gender_real_us" / "runs").glob("k*_only_lr*"))
  for method, versions in table.items():
    assert set(versions) == {"v2", "v3"}
    assert 0 <= versions["v3"]["unparsed_rate"] <= 1 and versions["v2"]["exact_answer_mae"] >= 0
  ds = run_dir / "gender_real_us"
  assert not (ds / "base").exists()  # nothing trained before the methods
  assert (ds / "occupations_v2.png").stat().st_size > 10_000  # per occupation, against the target
  meta = json.loads((ds / "zero_shot" / "eval" / "metrics.json").read_text())["meta"]
  assert meta["base_model"] == str(ckpt)
  selection = json.loads((ds / "selection.json").read_text())
  for method in ("ift", "ours", "dpo"):
    cfg = RunDir(str(ds / "runs" / f"{method}_lr{selection[method]['lr']:g}")).read_config()
    assert cfg.model.checkpoint == str(ckpt) and cfg.model.params is None
    assert cfg.model.scan_layers and cfg.model.remat == "full"  # REAL's: the memory of a story pair
    assert (cfg.lora.enabled, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (True, 32, 16.0,
                                                                                    0.05)
    assert cfg.lora.targets == ["all-linear"]
    for scores in selection[method]["heldout_mae"].values():  # sampled stories were judged
      assert 0.0 <= scores["story_failed"] <= 1.0
    run = ds / "runs" / f"{method}_lr{selection[method]['lr']:g}"
    checked = [json.loads(line) for line in (run / "heldout_stories.jsonl").open()]
    assert {r["wording"] for r in checked} == {"trained", "unseen"}  # what the check saw
    assert all(isinstance(r["failed"], bool) and r["response"] is not None for r in checked)
    assert cfg.data.stories and cfg.data.story_rows_per_occupation == 1
  marker = json.loads((run_dir / "demo.json").read_text())
  assert marker["model"] == str(ckpt)
  text = (run_dir / "results.md").read_text()  # no analyses: no empty sections for them
  assert text.startswith("# distfair demo (default, model my model, seed 0)")
  assert "Decoding sensitivity" not in text and "mismatched pairs" not in text
  assert "| v3 unparsed | v3 bare answers |" in text  # stories that are a category word alone
  timings = json.loads((run_dir / "timings.json").read_text())["datasets"]["gender_real_us"]
  wall = text.split("## Wall time")[1]
  assert f"| gender_real_us | {sum(t for k, t in timings.items() if 'eval:' not in k):.0f} |" in wall
  assert any(k.endswith(" held-out") for k in timings)  # the selection's scoring is timed too
  # Each timed piece's memory: its peak, what stayed resident after release(), what that freed.
  mem = json.loads((run_dir / "gender_real_us" / "memory.json").read_text())
  assert set(mem) == set(timings)
  assert all(m["peak_gib"] >= m["resident_gib"] > 0 and m["released_gib"] >= 0
             for m in mem.values())
  # Resumed, the demo re-scores and re-samples nothing: held-out scores from each run's
  # heldout.json, evaluations from their metrics.json.
  def fail(*args, **kwargs):
    raise AssertionError("computed again")
  monkeypatch.setattr(demo_selection, "heldout_mae", fail)
  monkeypatch.setattr(demo_dataset.eval_lib, "evaluate", fail)
  assert demo.run_demo(["gender_real_us"], str(run_dir), model=str(ckpt), settings=settings,
                       progress=False, ablations=[]) == results
  with pytest.raises(InputError, match="demo --model"):
    demo.run_demo(["gender_real_us"], str(tmp_path / "x"), model=str(tmp_path / "nothing"))


def test_a_preempted_stage_keeps_its_time_for_the_resumed_attempt(monkeypatch):
  """timings.json: a training stage stopped by SIGTERM (resumed later from its checkpoint) counts
  the time before the stop with the resumed attempt's; a completed key is not overwritten."""
  from types import SimpleNamespace
  from distfair_jax.train.preemption import Preempted
  me = SimpleNamespace(timings={}, _save_json=lambda name, doc: None,
                       _release=lambda key, record: None)
  clock = iter([0.0, 5.0, 10.0, 13.0, 20.0, 30.0])
  monkeypatch.setattr(demo_dataset.time, "perf_counter", lambda: next(clock))

  def stopped():
    raise Preempted("sft: SIGTERM")

  with pytest.raises(Preempted):
    demo.Demo._timed(me, "sft@0.001", stopped)
  assert me.timings == {"sft@0.001 (before resuming)": 5.0}
  assert demo.Demo._timed(me, "sft@0.001", lambda: "done") == "done"
  assert me.timings == {"sft@0.001": 8.0}
  demo.Demo._timed(me, "sft@0.001", lambda: None)  # reused: the first completion's time stays
  assert me.timings == {"sft@0.001": 8.0}


def test_ablations_run_on_the_datasets_named(tmp_path, monkeypatch):
  """run_demo(ablations=[...]): only those datasets' runs train and evaluate kl_only and kto_only
  (the CLI's default from a given model: gender_real_us); a name not run is refused in one line."""
  import argparse
  import dataclasses
  from distfair_jax.commands import demo as demo_cmd
  seen = {}

  class FakeDemo:
    def __init__(self, dataset, run_dir, *, settings, seed, tokenizer_dir, progress,
                 base_model=None, ablations=True, rates_from=None):
      self.dataset, self.timings = dataset, {}
      seen[dataset] = ablations

    def run(self):
      return {"ours": {"v2": {"mae": 0.1}}}

  monkeypatch.setattr(demo_runner, "Demo", FakeDemo)
  monkeypatch.setattr(demo_runner, "_tokenizer", lambda run_dir, ds: str(tmp_path / "tok"))
  settings = dataclasses.replace(demo.QUICK, analyses=False)
  demo.run_demo(["gender_real_us", "gender_even_us"], str(tmp_path / "a"), quick=True,
                settings=settings, ablations=["gender_real_us"])
  assert seen == {"gender_real_us": True, "gender_even_us": False}
  demo.run_demo(["gender_even_us"], str(tmp_path / "b"), quick=True, settings=settings)
  assert seen["gender_even_us"] is True  # default: every dataset
  with pytest.raises(InputError, match=r"^demo: ablations: expected some of the datasets run "
                                       r"\(gender_even_us\), got race_even_us$"):
    demo.run_demo(["gender_even_us"], str(tmp_path / "c"), settings=settings,
                  ablations=["race_even_us"])
  args = lambda text, model=None: argparse.Namespace(ablations=text, model=model)
  both = ["gender_real_us", "gender_even_us"]
  assert demo_cmd._ablations(args(None), both) is None
  assert demo_cmd._ablations(args(None, "m"), both) == ["gender_real_us"]
  assert demo_cmd._ablations(args(None, "m"), ["race_even_us"]) == []
  assert demo_cmd._ablations(args("all", "m"), both) is None
  assert demo_cmd._ablations(args("none"), both) == []
  assert demo_cmd._ablations(args("gender_even_us, race_even_us"), both) == ["gender_even_us",
                                                                             "race_even_us"]



def test_tune_on_one_dataset_then_reuse_its_rates(tmp_path, monkeypatch):
  """``tune_on`` (demo.REAL's gender_real_us): that dataset runs first and selects from the grids;
  every other dataset of the run directory trains each method at the rate it selected (a
  one-point grid), or at the whole grid where no selection exists; tables keep the order asked."""
  import dataclasses
  import types
  order = []
  # Demo._grid on a stand-in with the attributes it reads (and Demo._rate_source, which it calls)
  grid = lambda d, name, lrs: demo.Demo._grid(
      types.SimpleNamespace(_rate_source=lambda n: demo.Demo._rate_source(d, n)), name, lrs)

  class FakeDemo:
    def __init__(self, dataset, run_dir, *, settings, seed, tokenizer_dir, progress,
                 base_model=None, ablations=True, rates_from=None):
      self.dataset, self.timings = dataset, {}
      order.append(dataset)

    def run(self):
      return {"ours": {"v2": {"mae": 0.1}}}

  monkeypatch.setattr(demo_runner, "Demo", FakeDemo)
  monkeypatch.setattr(demo_runner, "_tokenizer", lambda run_dir, ds: str(tmp_path / "tok"))
  settings = dataclasses.replace(demo.QUICK, analyses=False, tune_on="gender_real_us")
  out = demo.run_demo(["gender_even_us", "gender_real_us"], str(tmp_path / "a"), quick=True,
                      settings=settings)
  assert order == ["gender_real_us", "gender_even_us"] and list(out) == order[::-1]
  assert demo.REAL.tune_on == "gender_real_us" and demo.DEFAULT.tune_on is None
  grids = (1e-4, 5e-4)
  other = types.SimpleNamespace(s=settings, dataset="gender_even_us", rates_from=None,
                                dir=str(tmp_path / "r" / "gender_even_us"))
  assert grid(other, "ours", grids) == grids  # nothing selected yet
  (tmp_path / "r" / "gender_real_us").mkdir(parents=True)
  (tmp_path / "r" / "gender_real_us" / "selection.json").write_text(
      json.dumps({"sft": {"lr": 1e-3}, "ours": {"lr": 5e-4}}))
  assert grid(other, "ours", grids) == (5e-4,)
  assert grid(other, "sft", (1e-4, 1e-3)) == (1e-3,)
  assert grid(other, "dpo", grids) == grids  # not selected there
  tuned = types.SimpleNamespace(s=settings, dataset="gender_real_us", rates_from=None,
                                dir=str(tmp_path / "r" / "gender_real_us"))
  assert grid(tuned, "ours", grids) == grids
  # A later seed (``tune_first_seed``): the first seed's selection of the same dataset first,
  # then tune_on's.
  first = tmp_path / "seed0" / "gender_even_us"
  first.mkdir(parents=True)
  (first / "selection.json").write_text(json.dumps({"ours": {"lr": 1e-4}}))
  later = types.SimpleNamespace(s=settings, dataset="gender_even_us", rates_from=str(first.parent),
                                dir=str(tmp_path / "r" / "gender_even_us"))
  assert grid(later, "ours", grids) == (1e-4,)
  assert grid(later, "sft", (1e-4, 1e-3)) == (1e-3,)  # not there: tune_on's
  assert grid(later, "dpo", grids) == grids
  alone = types.SimpleNamespace(s=dataclasses.replace(settings, tune_on=None), rates_from=None,
                                dataset="gender_even_us", dir=str(tmp_path / "r" / "gender_even_us"))
  assert grid(alone, "ours", grids) == grids
  # Rates fixed beforehand (``--rates``) come first: before the first seed's and tune_on's.
  fixed = types.SimpleNamespace(s=dataclasses.replace(settings, rates=(("ours", 3e-4),)),
                                dataset="gender_even_us", rates_from=str(first.parent),
                                dir=str(tmp_path / "r" / "gender_even_us"))
  assert grid(fixed, "ours", grids) == (3e-4,)
  assert grid(fixed, "sft", (1e-4, 1e-3)) == (1e-3,)  # not fixed: tune_on's as before


def test_a_carried_over_rate_that_fails_the_checks_here_brings_back_the_grid(tmp_path,
                                                                             monkeypatch):
  """A rate from another dataset (``--rates``, ``tune_on``) is trained first; where its held-out
  scores fail the selection's bounds on this dataset (sentiment_even_us' ours at gender_real_us'
  5e-4: 42.9% of the sampled stories failed), the rest of the grid is trained and the rule
  selects among them all; where they pass, nothing more is trained; a later seed's rate stays."""
  import dataclasses
  import types
  trained = []
  # lr -> (MAE, non-answer, bare-answer mass, stories failed)
  scores = {5e-4: (0.008, 0.001, 0.37, 0.43), 1e-4: (0.03, 0.002, 0.01, 0.05)}
  monkeypatch.setattr(demo_dataset, "run_config", lambda demo_, run, *a, lr, **k: lr)
  monkeypatch.setattr(demo_dataset, "train", lambda lr, records: trained.append(lr))
  monkeypatch.setattr(demo_dataset, "cached_heldout_mae",
                      lambda demo_, run, steered: scores[float(run.rsplit("_lr", 1)[1])])

  def fake(settings, rates_from=None):
    d = object.__new__(demo.Demo)
    d.dataset, d.s, d.dir, d.seed, d.rates_from = ("sentiment_even_us", settings,
                                                   str(tmp_path / "sentiment_even_us"), 0,
                                                   rates_from)
    d.timings, d.memory, d.data = {}, {}, types.SimpleNamespace(records={})
    d.base_model = "given"
    os.makedirs(d.dir, exist_ok=True)
    return d

  grid = (1e-4, 5e-4)
  given = dataclasses.replace(demo.QUICK, rates=(("ours", 5e-4),))
  best, run, held = fake(given).train_candidates("ours", ["hybrid"], grid, steered=True)
  assert trained == [5e-4, 1e-4] and best == 1e-4 and run.endswith("ours_lr0.0001")
  assert set(held) == {5e-4, 1e-4} and held[5e-4]["story_failed"] == 0.43
  assert not demo.passes(5e-4, {5e-4: 0.001}, {5e-4: 0.37}, {5e-4: 0.43})
  assert demo.passes(1e-4, {1e-4: 0.001}, {1e-4: 0.01}, {1e-4: 0.05})
  # A carried-over rate that passes: trained alone.
  trained.clear()
  scores[5e-4] = (0.008, 0.001, 0.01, 0.05)
  best, _, held = fake(given).train_candidates("ours", ["hybrid"], grid, steered=True)
  assert trained == [5e-4] and best == 5e-4 and list(held) == [5e-4]
  # A later seed's rate (the first seed's selection) stays, failing or not.
  trained.clear()
  scores[5e-4] = (0.008, 0.001, 0.37, 0.43)
  first = tmp_path / "seed0" / "sentiment_even_us"
  first.mkdir(parents=True)
  (first / "selection.json").write_text(json.dumps({"ours": {"lr": 5e-4}}))
  best, _, _ = fake(demo.QUICK, rates_from=str(first.parent)).train_candidates(
      "ours", ["hybrid"], grid, steered=True)
  assert trained == [5e-4] and best == 5e-4


def test_rates_fixed_beforehand_on_the_command_line():
  """``--rates``: NAME=RATE pairs into ``DemoSettings.rates`` through ``settings_for``; a name
  outside sft, ift, dpo and the steered methods, a repeated name or a rate that is not a positive
  number: one line naming the item and what was expected."""
  from distfair_jax import cli
  assert demo.parse_rates(" sft=1e-3, ift=0.001,ours=5e-4,dpo=1e-5") == (
      ("sft", 1e-3), ("ift", 1e-3), ("ours", 5e-4), ("dpo", 1e-5))
  assert demo.settings_for(quick=True, model=None, rates=(("dpo", 1e-5),)).rates == (
      ("dpo", 1e-5),)
  assert demo.settings_for(quick=True, model=None).rates == () == demo.REAL.rates
  for text, words in [("base=1e-3", "NAME one of sft, ift, dpo, ours, kl_only, kto_only"),
                      ("sft=1e-3,sft=1e-4", "once per name"), ("ours", "NAME=RATE"),
                      ("ours=-1", "positive learning rate for ours, got '-1'"),
                      ("ours=fast", "got 'fast'"), ("ours=nan", "got 'nan'"), (",", "got ','")]:
    with pytest.raises(InputError) as err:
      demo.parse_rates(text)
    assert str(err.value).startswith("demo: --rates: ") and words in str(err.value), err.value
    assert "\n" not in str(err.value)
  assert cli.build_parser().parse_args(["demo", "--rates", "ours=5e-4"]).rates == "ours=5e-4"


def test_stage_2s_nll_term_from_the_command_line_trains_in_runs_of_its_own(tmp_path,
                                                                         monkeypatch):
  """``--nll-weight``: ``DemoSettings.nll_weight`` into stage 2's config (``hybrid.nll_weight``),
  in runs named ``<method>_lr<rate>_nll<weight>`` beside the paper's (stage 1 and DPO keep their
  names); a negative or infinite weight is one line."""
  import types
  from distfair_jax import cli
  from distfair_jax.demo import configs as demo_configs
  settings = demo.settings_for(quick=True, model=None, nll_weight=0.5)
  assert settings.nll_weight == 0.5 and demo.REAL.nll_weight == 0.0
  d = types.SimpleNamespace(s=settings, seed=0, base_model=None, tokenizer_dir=None,
                            dataset="race_even_us", spec_path=None, progress=False)
  cfg = demo_configs.run_config(d, str(tmp_path / "r"), ["sft", "hybrid"])
  assert cfg.hybrid.nll_weight == 0.5
  for bad in (-1.0, float("inf")):
    with pytest.raises(InputError, match=r"^demo: --nll-weight: expected a finite number >= 0"):
      demo.settings_for(quick=True, model=None, nll_weight=bad)
  assert cli.build_parser().parse_args(["demo", "--nll-weight", "0.5"]).nll_weight == 0.5

  runs = []
  monkeypatch.setattr(demo_dataset, "run_config", lambda demo_, run, *a, lr, **k: run)
  monkeypatch.setattr(demo_dataset, "train", lambda run, records: runs.append(run))
  monkeypatch.setattr(demo_dataset, "cached_heldout_mae",
                      lambda demo_, run, steered: (0.01, 0.001, 0.01, 0.05))
  fake = object.__new__(demo.Demo)
  fake.dataset, fake.s, fake.dir, fake.seed, fake.rates_from = (
      "race_even_us", settings, str(tmp_path / "race_even_us"), 0, None)
  fake.timings, fake.memory, fake.data = {}, {}, types.SimpleNamespace(records={})
  fake.base_model = "given"
  for name, stages in (("ours", ["sft", "hybrid"]), ("sft", ["sft"]), ("dpo", ["ift", "dpo"])):
    fake.train_candidates(name, stages, (1e-4,), steered=name != "dpo")
  assert [os.path.basename(r) for r in runs] == ["ours_lr0.0001_nll0.5", "sft_lr0.0001",
                                                 "dpo_lr0.0001"]


def test_a_given_models_evaluation_serves_the_datasets_with_its_questions(tmp_path):
  """``same_model_eval``: another dataset's evaluation of the very same model under the same
  name (a given model's zero-shot), whose samples evaluate reuses; not this dataset's own, not
  another model's."""
  model = tmp_path / "model"
  model.mkdir()
  (tmp_path / "alias").symlink_to(model)
  for ds, run in (("gender_real_us", tmp_path / "alias"), ("race_even_us", tmp_path / "other")):
    eval_dir = tmp_path / "run" / ds / "zero_shot" / "eval"
    eval_dir.mkdir(parents=True)
    (eval_dir / "metrics.json").write_text(json.dumps({"meta": {"run": str(run)}}))
  own = str(tmp_path / "run" / "gender_even_us")
  assert demo_dataset.same_model_eval(own, "zero_shot", str(model)) == str(
      tmp_path / "run" / "gender_real_us" / "zero_shot" / "eval")
  assert demo_dataset.same_model_eval(own, "ift", str(model)) is None
  assert demo_dataset.same_model_eval(own, "zero_shot", str(tmp_path / "third")) is None
  assert demo_dataset.same_model_eval(str(tmp_path / "run" / "gender_real_us"), "zero_shot",
                                      str(model)) is None
