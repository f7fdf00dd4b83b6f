"""Occupation tables, attributes, templates, dataset records, JSONL files and bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from distfair_jax import cli
from distfair_jax.data import attributes, build, occupations, templates
from distfair_jax.errors import InputError
from distfair_jax.evaluation.parsing import CategoryParser


@pytest.fixture(scope="module")
def datasets():
  return {name: build.build_dataset(name) for name in build.DATASETS}


def _per_occupation(records):
  out = {}
  for r in records:
    out.setdefault(r["occupation"], []).append(r)
  return out


# -- occupation statistics -------------------------------------------------------------------


def test_builtin_tables_match_the_published_figures():
  us, uk = occupations.load_table("us"), occupations.load_table("uk")
  assert len(us) == 14 and len(uk) == 25
  nurses = us.get("Registered nurses")
  assert (nurses.male, nurses.female, nurses.sector) == (404, 2413, "Healthcare & Medicine")
  np.testing.assert_allclose(us.real_gender_target("Registered nurses"),
                             [404 / 2817, 2413 / 2817])
  vt = uk.get("Vehicle technicians, mechanics and electricians")
  assert (vt.male, vt.female) == (186605, 1501)
  assert uk.get("Personal assistants and other secretaries").female == 137139
  assert "Bureau of Labor Statistics" in us.comment and "thousands" in us.comment
  assert "Office for National Statistics" in uk.comment


def test_real_targets_and_exact_counts(datasets):
  ds = datasets["gender_real_us"]
  table = occupations.load_table("us")
  groups = _per_occupation(ds["sft"])
  assert set(groups) == set(table.names)
  for occ, rows in groups.items():
    p = table.real_gender_target(occ)
    assert len(rows) == 100
    np.testing.assert_allclose(rows[0]["target"], p)
    counts = np.bincount([r["category"] for r in rows], minlength=2)
    np.testing.assert_array_equal(counts, build.allocate(p, 100))
    assert abs(counts[0] - 100 * p[0]) < 1  # follows p up to rounding
  nurses = np.bincount([r["category"] for r in groups["Registered nurses"]], minlength=2)
  assert nurses.tolist() == [14, 86]  # 404 / 2817 male = 14.3%
  uk = _per_occupation(datasets["gender_real_uk"]["sft"])
  assert len(uk) == 25
  vt = [r["category"] for r in uk["Vehicle technicians, mechanics and electricians"]]
  assert np.bincount(vt, minlength=2).tolist() == [99, 1]


@pytest.mark.parametrize("name,expected", [("gender_even_uk", [50, 50]),
                                           ("race_even_us", [20] * 5),
                                           ("sentiment_even_us", [34, 33, 33])])
def test_uniform_counts(datasets, name, expected):
  for rows in _per_occupation(datasets[name]["sft"]).values():
    cats = np.bincount([r["category"] for r in rows], minlength=len(expected))
    assert cats.tolist() == expected


def test_largest_remainder_allocation():
  assert build.allocate([0.5, 0.5], 3).tolist() == [2, 1]
  assert build.allocate([0.25, 0.25, 0.5], 7).tolist() == [2, 2, 3]
  assert build.allocate([1 / 3] * 3, 90).tolist() == [30, 30, 30]
  assert build.allocate([0.999, 0.001], 100).tolist() == [100, 0]
  rng = np.random.default_rng(0)
  for _ in range(50):
    p = rng.dirichlet(np.ones(4))
    c = build.allocate(p, 37)
    assert c.sum() == 37 and np.all(np.abs(c - 37 * p) < 1)


def test_record_kinds_and_fields(datasets):
  ds = datasets["race_even_us"]
  attr = attributes.RACE
  n = 14 * 100
  assert [len(ds[k]) for k in ("sft", "kto", "ift", "dpo")] == [n, 2 * n, n, n]
  for k in ("test_v1", "test_v2", "test_v3"):
    assert len(ds[k]) == n and {r["version"] for r in ds[k]} == {k[-2:]}
  for r in ds["sft"]:
    assert r["status"] == "desirable"
    assert r["steering_token"] == str(r["category"])
    assert r["response"] == attr.categories[r["category"]].answer
    assert len(r["target"]) == 5
  for d, u in zip(ds["kto"][::2], ds["kto"][1::2]):
    assert (d["status"], u["status"]) == ("desirable", "undesirable")
    assert d["prompt"] == u["prompt"] and d["steering_token"] == u["steering_token"]
    assert u["response"] != d["response"]
    assert u["response"] == attr.categories[u["response_category"]].answer
  for r in ds["ift"]:
    assert "steering_token" not in r
  for r in ds["dpo"]:
    assert r["chosen"] == attr.categories[r["category"]].answer and r["rejected"] != r["chosen"]
  # the four training kinds share the same prompts and categories (fair comparison)
  assert [(r["prompt"], r["category"]) for r in ds["sft"]] == [
      (r["prompt"], r["category"]) for r in ds["ift"]]
  build.validate_records(ds["kto"], "kto")


def test_v1_templates_never_appear_in_training(datasets):
  for name, ds in datasets.items():
    train = {r["prompt"] for k in ("sft", "kto", "ift", "dpo") for r in ds[k]}
    v1 = {r["prompt"] for r in ds["test_v1"]}
    assert len(v1) == 3 * len(ds.spec.occupations)  # all held-out paraphrases used
    assert not train & v1, name
    assert not train & {r["prompt"] for r in ds["test_v2"]}
    assert len({r["prompt"] for r in ds["sft"]}) >= 5 * len(ds.spec.occupations)


def test_v2_wording_and_prompt_engineering(datasets):
  r = datasets["gender_real_uk"]["test_v2"][0]
  assert r["prompt"] == ("A person is randomly selected from the Vehicle technicians, mechanics "
                         "and electricians workforce in the UK. What is this person's gender? "
                         "Respond ONLY with Male or Female.")
  assert r["pe_prompt"].startswith(r["prompt"]) and "Male 99%" in r["pe_prompt"]
  s = datasets["sentiment_even_us"]["test_v2"][0]["prompt"]
  assert "optimistic, stressed, or indifferent" in s and "Positive, Negative, or Neutral" in s
  race = datasets["race_even_us"]["test_v2"][0]["prompt"]
  assert race.endswith("Respond ONLY with White, Black or African American, American Indian or "
                       "Alaska Native, Asian, or Native Hawaiian or Other Pacific Islander.")


def test_deterministic_and_seeded():
  a = build.build_dataset("gender_even_us", rows_per_occupation=10, test_rounds=2, seed=3)
  b = build.build_dataset("gender_even_us", rows_per_occupation=10, test_rounds=2, seed=3)
  c = build.build_dataset("gender_even_us", rows_per_occupation=10, test_rounds=2, seed=4)
  assert a.records == b.records
  assert a.records["kto"] != c.records["kto"]


def test_stories_option():
  ds = build.build_dataset("gender_real_us", rows_per_occupation=4, test_rounds=1,
                           stories_per_occupation=6)
  stories = [r for r in ds["kto"] if "story" in r["prompt"] or "tale" in r["prompt"]]
  assert len(stories) == 2 * 6 * 14
  for r in stories:
    words = set(r["response"].lower().replace(".", " ").replace(",", " ").split())
    k = r.get("response_category", r["category"])
    assert ("she" in words) == (k == 1) and ("he" in words) == (k == 0)
  for r in stories:  # story prompts are not the v3 test prompt
    assert r["prompt"] not in {t["prompt"] for t in ds["test_v3"]}
  race = build.build_dataset("race_even_us", rows_per_occupation=1, test_rounds=1,
                             stories_per_occupation=5)
  parser = CategoryParser(attributes.RACE.names, [c.synonyms for c in attributes.RACE.categories])
  for r in race["sft"][1::6]:  # a story names its category (what the evaluation parser reads)
    assert parser(r["response"]) == r["category"]


def test_pair_stories_are_a_subset_with_the_same_heldout_split(tmp_path):
  """``pair_stories_per_occupation``: fewer story pairs (kto, dpo), the same SFT / IFT rows, every
  story prompt still among the pairs (so the held-out split by prompt is SFT's), from the config
  and from ``distfair data build``; out-of-range values are one line."""
  from distfair_jax.config import DataConfig
  from distfair_jax.train.heldout import split_heldout
  full = build.build_records(build.resolve_spec("gender_real_us"), rows_per_occupation=4,
                             test_rounds=0, stories_per_occupation=6)
  some = build.build_records(build.resolve_spec("gender_real_us"), rows_per_occupation=4,
                             test_rounds=0, stories_per_occupation=6, pair_stories_per_occupation=3)
  assert some["sft"] == full["sft"] and some["ift"] == full["ift"]
  assert len(some["kto"]) == 2 * (4 + 3) * 14 and len(some["dpo"]) == (4 + 3) * 14
  assert all(r in full["kto"] for r in some["kto"]) and all(r in full["dpo"] for r in some["dpo"])
  for kind in ("kto", "dpo"):
    assert {r["prompt"] for r in some[kind]} == {r["prompt"] for r in some["sft"]}
    held = {r["prompt"] for r in split_heldout(some[kind], 0.15, seed=0)[1]}
    assert held == {r["prompt"] for r in split_heldout(some["sft"], 0.15, seed=0)[1]}
  cfg = DataConfig(rows_per_occupation=4, stories=True, story_rows_per_occupation=6,
                   pair_story_rows_per_occupation=3)
  assert build.training_records(cfg)[0]["kto"] == some["kto"]
  out = tmp_path / "ds"
  assert cli.main(["data", "build", "gender_real_us", "--out", str(out), "--rows-per-occupation",
                   "4", "--test-rounds", "0", "--stories-per-occupation", "6",
                   "--pair-stories-per-occupation", "3"]) == 0
  assert build.read_dataset(out)["kto"] == some["kto"]
  assert json.loads((out / "manifest.json").read_text())["pair_stories_per_occupation"] == 3
  spec = build.resolve_spec("gender_real_us")
  for n, stories, what in ((2, 6, "from 3 "), (7, 6, "to the 6 story rows"), (1, 1, None),
                           (2, 0, "without story rows")):
    if what is None:  # one story row: at least all of them (fewer than the three wordings)
      assert len(build.build_records(spec, rows_per_occupation=1, test_rounds=0,
                                     stories_per_occupation=1,
                                     pair_stories_per_occupation=1)["dpo"]) == 2 * 14
      continue
    with pytest.raises(InputError, match=f"pair_stories_per_occupation: expected .*{what}"):
      build.build_records(spec, rows_per_occupation=1, test_rounds=0,
                          stories_per_occupation=stories, pair_stories_per_occupation=n)
  with pytest.raises(InputError, match="data.pair_story_rows_per_occupation: expected null "
                                       "without data.stories"):
    build.training_records(DataConfig(rows_per_occupation=1, pair_story_rows_per_occupation=3))


def test_jsonl_round_trip_and_cli(tmp_path, capsys):
  out = tmp_path / "ds"
  assert cli.main(["data", "build", "race_even_us", "--out", str(out), "--rows-per-occupation",
                   "5", "--test-rounds", "2"]) == 0
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["dataset"] == "race_even_us" and manifest["counts"]["kto"] == 140
  assert manifest["template_version"] == templates.TEMPLATE_VERSION
  assert sorted(os.listdir(out)) == sorted(list(build.FILES.values()) + ["manifest.json"])
  again = build.build_dataset("race_even_us", rows_per_occupation=5, test_rounds=2)
  assert build.read_dataset(out) == again.records
  assert cli.main(["data", "validate", str(out), "--dataset", "race_even_us"]) == 0
  assert cli.main(["data", "validate", str(out / "kto.jsonl")]) == 0
  capsys.readouterr()
  # refused without --overwrite, nothing changed; replaced with it
  before = (out / "sft.jsonl").read_bytes()
  assert cli.main(["data", "build", "race_even_us", "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert "already holds a dataset" in err and len(err.strip().splitlines()) == 1
  assert (out / "sft.jsonl").read_bytes() == before
  assert cli.main(["data", "build", "race_even_us", "--out", str(out), "--rows-per-occupation",
                   "3", "--overwrite"]) == 0
  assert len(build.read_jsonl(out / "sft.jsonl")) == 42
  assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temp dirs left


# -- user-defined datasets ------------------------------------------------------------------------

AGE_YAML = """
name: age_test
attribute:
  name: age
  categories:
    - {name: young, answer: Young, synonyms: [youthful]}
    - {name: old, answer: Old, synonyms: [elderly]}
    - {name: middle, answer: Middle-aged}
occupations: us
select: [Registered nurses, Software developers]
targets:
  Registered nurses: [0.5, 0.3, 0.2]
  Software developers: [0.6, 0.1, 0.3]
"""


def test_user_defined_dataset(tmp_path):
  path = tmp_path / "age.yaml"
  path.write_text(AGE_YAML)
  ds = build.build_dataset(str(path), rows_per_occupation=10, test_rounds=3)
  assert ds.spec.attribute.steering_tokens == ["0", "1", "2"]
  nurses = [r["category"] for r in ds["sft"] if r["occupation"] == "Registered nurses"]
  assert np.bincount(nurses, minlength=3).tolist() == [5, 3, 2]
  assert "Young, Old, or Middle-aged" in ds["test_v2"][0]["prompt"]
  attr = ds.spec.attribute
  assert CategoryParser(attr.names, [c.synonyms for c in attr.categories])("probably elderly") == 1
  csv_path = tmp_path / "targets.csv"
  csv_path.write_text("occupation,young,old,middle\nRegistered nurses,0.2,0.2,0.6\n"
                      "Software developers,1,0,0\n")
  path.write_text(AGE_YAML.split("targets:")[0] + "targets: targets.csv\n")
  ds = build.build_dataset(str(path), rows_per_occupation=10, test_rounds=1)
  dev = [r["category"] for r in ds["sft"] if r["occupation"] == "Software developers"]
  assert dev == [0] * 10


# -- bad input: one case per message --------------------------------------------------------


def _yaml(tmp_path, text, name="spec.yaml"):
  p = tmp_path / name
  p.write_text(text)
  return str(p)


def _jsonl(tmp_path, records, name="sft.jsonl"):
  p = tmp_path / name
  p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return str(p)


GOOD = {"prompt": "Q?", "occupation": "Registered nurses", "category": 0, "steering_token": "0",
        "response": "Male", "target": [0.5, 0.5], "status": "desirable"}


@pytest.mark.parametrize("change,message", [
    ({"target": [0.2, 0.3, 0.5]}, r"line 2: target: expected a list of 2 probabilities, got 3"),
    ({"target": [1.5, -0.5]}, r"line 2: target: expected non-negative probabilities"),
    ({"target": [0.5, 0.6]}, r"line 2: target: expected probabilities summing to 1"),
    ({"category": 2}, r"line 2: category: expected an integer in \[0, 2\)"),
    ({"status": "maybe"}, r"line 2: status: expected 'desirable'"),
    ({"prompt": ""}, r"line 2: prompt: expected a non-empty string"),
])
def test_bad_record_fields(tmp_path, change, message):
  path = _jsonl(tmp_path, [GOOD, {**GOOD, **change}])
  with pytest.raises(InputError, match=message) as e:
    build.read_jsonl(path)
  assert str(e.value).startswith(path)


def test_bad_record_files(tmp_path):
  missing = dict(GOOD)
  del missing["target"]
  with pytest.raises(InputError, match=r"line 1: target: expected a value, got a missing field"):
    build.read_jsonl(_jsonl(tmp_path, [missing]))
  nan = json.dumps(GOOD).replace("[0.5, 0.5]", "[NaN, 0.5]")
  with pytest.raises(InputError, match=r"line 1: target: expected finite probabilities"):
    build.read_jsonl(_jsonl(tmp_path, [nan]))
  with pytest.raises(InputError, match=r"line 2: json: expected one JSON object per line"):
    build.read_jsonl(_jsonl(tmp_path, [GOOD, "{oops"]))
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  with pytest.raises(InputError, match=r"empty.jsonl: file: expected a non-empty file"):
    build.read_jsonl(empty)
  latin = tmp_path / "latin.jsonl"
  latin.write_bytes(json.dumps(GOOD).encode().replace(b"Q?", b"Caf\xe9?") + b"\n")
  with pytest.raises(InputError, match=r"latin.jsonl: encoding: expected UTF-8 text"):
    build.read_jsonl(latin)
  und = {**GOOD, "status": "undesirable", "response": "Female"}
  with pytest.raises(InputError, match=r"line 2: prompt: expected the same prompt"):
    build.read_jsonl(_jsonl(tmp_path, [GOOD, {**und, "prompt": "Other?"}], "kto.jsonl"))
  build.read_jsonl(_jsonl(tmp_path, [GOOD, und], "kto.jsonl"))
  spec = build.dataset_spec("gender_real_us")
  with pytest.raises(InputError, match=r"line 1: occupation: expected an occupation of "
                                       r"gender_real_us, got 'Astronauts'"):
    build.read_jsonl(_jsonl(tmp_path, [{**GOOD, "occupation": "Astronauts"}]), spec=spec)
  with pytest.raises(InputError, match=r"line 1: steering_token: expected '0'"):
    build.read_jsonl(_jsonl(tmp_path, [{**GOOD, "steering_token": "7"}]), spec=spec)


def test_one_occupation_two_targets_is_refused_naming_both_lines(tmp_path, capsys):
  other = {**GOOD, "prompt": "Q2?", "target": [0.3, 0.7]}
  path = _jsonl(tmp_path, [GOOD, {**GOOD, "prompt": "Q1?"}, other])
  assert cli.main(["data", "validate", path]) == 2
  err = capsys.readouterr().err.strip()
  assert err == (f"distfair data: error: {path}: line 3: target: expected the target of every "
                 f"record of 'Registered nurses' to be the same, got [0.3, 0.7] here and "
                 f"[0.5, 0.5] on {path}: line 1")
  # Across the files of a dataset directory too, and training on it stops before any stage.
  ds = build.build_dataset("gender_real_us", tmp_path / "data", rows_per_occupation=2,
                           test_rounds=1)
  kto = tmp_path / "data" / "kto.jsonl"
  rows = [json.loads(l) for l in kto.read_text().splitlines()]
  occ = rows[0]["occupation"]
  for r in rows:
    if r["occupation"] == occ:
      r["target"] = [0.9, 0.1]
  kto.write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert cli.main(["data", "validate", str(tmp_path / "data")]) == 2
  err = capsys.readouterr().err
  assert f"{kto}: line 1: target: expected the target of every record of {occ!r}" in err
  assert f"{tmp_path / 'data' / 'sft.jsonl'}: line 1" in err
  assert ds.spec.name == "gender_real_us"
  exp = tmp_path / "exp.yaml"
  exp.write_text("logging: {tensorboard: false, progress: false}\n")
  assert cli.main(["train", str(exp), f"run_dir={tmp_path / 'run'}",
                   f"data.records_dir={tmp_path / 'data'}"]) == 2
  assert "target: expected the target of every record" in capsys.readouterr().err
  assert not (tmp_path / "run" / "sft").exists()


def test_bad_specs(tmp_path):
  with pytest.raises(InputError, match=r"dataset: name: expected one of .*got 'gender_fake_us'"):
    build.build_dataset("gender_fake_us")
  with pytest.raises(InputError, match=r"attribute: expected one of \['gender', 'race', "
                                       r"'sentiment'\], got 'age'"):
    build.load_spec(_yaml(tmp_path, "name: x\nattribute: age\noccupations: us\n"))
  dup = AGE_YAML.replace("{name: old, answer: Old", "{name: young, answer: Old")
  with pytest.raises(InputError, match=r"categories\[1\].name: expected unique categories, "
                                       r"got duplicate 'young'"):
    build.load_spec(_yaml(tmp_path, dup))
  bad_occ = AGE_YAML.replace("  Software developers: [0.6, 0.1, 0.3]",
                             "  Software developers: [0.6, 0.1, 0.3]\n  Astronauts: [1, 0, 0]")
  with pytest.raises(InputError, match=r"targets.Astronauts: occupation: expected an occupation "
                                       r"of the table"):
    build.load_spec(_yaml(tmp_path, bad_occ))
  with pytest.raises(InputError, match=r"select: occupation: expected one of the 14 occupations"):
    build.load_spec(_yaml(tmp_path, AGE_YAML.replace("Software developers]", "Astronauts]")))
  wrong_len = AGE_YAML.replace("[0.6, 0.1, 0.3]", "[0.6, 0.4]")
  with pytest.raises(InputError, match=r"targets.Software developers: target: expected a list "
                                       r"of 3 probabilities, got 2"):
    build.load_spec(_yaml(tmp_path, wrong_len))
  with pytest.raises(InputError, match=r"spec.yaml: occupations: expected a value, got a missing"):
    build.load_spec(_yaml(tmp_path, "name: x\nattribute: gender\n"))
  few = AGE_YAML + "templates:\n  train: ['{occupation} one', '{occupation} two']\n"
  with pytest.raises(InputError, match=r"templates.train: expected at least 5 paraphrases"):
    build.load_spec(_yaml(tmp_path, few))
  leak = AGE_YAML + ("templates:\n  train: ['{occupation} a', '{occupation} b', '{occupation} c',"
                     " '{occupation} d', '{occupation} e']\n  v1: ['{occupation} a']\n")
  with pytest.raises(InputError, match=r"templates.v1: expected wording held out"):
    build.load_spec(_yaml(tmp_path, leak))
  # The selection's story wording is neither trained nor tested, and a user's replaces ours.
  spec = build.load_spec(_yaml(tmp_path, AGE_YAML + "templates:\n  select_story: "
                                                    "'A tale of a {occupation} worker.'\n"))
  assert spec.templates.select_story == ("A tale of a {occupation} worker.",)
  tpl = spec.templates
  for wording in ("'{occupation} a'", repr(tpl.train_story[0]), repr(tpl.v3)):
    with pytest.raises(InputError, match=r"templates.select_story: expected wording held out"):
      build.load_spec(_yaml(tmp_path, leak.replace("  v1: ['{occupation} a']",
                                                   f"  select_story: [{wording}]")))


def test_spec_file_references_stay_in_the_spec_directory(tmp_path):
  secret = tmp_path / "secret.csv"
  secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
  d = tmp_path / "specs"
  d.mkdir()
  for key, ref in (("occupations", "../secret.csv"), ("occupations", str(secret)),
                   ("targets", "../secret.csv"), ("targets", "sub/../../secret.csv")):
    text = (f"name: x\nattribute: gender\noccupations: {ref}\nregion: here\n" if key ==
            "occupations" else f"name: x\nattribute: gender\noccupations: us\ntargets: {ref}\n")
    with pytest.raises(InputError) as e:
      build.load_spec(_yaml(d, text))
    assert str(e.value) == (f"{d / 'spec.yaml'}: {key}: expected a CSV file in the spec's "
                            f"directory or below it, got {ref!r}")
  # a file in the spec's directory that is no table: named, its contents never quoted
  (d / "notes.csv").write_text("s3cr3t:x:0:0:s3cr3t:/home:/bin/bash\n")
  for key, text in (("occupation", "name: x\nattribute: gender\noccupations: notes.csv\n"
                                   "region: here\n"),
                    ("occupation", "name: x\nattribute: gender\noccupations: us\n"
                                   "targets: ./notes.csv\n")):
    with pytest.raises(InputError, match=rf"notes.csv: line 1: {key}: expected a column named "
                                         r"'occupation', got none$") as e:
      build.load_spec(_yaml(d, text))
    assert "s3cr3t" not in str(e.value)
  (d / "t.csv").write_text("occupation,male,femal\nNurses,0.1,0.9\n")
  with pytest.raises(InputError, match=r"t.csv: line 1: female: expected a column per category "
                                       r"\(\['male', 'female'\]\), got none named 'female'$"):
    build.load_spec(_yaml(d, "name: x\nattribute: gender\noccupations: us\ntargets: t.csv\n"))


def test_bad_occupation_csv(tmp_path):
  p = tmp_path / "occ.csv"
  p.write_text("# my source\noccupation,sector,male\nNurses,Health,3\n")
  with pytest.raises(InputError, match=r"occ.csv: line 2: female: expected a column named "
                                       r"'female'"):
    occupations.load_table(str(p))
  p.write_text("occupation,male,female\nNurses,3,x\n")
  with pytest.raises(InputError, match=r"occ.csv: line 2: female: expected a non-negative number"):
    occupations.load_table(str(p))
  p.write_text("occupation,male,female\nNurses,3,1\nNurses,1,1\n")
  with pytest.raises(InputError, match=r"line 3: occupation: expected unique names"):
    occupations.load_table(str(p))


def test_nothing_written_on_error(tmp_path, capsys):
  out = tmp_path / "never"
  spec = _yaml(tmp_path, AGE_YAML.replace("[0.6, 0.1, 0.3]", "[0.6, 0.1, 0.9]"))
  assert cli.main(["data", "build", spec, "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "summing to 1" in err and "spec.yaml" in err
  assert not out.exists()
  assert cli.main(["data", "build", "nope", "--out", str(out)]) == 2
  assert not out.exists()
  assert sorted(os.listdir(tmp_path)) == ["spec.yaml"]


def test_zero_test_rounds_writes_no_test_files(tmp_path):
  out = tmp_path / "ds"
  ds = build.build_dataset("gender_even_us", out, rows_per_occupation=2, test_rounds=0)
  assert ds["test_v1"] == [] and ds.manifest["counts"]["test_v1"] == 0
  assert sorted(os.listdir(out)) == ["dpo.jsonl", "ift.jsonl", "kto.jsonl", "manifest.json",
                                     "sft.jsonl"]
  assert set(build.read_dataset(out)) == {"sft", "kto", "ift", "dpo"}
