"""Tests of the multi-round evaluation runner (distfair_jax.evaluation.evaluate) and `distfair eval`."""

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from distfair_jax.evaluation import evaluate
from distfair_jax.evaluation import metrics
from distfair_jax.config import DecodeConfig, EvalConfig, config_to_dict
from distfair_jax.data.attributes import GENDER
from distfair_jax.data.build import build_dataset
from distfair_jax.errors import InputError
from distfair_jax.evaluation.judges import RulesJudge
from distfair_jax.model.llama import Llama, LlamaConfig
from distfair_jax.data.tokenizer import build_tiny_tokenizer

ROW_FIELDS = {"occupation", "prompt", "steering_token", "response", "category", "round"}
DECODE = DecodeConfig(max_new_tokens=4, story_max_new_tokens=8)


@pytest.fixture(scope="module")
def tokenizer():
  return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
  config = LlamaConfig(vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
  return Llama(config, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def dataset():
  ds = build_dataset("gender_real_us", test_rounds=4)
  keep = ds.spec.occupations[:3]
  return {v: [r for r in ds[f"test_{v}"] if r["occupation"] in keep] for v in ("v1", "v2", "v3")}


def _rows(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_end_to_end_writes_rows_metrics_and_report(tmp_path, model, tokenizer, dataset):
  # v2 runs in the other tests (fewer compiles here).
  config = EvalConfig(versions=["v1", "v3"], rounds=4, steering="model", decode=DECODE,
                      n_bootstrap=20)
  result = evaluate.evaluate(model, tokenizer, GENDER, dataset, tmp_path, config=config,
                             metadata={"model": "tiny-random"})
  eval_dir = tmp_path / "eval"
  for version in ("v1", "v3"):
    rows = _rows(eval_dir / f"{version}.jsonl")
    assert len(rows) == 12  # 3 occupations x 4 rounds
    for row in rows:
      assert set(row) == ROW_FIELDS
      assert row["steering_token"] in ("0", "1")
      assert row["category"] is None or row["category"] in (0, 1)
      assert isinstance(row["response"], str)
    occupations = [r["occupation"] for r in rows]
    assert sorted(set(occupations)) == sorted({r["occupation"] for r in dataset[version]})
    assert all(occupations.count(o) == 4 for o in set(occupations))
    # The prompts of v1 cycle through its paraphrases exactly as the test set lists them.
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in dataset[version]]

  doc = json.loads((eval_dir / "metrics.json").read_text())
  assert set(doc["versions"]) == {"v1", "v3"}
  assert "bare_answer_rate" not in doc["versions"]["v1"]  # stories only
  assert doc["versions"]["v3"]["bare_answer_rate"] == evaluate.bare_answer_rate(
      _rows(eval_dir / "v3.jsonl"), GENDER)
  # An evaluation written before the rate existed gains it from its rows, nothing resampled.
  older = json.loads((eval_dir / "metrics.json").read_text())
  del older["versions"]["v3"]["bare_answer_rate"]
  (eval_dir / "metrics.json").write_text(json.dumps(older))
  (eval_dir / "report.md").unlink()
  again = evaluate.with_bare_answer_rates(eval_dir, GENDER)
  assert again["versions"] == doc["versions"] == json.loads(
      (eval_dir / "metrics.json").read_text())["versions"]
  assert "bare answers" in (eval_dir / "report.md").read_text()
  for v in doc["versions"].values():
    assert 0.0 <= v["mae"] <= 1.0 and "exact_mae" in v and v["n_samples"] == 12
    exact = np.array([o["exact"] for o in v["per_occupation"]])
    np.testing.assert_allclose(exact.sum(-1), 1.0, atol=1e-6)
  meta = doc["meta"]
  assert meta["decoding"] == config_to_dict(DECODE)
  assert meta["steering"] == "model" and meta["model"] == "tiny-random"
  assert meta["steering_token_ids"] == [int(tokenizer.convert_tokens_to_ids(t)) for t in "01"]
  assert result["versions"]["v3"]["mae"] == doc["versions"]["v3"]["mae"]
  assert (eval_dir / "report.md").is_file()
  assert (eval_dir / "plots" / "v3.png").is_file()
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".eval")]  # no temp dirs left

  with pytest.raises(InputError, match="overwrite"):
    evaluate.evaluate(model, tokenizer, GENDER, dataset, tmp_path, config=config)


@pytest.mark.slow
def test_no_steering_prompt_engineering_and_overwrite(tmp_path, model, tokenizer, dataset):
  (tmp_path / "eval").mkdir()
  (tmp_path / "eval" / "old.txt").write_text("old")
  config = EvalConfig(versions=["v2"], rounds=None, steering="none", decode=DECODE,
                      n_bootstrap=0, prompt_engineering=True, plots=False)
  evaluate.evaluate(model, tokenizer, GENDER, dataset, tmp_path, config=config, overwrite=True)
  assert sorted(os.listdir(tmp_path / "eval")) == ["metrics.json", "report.md", "v2.jsonl"]
  rows = _rows(tmp_path / "eval" / "v2.jsonl")
  assert len(rows) == 12 and all(r["steering_token"] is None for r in rows)
  assert rows[0]["prompt"] == dataset["v2"][0]["pe_prompt"]
  doc = json.loads((tmp_path / "eval" / "metrics.json").read_text())
  assert "exact_mae" not in doc["versions"]["v2"]
  assert doc["meta"]["steering_token_ids"] is None


def test_categorize_parses_answers_and_judges_stories():
  rows = [{"response": "Male? No, I think Female."}, {"response": "no idea"},
          {"response": "MEN"}]
  evaluate.categorize(rows, GENDER, story=False)
  assert [r["category"] for r in rows] == [1, None, None]      # the paper's rule: names only
  evaluate.categorize(rows, GENDER, story=False, parser="synonyms")
  assert [r["category"] for r in rows] == [1, None, 0]
  with pytest.raises(InputError, match="eval.parser"):
    evaluate.categorize(rows, GENDER, story=False, parser="fuzzy")
  stories = [{"response": "Sarah said she loved her job."}, {"response": "It rained."}]
  evaluate.categorize(stories, GENDER, story=True, judge=RulesJudge())
  assert [r["category"] for r in stories] == [1, None]
  # A story prompt answered with a category word alone: judged as that category, and counted.
  stories += [{"response": "Female"}, {"response": "Male."}]
  evaluate.categorize(stories, GENDER, story=True, judge=RulesJudge())
  assert [r["category"] for r in stories] == [1, None, 1, 0]
  assert evaluate.bare_answer_rate(stories, GENDER) == 0.5


def test_group_records_cycles_rounds_and_validates():
  recs = [{"occupation": "a", "prompt": p, "target": [0.5, 0.5]} for p in ("x", "y")]
  slots, targets = evaluate._group_records(recs, "v1", "prompt", 5, 2)
  assert [s["prompt"] for s in slots] == ["x", "y", "x", "y", "x"]
  assert targets == {"a": [0.5, 0.5]}
  with pytest.raises(InputError, match="target"):
    evaluate._group_records([{"occupation": "a", "prompt": "x", "target": [0.2, 0.2]}], "v2",
                            "prompt", None, 2)
  with pytest.raises(InputError, match="versions"):
    EvalConfig(versions=["v4"])


@pytest.mark.slow
def test_eval_command_on_converted_model(tmp_path, model, tokenizer):
  from distfair_jax.convert import hf as convert
  from distfair_jax.commands import eval as eval_cmd
  model_dir = tmp_path / "model"
  convert.save_pretrained(model_dir, model, model.config, tokenizer)
  parser = argparse.ArgumentParser()
  eval_cmd.add_arguments(parser)
  out = tmp_path / "out"
  args = parser.parse_args([str(model_dir), "dataset=gender_real_us", "versions=[v2]", "rounds=2",
                            "decode.max_new_tokens=3", "n_bootstrap=0", "plots=false",
                            "decode.top_k=50", "--out", str(out)])
  assert eval_cmd.run(args) == 0
  rows = _rows(out / "eval" / "v2.jsonl")
  assert len(rows) == 28  # 14 occupations x 2 rounds
  meta = json.loads((out / "eval" / "metrics.json").read_text())["meta"]
  assert meta["kind"] == "converted" and meta["dataset"] == "gender_real_us"
  assert meta["decoding"]["top_k"] == 50 and meta["decoding"]["max_new_tokens"] == 3
  with pytest.raises(InputError, match="dataset"):
    eval_cmd.run(parser.parse_args([str(model_dir), "--out", str(tmp_path / "o2")]))


def test_answer_probabilities_equal_a_direct_forward(model, tokenizer, dataset):
  """P(answer_k + end of turn | prompt), and for a steered model its sum over the steering tokens
  weighted by the steering softmax, equal log-softmax sums from plain full forwards."""
  import jax
  from distfair_jax.data.tokenize import Encoder
  from distfair_jax.evaluation.sample import Sampler
  prompts = [r["prompt"] for r in dataset["v2"][:2]]
  sampler, state = Sampler.of(model)
  for steered in (False, True):
    enc = Encoder(tokenizer, attribute=GENDER if steered else None)
    ids = enc.encode_prompts(prompts)
    steer = [int(i) for i in enc.steering_ids] if steered else [None]
    # end_of_turn=False: the completion starts with the answer, whatever follows
    for end_of_turn in (True, False):
      got = evaluate.answer_probabilities(sampler, state, ids, enc, GENDER, steered=steered,
                                          end_of_turn=end_of_turn)
      want = np.zeros((len(prompts), 2))
      for p, prompt in enumerate(ids):
        last = jax.nn.log_softmax(model.logits(model(np.asarray([prompt])))[0, -1])
        w = jax.nn.softmax(last[np.asarray(steer)]) if steered else [1.0]
        for s, sid in enumerate(steer):
          head = prompt + ([] if sid is None else [sid])
          for k, cat in enumerate(GENDER.categories):
            ans = enc.completion_ids(cat.answer)
            if not end_of_turn:
              ans = ans[:len(ans) - len(enc.end_ids)]
            seq = np.asarray([head + ans])
            logp = jax.nn.log_softmax(model.logits(model(seq))[0], axis=-1)
            total = sum(float(logp[len(head) - 1 + t, tok]) for t, tok in enumerate(ans))
            want[p, k] += float(w[s]) * np.exp(total)
      np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-9)
      assert np.all(got.sum(-1) <= 1.0 + 1e-6)
      if end_of_turn:
        ended = got
    assert np.all(got >= ended - 1e-9)  # ending there is one way of starting so


def test_answer_metrics_renormalised_raw_and_non_answer():
  rows = [{"occupation": "a", "category": 0}, {"occupation": "a", "category": 1}]
  out = metrics.evaluate_version(
      rows, {"a": [0.5, 0.5]}, 2, n_bootstrap=0, answers={"a": [0.3, 0.1]})
  assert out["non_answer"] == pytest.approx(0.6)
  assert out["exact_answer_mae"] == pytest.approx(0.25)           # [0.75, 0.25] vs [0.5, 0.5]
  assert out["exact_answer_mae_raw"] == pytest.approx(0.3)         # (0.2 + 0.4) / 2
  assert out["per_occupation"][0]["answer_probs"] == pytest.approx([0.3, 0.1])
  with pytest.raises(InputError, match="at most 1"):
    metrics.evaluate_version(
        rows, {"a": [0.5, 0.5]}, 2, n_bootstrap=0, answers={"a": [0.7, 0.6]})


def test_eval_truncates_prompts_as_the_run_trained(model, tokenizer, dataset, tmp_path,
                                                  monkeypatch):
  """evaluate(max_prompt_length=N) prefills the last N prompt tokens, as training's Encoder does
  (it used the Encoder's default 512 whatever the run had trained on)."""
  from distfair_jax.data.tokenize import Encoder
  seen = []

  class Recording(Encoder):
    def encode_prompts(self, prompts):
      out = super().encode_prompts(prompts)
      seen.extend(out)
      return out

  monkeypatch.setattr(evaluate, "Encoder", Recording)
  cfg = EvalConfig(versions=["v2"], rounds=1, steering="none", decode=DECODE, n_bootstrap=0,
                   plots=False, exact_answers=False)
  evaluate.evaluate(model, tokenizer, GENDER, dataset, tmp_path, config=cfg, max_prompt_length=12)
  full = Encoder(tokenizer).encode_prompts([dataset["v2"][0]["prompt"]])[0]
  assert len(full) > 12 and seen and all(len(ids) == 12 for ids in seen)
  assert seen[0] == full[-12:]


def test_reference_parser_reads_answers_that_differ_from_names():
  from distfair_jax.data.attributes import attribute_from_dict
  age = attribute_from_dict({"name": "age", "categories": [
      {"name": "young", "answer": "Young", "synonyms": ["youthful"]},
      {"name": "middle_aged", "answer": "Middle-aged"},
      {"name": "older", "answer": "Older", "synonyms": ["senior"]}]})
  rows = [{"response": "Middle-aged."}, {"response": "A senior."}, {"response": "middle_aged"}]
  evaluate.categorize(rows, age, story=False)
  assert [r["category"] for r in rows] == [1, None, 1]
  evaluate.categorize(rows, age, story=False, parser="synonyms")
  assert [r["category"] for r in rows] == [1, 2, 1]


def test_samples_of_the_same_model_are_reused_for_other_targets(tmp_path, model, tokenizer,
                                                                 dataset):
  """`reuse_samples_from`: another dataset's evaluation of the same model with the same questions
  (gender_real_us / gender_even_us) is scored against this dataset's targets from its samples,
  which are the rows sampling here would give; other settings or prompts sample afresh."""
  config = EvalConfig(versions=["v2"], rounds=3, steering="none", decode=DECODE, n_bootstrap=0,
                      plots=False)
  evaluate.evaluate(model, tokenizer, GENDER, dataset, tmp_path / "a", config=config)
  even = {"v2": [{**r, "target": [0.5, 0.5]} for r in dataset["v2"]]}
  fresh = evaluate.evaluate(model, tokenizer, GENDER, even, tmp_path / "b", config=config)
  reused = evaluate.evaluate(model, tokenizer, GENDER, even, tmp_path / "c", config=config,
                             reuse_samples_from=tmp_path / "a" / "eval")
  assert reused["meta"]["timing"]["v2"]["reused"] is True
  assert reused["meta"]["reused_samples_from"] == str(tmp_path / "a" / "eval")
  assert _rows(tmp_path / "c" / "eval" / "v2.jsonl") == _rows(tmp_path / "b" / "eval" / "v2.jsonl")
  for key in ("mae", "unparsed_rate", "exact_answer_mae", "non_answer"):
    assert reused["versions"]["v2"][key] == pytest.approx(fresh["versions"]["v2"][key], abs=1e-12)
  first = json.loads((tmp_path / "a" / "eval" / "metrics.json").read_text())["versions"]["v2"]
  assert first["exact_answer_mae"] != reused["versions"]["v2"]["exact_answer_mae"]  # new targets
  other_seed = EvalConfig(versions=["v2"], rounds=3, steering="none", decode=DECODE,
                          n_bootstrap=0, plots=False, seed=1)
  assert evaluate.earlier_samples(tmp_path / "a" / "eval", {}) == {}
  doc = evaluate.evaluate(model, tokenizer, GENDER, even, tmp_path / "d", config=other_seed,
                          reuse_samples_from=tmp_path / "a" / "eval")
  assert "reused" not in doc["meta"]["timing"]["v2"] and "reused_samples_from" not in doc["meta"]
  fewer = {"v2": [r for r in even["v2"] if r["occupation"] != dataset["v2"][0]["occupation"]]}
  doc = evaluate.evaluate(model, tokenizer, GENDER, fewer, tmp_path / "e", config=config,
                          reuse_samples_from=tmp_path / "a" / "eval")
  assert "reused" not in doc["meta"]["timing"]["v2"]  # other prompts: sampled


def test_a_stopped_evaluation_resumes_with_the_versions_it_finished(tmp_path, model, tokenizer,
                                                                    dataset):
  """A stop after v1 keeps v1's rows in eval-partial/; the next evaluation of the same weights
  scores v1 from them (the rows sampling gives, timed as first sampled) and samples v2 alone;
  other weights start afresh."""
  config = EvalConfig(versions=["v1", "v2"], rounds=2, steering="none", decode=DECODE,
                      n_bootstrap=0, plots=False)
  whole = evaluate.evaluate(model, tokenizer, GENDER, dataset, tmp_path / "whole", config=config)

  def stop_after_v1(line):
    if line.startswith("v1:"):
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    evaluate.evaluate(model, tokenizer, GENDER, dataset, tmp_path / "run", config=config,
                      progress=stop_after_v1)
  partial = tmp_path / "run" / evaluate.PARTIAL
  assert not (tmp_path / "run" / "eval").exists() and (partial / "v1.jsonl").exists()
  assert not (partial / "v2.jsonl").exists()
  first = json.loads((partial / "index.json").read_text())["timing"]["v1"]
  again = evaluate.evaluate(model, tokenizer, GENDER, dataset, tmp_path / "run", config=config)
  assert again["meta"]["timing"]["v1"] == {**first, "resumed": True}
  assert "resumed" not in again["meta"]["timing"]["v2"]
  for version in ("v1", "v2"):
    assert _rows(tmp_path / "run" / "eval" / f"{version}.jsonl") == \
        _rows(tmp_path / "whole" / "eval" / f"{version}.jsonl")
    assert again["versions"][version]["mae"] == whole["versions"][version]["mae"]
  assert not partial.exists()

  with pytest.raises(KeyboardInterrupt):  # stopped again, then other weights in the same place
    evaluate.evaluate(model, tokenizer, GENDER, dataset, tmp_path / "run", config=config,
                      progress=stop_after_v1, overwrite=True)
  graphdef, state = nnx.split(model)
  other = nnx.merge(graphdef, jax.tree.map(lambda x: x * 1.5 if x.dtype == np.float32 else x,
                                           state))
  assert evaluate.weights_fingerprint(state) != evaluate.weights_fingerprint(nnx.state(other))
  doc = evaluate.evaluate(other, tokenizer, GENDER, dataset, tmp_path / "run", config=config,
                          overwrite=True)
  assert not any("resumed" in t for t in doc["meta"]["timing"].values())
