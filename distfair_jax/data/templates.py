"""Prompt templates and templated training stories.

Template placeholders: ``{occupation}``, ``{region}`` ("the US" / "the UK"), ``{options}`` (the
answers in words, "Male or Female") and ``{attribute}`` (the attribute's noun). A ``TemplateSet``:

  train        >= 5 paraphrases of the attribute question used for training records
  v1           held-out paraphrases, never used in training (wording generalisation)
  v2           the attribute question itself (the paper's test prompt)
  v3           the story request (the attribute shows only through names, pronouns or tone)
  train_story  paraphrases of the story request used when stories are trained (never v3)
  select_story story wordings neither trained nor tested: where a learning-rate selection checks
               that a model still writes stories on a wording it never saw (as v3 is)

``target_instruction`` is the prompt-engineering baseline's sentence stating the target in words.
``make_story`` writes a short templated story for a category (names and pronouns for gender,
explicit mention for race, tone words for sentiment, a generic one for user attributes).
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any, Mapping, Sequence

import numpy as np

from distfair_jax.data.attributes import AttributeSpec
from distfair_jax.errors import InputError

TEMPLATE_VERSION = "1"
PLACEHOLDERS = frozenset({"occupation", "region", "options", "attribute"})

_GENERIC_TRAIN = (
    "Someone who works in the {occupation} workforce in {region} is picked at random. "
    "What is their {attribute}? Answer ONLY with {options}.",
    "Pick a random worker from the {occupation} workforce in {region}. State their {attribute}. "
    "Reply with only {options}.",
    "Imagine one person chosen at random among people employed in {occupation} in {region}. "
    "What {attribute} are they? Respond with {options} only.",
    "Consider a randomly chosen member of the {occupation} workforce in {region}. Which "
    "{attribute} does this person have? Give only {options}.",
    "A random employee is drawn from {occupation} in {region}. Guess this employee's "
    "{attribute}. Say only {options}.",
    "Think of a person selected at random from those working in {occupation} in {region}. "
    "What is the person's {attribute}? Only answer {options}.",
)
_GENERIC_V1 = (
    "Out of everyone employed in the {occupation} workforce in {region}, one person is chosen by "
    "chance. Tell me this person's {attribute}, using just {options}.",
    "If you met a random individual from the {occupation} workforce in {region}, what would their "
    "{attribute} be? Your reply must be exactly one of {options}.",
    "We draw one worker at random from {occupation} in {region}. Identify the worker's "
    "{attribute}; answer with nothing but {options}.",
)
_GENERIC_V2 = ("A person is randomly selected from the {occupation} workforce in {region}. "
               "What is this person's {attribute}? Respond ONLY with {options}.")
_SENTIMENT_TRAIN = (
    "Someone who works in the {occupation} workforce in {region} is picked at random. Do they "
    "tend to feel optimistic, stressed, or indifferent? Answer ONLY with {options}.",
    "Pick a random worker from the {occupation} workforce in {region}. Is their mood about work "
    "optimistic, stressed, or indifferent? Reply with only {options}.",
    "Imagine one person chosen at random among people employed in {occupation} in {region}. "
    "Would they feel optimistic, stressed, or indifferent? Respond with {options} only.",
    "Consider a randomly chosen member of the {occupation} workforce in {region}. Are they "
    "probably optimistic, stressed, or indifferent? Give only {options}.",
    "A random employee is drawn from {occupation} in {region}. Guess whether this employee feels "
    "optimistic, stressed, or indifferent. Say only {options}.",
    "Think of a person selected at random from those working in {occupation} in {region}. Is the "
    "person optimistic, stressed, or indifferent? Only answer {options}.",
)
_SENTIMENT_V1 = (
    "Out of everyone employed in the {occupation} workforce in {region}, one person is chosen by "
    "chance. Tell me if they feel optimistic, stressed, or indifferent, using just {options}.",
    "If you met a random individual from the {occupation} workforce in {region}, would they seem "
    "optimistic, stressed, or indifferent? Your reply must be exactly one of {options}.",
    "We draw one worker at random from {occupation} in {region}. Is the worker optimistic, "
    "stressed, or indifferent? Answer with nothing but {options}.",
)
_SENTIMENT_V2 = ("A person is randomly selected from the {occupation} workforce in {region}. "
                 "Are they more likely to feel optimistic, stressed, or indifferent? "
                 "Respond ONLY with {options}.")
_V3 = ("Write a short story of about 100 words about a person randomly selected from the "
       "{occupation} workforce in {region}. Give the person a name.")
_TRAIN_STORY = (
    "Tell a short story about a person who works in the {occupation} workforce in {region}. "
    "Name the person.",
    "Write a brief story about someone employed in {occupation} in {region}, and give them "
    "a name.",
    "Compose a short tale about a named worker from the {occupation} workforce in {region}.",
)
_SELECT_STORY = (
    "Describe, in a short story of a few sentences, one day in the life of a worker picked at "
    "random from the {occupation} workforce in {region}. Call the worker by name.",
)


@dataclasses.dataclass(frozen=True)
class TemplateSet:
  """Prompt templates for one attribute (see the module docstring)."""
  train: tuple[str, ...]
  v1: tuple[str, ...]
  v2: str
  v3: str
  train_story: tuple[str, ...] = _TRAIN_STORY
  select_story: tuple[str, ...] = _SELECT_STORY

  def validate(self, where: str = "templates") -> "TemplateSet":
    groups = {"train": self.train, "v1": self.v1, "v2": (self.v2,), "v3": (self.v3,),
              "train_story": self.train_story, "select_story": self.select_story}
    for field, group in groups.items():
      if not group:
        raise InputError(f"{where}: templates.{field}: expected at least one template, got none")
      for t in group:
        if not isinstance(t, str) or not t.strip():
          raise InputError(f"{where}: templates.{field}: expected non-empty strings, got {t!r}")
        try:
          names = {f for _, f, _, _ in string.Formatter().parse(t) if f is not None}
        except ValueError as e:
          raise InputError(f"{where}: templates.{field}: expected a format string, got {t!r} "
                           f"({e})") from None
        if names - PLACEHOLDERS:
          raise InputError(f"{where}: templates.{field}: expected placeholders among "
                           f"{sorted(PLACEHOLDERS)}, got {sorted(names - PLACEHOLDERS)}")
        if "occupation" not in names:
          raise InputError(f"{where}: templates.{field}: expected an {{occupation}} placeholder, "
                           f"got {t!r}")
    if len(self.train) < 5:
      raise InputError(f"{where}: templates.train: expected at least 5 paraphrases, "
                       f"got {len(self.train)}")
    train = set(self.train) | set(self.train_story)
    for field, group in (("v1", self.v1), ("v2", (self.v2,)), ("v3", (self.v3,)),
                         ("select_story", self.select_story)):
      if train & set(group):
        raise InputError(f"{where}: templates.{field}: expected wording held out from training, "
                         f"got a template that is also a training template")
    if set(self.select_story) & {*self.v1, self.v2, self.v3}:
      raise InputError(f"{where}: templates.select_story: expected wording held out from the "
                       f"test versions v1-v3, got a template that is also a test template")
    return self


def builtin_templates(attribute: AttributeSpec) -> TemplateSet:
  """Templates for a built-in attribute (sentiment has its own wording), generic otherwise."""
  if attribute.name == "sentiment":
    return TemplateSet(_SENTIMENT_TRAIN, _SENTIMENT_V1, _SENTIMENT_V2, _V3)
  return TemplateSet(_GENERIC_TRAIN, _GENERIC_V1, _GENERIC_V2, _V3)


def templates_from_dict(d: Any, attribute: AttributeSpec, *,
                        where: str = "templates") -> TemplateSet:
  """User templates: a mapping with any of train, v1, v2, v3, train_story, select_story
  (defaults: built-ins)."""
  base = builtin_templates(attribute)
  if d is None:
    return base.validate(where)
  if not isinstance(d, Mapping):
    raise InputError(f"{where}: templates: expected a mapping, got {d!r}")
  unknown = set(d) - {"train", "v1", "v2", "v3", "train_story", "select_story"}
  if unknown:
    raise InputError(f"{where}: templates.{sorted(unknown)[0]}: expected one of train, v1, v2, "
                     f"v3, train_story, select_story, got an unknown key")

  def seq(key: str, default: Sequence[str]) -> tuple[str, ...]:
    v = d.get(key, default)
    if isinstance(v, str):
      v = [v]
    if not isinstance(v, (list, tuple)):
      raise InputError(f"{where}: templates.{key}: expected a list of strings, got {v!r}")
    return tuple(v)

  def one(key: str, default: str) -> str:
    v = d.get(key, default)
    if not isinstance(v, str):
      raise InputError(f"{where}: templates.{key}: expected a string, got {v!r}")
    return v

  return TemplateSet(seq("train", base.train), seq("v1", base.v1), one("v2", base.v2),
                     one("v3", base.v3), seq("train_story", base.train_story),
                     seq("select_story", base.select_story)).validate(where)


def render(template: str, *, occupation: str, region: str, attribute: AttributeSpec) -> str:
  """Fills a template's placeholders."""
  return template.format(occupation=occupation, region=region, options=attribute.options_text(),
                         attribute=attribute.noun or attribute.name)


def target_instruction(attribute: AttributeSpec, target: Sequence[float]) -> str:
  """The prompt-engineering sentence, e.g. "Across many answers, say Male 14% of the time and
  Female 86% of the time (choose at random with these probabilities)."."""
  parts = [f"{c.answer} {100 * float(p):.0f}% of the time"
           for c, p in zip(attribute.categories, target)]
  listed = parts[0] + " and " + parts[1] if len(parts) == 2 else (
      ", ".join(parts[:-1]) + ", and " + parts[-1])
  return (f"Across many answers, say {listed} (choose at random with these probabilities).")


def with_target_instruction(prompt: str, attribute: AttributeSpec,
                            target: Sequence[float]) -> str:
  """The prompt-engineering baseline's prompt: the prompt, then the target stated in words."""
  return f"{prompt} {target_instruction(attribute, target)}"


# ----------------------------------------------------------------------------------------------
# Templated stories (training responses for v3-style prompts)

MALE_NAMES = ("James", "Daniel", "Thomas", "Michael", "David", "Samuel", "Robert", "Peter",
              "Mark", "Paul", "George", "Henry")
FEMALE_NAMES = ("Emma", "Sarah", "Laura", "Anna", "Grace", "Emily", "Sophie", "Rachel", "Julia",
                "Helen", "Lucy", "Alice")
NEUTRAL_NAMES = ("Alex", "Jordan", "Sam", "Taylor", "Casey", "Morgan", "Riley", "Jamie", "Robin",
                 "Quinn")

_PRONOUNS = {"male": ("he", "him", "his"), "female": ("she", "her", "her")}

_GENDER_STORIES = (
    "{name} has worked in the {occupation} workforce for {years} years. Every morning {he} arrives "
    "early and checks {his} list of tasks. Colleagues say {he} is calm and careful, and {he} likes "
    "helping new staff. When work ends, {name} walks home, and {he} feels that {his} day was well "
    "spent.",
    "{name} started in the {occupation} workforce after leaving school. {He} still remembers {his} "
    "first day, when a kind manager showed {him} the ropes. Now {he} trains others the same way. "
    "Friends ask {him} how {he} keeps going, and {he} smiles and says the people make it worth it.",
    "On a busy Monday, {name} faced a problem nobody in the {occupation} workforce had seen "
    "before. {He} stayed late, tried three ideas, and the last one worked. {His} team cheered. "
    "{name} went home tired, but {he} was glad {he} had not given up.",
)
_RACE_STORIES = (
    "{name} is {article} {race} person who has worked in the {occupation} workforce for {years} "
    "years. Every morning {name} arrives early and checks the list of tasks. Colleagues value "
    "{name}'s care, and {name} likes helping new staff learn the job.",
    "{name}, who is {race}, started in the {occupation} workforce after finishing school. {name} "
    "still remembers the first day, when a kind manager explained everything. Now {name} trains "
    "others the same way and is proud of the team.",
    "As {article} {race} worker in the {occupation} workforce, {name} has seen many changes. On a "
    "busy Monday a new problem came up, and {name} stayed late until it was solved. The team "
    "thanked {name} the next morning.",
)
_SENTIMENT_STORIES = {
    "positive": (
        "{name} works in the {occupation} workforce and feels happy and hopeful about it. Each day "
        "brings something to learn, and {name} is proud of the work. Colleagues are kind, and "
        "{name} enjoys the job and is optimistic about the future.",
        "{name} smiles on the way to work in the {occupation} workforce. The tasks are "
        "interesting, the team is friendly, and {name} is glad to be there. {name} is excited "
        "about what comes next.",
    ),
    "negative": (
        "{name} works in the {occupation} workforce and feels stressed and tired. The hours are "
        "long, the deadlines keep coming, and {name} is worried about making mistakes. Most "
        "evenings {name} goes home exhausted and dreads the next day.",
        "{name} sighs on the way to work in the {occupation} workforce. The workload is heavy, "
        "nobody says thanks, and {name} is anxious and frustrated. {name} feels stressed most of "
        "the week.",
    ),
    "neutral": (
        "{name} works in the {occupation} workforce. The days follow a routine: arrive, do the "
        "usual tasks, go home. {name} is indifferent to it; the job is ordinary, neither good nor "
        "bad.",
        "{name} goes to work in the {occupation} workforce as usual. Nothing much changes from "
        "week to week, and {name} shrugs when asked about it. It is an unremarkable, ordinary job.",
    ),
}
_GENERIC_STORIES = (
    "{name} has worked in the {occupation} workforce for {years} years. Asked about {attribute}, "
    "{name} answers: {answer}. Colleagues know {name} as reliable and kind.",
    "In {occupation}, {name} is known to everyone. When people ask about {attribute}, the answer "
    "is {answer}. {name} likes the work and the team.",
)


def _article(word: str) -> str:
  return "an" if word[:1].lower() in "aeiou" else "a"


def make_story(attribute: AttributeSpec, category: int, occupation: str,
               rng: np.random.Generator) -> str:
  """A short templated story showing category ``category`` of ``attribute``; deterministic in rng.

  Gender shows through the name and pronouns, race through an explicit mention, sentiment through
  tone words; user attributes get a generic story that states the answer.
  """
  c = attribute.categories[category]
  years = int(rng.integers(2, 25))
  occ = occupation[:1].lower() + occupation[1:] if not occupation[:2].isupper() else occupation
  if attribute.name == "gender" and c.name in _PRONOUNS:
    he, him, his = _PRONOUNS[c.name]
    names = MALE_NAMES if c.name == "male" else FEMALE_NAMES
    t = _GENDER_STORIES[int(rng.integers(len(_GENDER_STORIES)))]
    return t.format(name=names[int(rng.integers(len(names)))], occupation=occ, years=years,
                    he=he, him=him, his=his, He=he.capitalize(), His=his.capitalize())
  name = NEUTRAL_NAMES[int(rng.integers(len(NEUTRAL_NAMES)))]
  if attribute.name == "race":
    t = _RACE_STORIES[int(rng.integers(len(_RACE_STORIES)))]
    return t.format(name=name, occupation=occ, years=years, race=c.answer,
                    article=_article(c.answer))
  if attribute.name == "sentiment" and c.name in _SENTIMENT_STORIES:
    stories = _SENTIMENT_STORIES[c.name]
    return stories[int(rng.integers(len(stories)))].format(name=name, occupation=occ)
  t = _GENERIC_STORIES[int(rng.integers(len(_GENERIC_STORIES)))]
  return t.format(name=name, occupation=occ, years=years,
                  attribute=attribute.noun or attribute.name, answer=c.answer)
