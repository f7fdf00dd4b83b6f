"""Selecting a learning rate: the one rule every trained stage's grid goes through (``select``),
and the held-out scores it reads (``heldout_mae``: on the held-out split of the training prompts,
never test prompts)."""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from distfair_jax import config as C
from distfair_jax.data import templates as templates_lib
from distfair_jax.data.tokenize import Encoder
from distfair_jax.errors import InputError
from distfair_jax import fileio
from distfair_jax.evaluation import evaluate as eval_lib
from distfair_jax.train.heldout import split_heldout
from distfair_jax.train.rundir import RunDir

# A run's held-out scores, kept beside its stages (``cached_heldout_mae``), and the stories its
# story check sampled, judged (``heldout_mae``).
HELDOUT = "heldout.json"
HELDOUT_STORIES = "heldout_stories.jsonl"


MAX_NON_ANSWER = 0.2
# A model that still writes stories opens a story with a bare category word almost never (0-3% of
# the exact mass on held-out story prompts over the grids of three seeds); the rates that broke v3
# had 16-100% (one at 16% answered 93% of v3 with "FemaleMale" and the like). The mass counts every
# completion that starts with the category word, ended there or not: a bare answer followed by
# end of turn measured 0.3% for a model that answered 99% of v3 with "FemaleMale0Male1Female...".
MAX_STORY_BARE = 0.05
# With ``story_check_rounds``: the share of sampled held-out stories that fail (what v3 scores,
# bare answers counted as failures) a selected rate may have, on the held-out prompts of the
# trained story wordings and on a wording never trained (``templates.select_story``): junk prose
# ("oinferment", digit strings) passes the bare-answer check but not this one, and a model that
# answers an unseen wording with a bare "Female" (SmolLM2's ours at 5e-4: 10.8% of the exact mass
# on v3, 0.2% on the trained wordings) shows it only there.
MAX_STORY_FAILED = 0.2


def _story_loss(lr: float, story_bare: dict[float, float],
                story_failed: dict[float, float]) -> float:
  """How far a rate's stories are from passing the story check (0 when they pass): the larger
  excess of the bare-answer mass and of the sampled stories' failure rate over their bounds."""
  return max(story_bare.get(lr, 0.0) - MAX_STORY_BARE,
             story_failed.get(lr, 0.0) - MAX_STORY_FAILED, 0.0)


def passes(lr: float, non_answer: dict[float, float], story_bare: dict[float, float] | None = None,
           story_failed: dict[float, float] | None = None) -> bool:
  """Whether ``lr``'s held-out scores pass every bound ``select`` checks: non-answer mass at most
  ``MAX_NON_ANSWER`` and stories kept (``MAX_STORY_BARE``, ``MAX_STORY_FAILED``)."""
  return (non_answer[lr] <= MAX_NON_ANSWER and
          _story_loss(lr, story_bare or {}, story_failed or {}) == 0.0)


def select(scores: dict[float, float], non_answer: dict[float, float],
           story_bare: dict[float, float] | None = None,
           story_failed: dict[float, float] | None = None) -> float:
  """The demo's one selection rule, for every trained method: the learning rate with the lowest
  held-out exact answer MAE (non-answer mass counted as error), among the rates whose non-answer
  mass is at most 20% and that keep their stories: with ``story_bare``, a bare-answer mass on
  held-out story prompts (the probability of opening a story with a bare category word) of at
  most 5%, and with ``story_failed``, at most 20% of sampled held-out stories failed (unparsed by
  the v3 judge, or a bare category word; ``heldout_mae``) (ties: the smaller rate). Where no
  rate passes both: among the rates within the non-answer bound, the one that loses its stories
  least; where none is within it, the lowest MAE."""
  story_bare, story_failed = story_bare or {}, story_failed or {}
  answers = [lr for lr in scores if non_answer[lr] <= MAX_NON_ANSWER]
  loss = lambda lr: _story_loss(lr, story_bare, story_failed)
  ok = [lr for lr in scores if passes(lr, non_answer, story_bare, story_failed)]
  if ok:
    return min(ok, key=lambda lr: (scores[lr], lr))
  if answers:
    return min(answers, key=lambda lr: (loss(lr), scores[lr], lr))
  return min(scores, key=lambda lr: (scores[lr], lr))


def cached_heldout_mae(demo, run: str, *, steered: bool
                       ) -> tuple[float, float, float | None, float | None]:
  """``heldout_mae``, kept in ``run/heldout.json`` and reused while what it measured is unchanged:
  the final stage's summary (a retrained stage writes another) and every setting the scores
  depend on. A resumed demo re-scores no finished run (sampling the story check took ~1 min a run
  for SmolLM2 on the 2-core CPU)."""
  rundir = RunDir(run)
  s = demo.s
  key = {"final": rundir.summary(rundir.read_config().stages[-1]), "steered": steered,
         "seed": demo.seed, "heldout_fraction": s.heldout_fraction,
         "story_check_rounds": s.story_check_rounds, "max_length": s.max_length,
         "story_max_new_tokens": s.story_max_new_tokens,
         "steering_placement": s.steering_placement,
         "select_story": list(demo.spec.templates.select_story), "story_failure": "unparsed|bare",
         "unseen_story_prompts": "every occupation"}
  key = json.loads(json.dumps(key))  # as read back
  path = rundir.path / HELDOUT
  if path.exists():
    doc = fileio.read_json(path, "held-out scores")
    if doc.get("key") == key:
      return tuple(doc["scores"])
  scores = heldout_mae(demo, run, steered=steered, stories_out=rundir.path / HELDOUT_STORIES)
  fileio.write_json(path, {"key": key, "scores": list(scores)}, indent=1)
  return scores


def heldout_mae(demo, run: str, *, steered: bool, stories_out=None
                ) -> tuple[float, float, float | None, float | None]:
  """(exact answer MAE, non-answer mass, bare-answer mass on stories, failure rate of sampled
  stories) over the held-out *training* prompts. The first two on the attribute questions: the mean over prompts of
  mean_k |q_k - p_k|, p the prompt's target and q the model's exact probabilities of the K
  canonical answers (``evaluate.answer_probabilities``: summed over the steering tokens for a
  steered model), not renormalised, so mass on non-answers counts as error; and 1 - sum_k q_k.
  The third on the held-out story prompts (None without story rows): sum_k of the probability
  that the completion starts with answer k (``end_of_turn=False``), the mass on opening a story
  with a bare category word. The fourth (None without story rows or ``story_check_rounds``):
  ``story_check_rounds`` stories sampled per held-out story prompt, and per occupation in the
  never-trained ``select_story`` wording (every occupation: with only the held-out prompts'
  occupations, 20 stories on gender_real_us, the rate moved in steps of 5%), with the
  evaluation's decoding (a steered model draws its own steering token first), judged as v3 is:
  the share that fail (no category found, or a bare category word), the larger of the two
  wordings'. ``stories_out``: where to write those stories, judged (JSON lines: ``wording``
  trained / unseen, ``failed``), to read what the check saw."""
  _, held = split_heldout(demo.data.records["sft"], demo.s.heldout_fraction, seed=demo.seed)
  answers = set(demo.attribute.answers)
  prompts, stories, occupation = {}, {}, {}
  for r in held:  # the attribute questions (a story row's response is no canonical answer)
    (prompts if r["response"] in answers else stories).setdefault(
        r["prompt"], np.asarray(r["target"], np.float64))
    occupation.setdefault(r["prompt"], r["occupation"])
  if not prompts:
    raise InputError(f"{demo.dataset}: heldout_fraction: expected held-out prompts, got none")
  enc = Encoder(demo.tokenizer, attribute=demo.attribute if steered else None,
                max_length=demo.s.max_length, max_prompt_length=demo.s.max_length - 16,
                steering_placement=demo.s.steering_placement)
  model = demo.model(run)
  seqs = enc.encode_prompts(list(prompts))
  p = np.stack(list(prompts.values()))
  sampler, state = demo.sampler(model)
  q = eval_lib.answer_probabilities(sampler, state, seqs, enc, demo.attribute, steered=steered)
  bare = failed = None
  if stories:
    qs = eval_lib.answer_probabilities(sampler, state, enc.encode_prompts(list(stories)),
                                       enc, demo.attribute, steered=steered, end_of_turn=False)
    bare = float(np.mean(qs.sum(-1)))
    if demo.s.story_check_rounds > 0:
      unseen = unseen_story_prompts(demo.spec, list(demo.spec.occupations))
      rows = {wording: story_check(demo, sampler, state, enc, list(prompts_of), of, steered)
              for wording, prompts_of, of in (("trained", stories, occupation),
                                              ("unseen", unseen, unseen))}
      failed = max(float(np.mean([r["failed"] for r in rs])) for rs in rows.values())
      if stories_out is not None:
        fileio.write_jsonl(stories_out, [{"wording": w, **r} for w, rs in rows.items()
                                         for r in rs])
  return float(np.mean(np.abs(q - p))), float(np.mean(1.0 - q.sum(-1))), bare, failed


def unseen_story_prompts(spec, occupations: Sequence[str]) -> dict[str, str]:
  """prompt -> occupation: one story prompt per entry of ``occupations`` in the wordings no
  stage trains or tests on (``templates.select_story``, taken in turn)."""
  wordings = spec.templates.select_story
  return {templates_lib.render(wordings[i % len(wordings)], occupation=o, region=spec.region,
                               attribute=spec.attribute): o for i, o in enumerate(occupations)}


def story_check(demo, sampler, state, enc, stories: Sequence[str], occupation: dict,
                steered: bool) -> list[dict]:
  """``story_check_rounds`` sampled stories per story prompt, judged as v3 is (the evaluation's
  decoding and judge; seed: the demo's), each with ``failed``: the judge finds no category, or
  the answer is a bare category word, no story."""
  s = demo.s
  slots = [{"prompt": prompt, "occupation": occupation[prompt]}
           for prompt in stories for _ in range(s.story_check_rounds)]
  cfg = C.EvalConfig(versions=["v3"], rounds=s.story_check_rounds,
                     steering="model" if steered else "none",
                     decode=C.DecodeConfig(temperature=1.0, top_p=1.0, top_k=0,
                                           max_new_tokens=s.answer_max_new_tokens,
                                           story_max_new_tokens=s.story_max_new_tokens),
                     seed=demo.seed)
  rows = eval_lib.sample_version(sampler, state, enc, demo.attribute, slots, version="v3",
                                 config=cfg, targets={})
  eval_lib.categorize(rows, demo.attribute, story=True)
  for r, bare in zip(rows, eval_lib.bare_answers(rows, demo.attribute)):
    r["failed"] = r["category"] is None or bare
  return rows
