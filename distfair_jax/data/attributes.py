"""Attribute specs: the categories of an attribute, their answers, parser words and steering tokens.

Built-in attributes (categories in steering order; category k's steering token is the digit ``k``):

  gender:    male, female
  race:      White, Black or African American, American Indian or Alaska Native, Asian,
             Native Hawaiian or Other Pacific Islander
  sentiment: positive, negative, neutral

User-defined attributes come from a mapping (read from YAML by ``data.build``)::

  name: age
  noun: age                      # optional, used by the generic question templates
  categories:
    - {name: young, answer: Young, synonyms: [young, youthful], steering_token: "0"}
    - {name: old, answer: Old, synonyms: [old, elderly]}

``synonyms`` are the words the evaluation parser accepts (the answer is always one of them);
``story_words`` the cues a rule-based story judge may count (pronouns for gender, tone words for
sentiment). ``steering_token`` defaults to the digit of the category index.

``steering_token_ids(attribute, tokenizer)`` lives in ``data.tokenize`` (it needs the chat
template).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

from distfair_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class Category:
  """One category: ``answer`` is what the model should say, ``synonyms`` what the parser accepts."""
  name: str
  answer: str
  synonyms: tuple[str, ...]
  steering_token: str
  story_words: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class AttributeSpec:
  """An attribute with K categories in steering order."""
  name: str
  categories: tuple[Category, ...]
  noun: str = ""

  @property
  def num_categories(self) -> int:
    return len(self.categories)

  @property
  def names(self) -> list[str]:
    return [c.name for c in self.categories]

  @property
  def answers(self) -> list[str]:
    return [c.answer for c in self.categories]

  @property
  def steering_tokens(self) -> list[str]:
    return [c.steering_token for c in self.categories]

  def index(self, name: str, *, where: str = "attribute") -> int:
    """Category index of ``name`` (case-insensitive)."""
    for k, c in enumerate(self.categories):
      if c.name.lower() == name.lower():
        return k
    raise InputError(f"{where}: category: expected one of {self.names}, got {name!r}")

  def options_text(self) -> str:
    """The answers as a list in words: ``"Male or Female"``, ``"A, B, or C"``."""
    a = self.answers
    if len(a) == 2:
      return f"{a[0]} or {a[1]}"
    return ", ".join(a[:-1]) + f", or {a[-1]}"

  def parse_answer(self, text: str) -> int | None:
    """Category whose word (answer or synonym) occurs last in ``text``; None when none occurs.

    Matching is case-insensitive on word boundaries; at one position the longest phrase wins
    (so "Black or African American" is one match, not "American").
    """
    words = sorted({(w.lower(), k) for k, c in enumerate(self.categories)
                    for w in (c.answer, *c.synonyms)}, key=lambda x: -len(x[0]))
    owner = {}
    for w, k in words:
      owner.setdefault(w, k)
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w, _ in words) + r")\b", re.IGNORECASE)
    last = None
    for m in pattern.finditer(text):
      last = owner[m.group(1).lower()]
    return last


def _category(name, answer, synonyms, index, story_words=()):
  return Category(name, answer, tuple(synonyms), str(index), tuple(story_words))


GENDER = AttributeSpec("gender", (
    _category("male", "Male", ["male", "man", "men"], 0,
              ["he", "him", "his", "himself", "mr"]),
    _category("female", "Female", ["female", "woman", "women"], 1,
              ["she", "her", "hers", "herself", "ms", "mrs"]),
), noun="gender")

RACE = AttributeSpec("race", (
    _category("White", "White", ["white", "caucasian"], 0, ["white"]),
    _category("Black or African American", "Black or African American",
              ["black", "african american"], 1, ["black", "african american"]),
    _category("American Indian or Alaska Native", "American Indian or Alaska Native",
              ["american indian", "alaska native", "native american"], 2,
              ["american indian", "alaska native", "native american"]),
    _category("Asian", "Asian", ["asian"], 3, ["asian"]),
    _category("Native Hawaiian or Other Pacific Islander",
              "Native Hawaiian or Other Pacific Islander",
              ["native hawaiian", "pacific islander"], 4, ["native hawaiian", "pacific islander"]),
), noun="race")

SENTIMENT = AttributeSpec("sentiment", (
    _category("positive", "Positive", ["positive", "optimistic"], 0,
              ["happy", "hopeful", "optimistic", "glad", "enjoys", "proud", "excited"]),
    _category("negative", "Negative", ["negative", "stressed"], 1,
              ["stressed", "worried", "tired", "anxious", "dreads", "frustrated", "exhausted"]),
    _category("neutral", "Neutral", ["neutral", "indifferent"], 2,
              ["indifferent", "routine", "ordinary", "unremarkable", "shrugs", "usual"]),
), noun="sentiment")

BUILTIN_ATTRIBUTES: dict[str, AttributeSpec] = {a.name: a for a in (GENDER, RACE, SENTIMENT)}


def get_attribute(name: str, *, where: str = "attribute") -> AttributeSpec:
  """A built-in attribute by name (gender, race, sentiment)."""
  if not isinstance(name, str) or name not in BUILTIN_ATTRIBUTES:
    raise InputError(f"{where}: attribute: expected one of {sorted(BUILTIN_ATTRIBUTES)}, "
                     f"got {name!r}")
  return BUILTIN_ATTRIBUTES[name]


def _str_list(value: Any, where: str, field: str) -> tuple[str, ...]:
  if isinstance(value, str):
    value = [value]
  if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip()
                                                     for v in value):
    raise InputError(f"{where}: {field}: expected a list of non-empty strings, got {value!r}")
  return tuple(v.strip() for v in value)


def attribute_from_dict(d: Any, *, where: str = "attribute") -> AttributeSpec:
  """Builds and validates a user-defined attribute (see the module docstring); a string names a
  built-in one."""
  if isinstance(d, str):
    return get_attribute(d, where=where)
  if not isinstance(d, Mapping):
    raise InputError(f"{where}: attribute: expected a built-in name or a mapping, got {d!r}")
  unknown = set(d) - {"name", "noun", "categories"}
  if unknown:
    raise InputError(f"{where}: attribute.{sorted(unknown)[0]}: expected one of name, noun, "
                     f"categories, got an unknown key")
  name = d.get("name")
  if not isinstance(name, str) or not name.strip():
    raise InputError(f"{where}: attribute.name: expected a non-empty string, got {name!r}")
  cats = d.get("categories")
  if not isinstance(cats, Sequence) or isinstance(cats, str) or len(cats) < 2:
    raise InputError(f"{where}: attribute.categories: expected a list of at least 2 categories, "
                     f"got {cats!r}")
  categories: list[Category] = []
  for k, c in enumerate(cats):
    field = f"attribute.categories[{k}]"
    if isinstance(c, str):
      c = {"name": c}
    if not isinstance(c, Mapping):
      raise InputError(f"{where}: {field}: expected a mapping with name and answer, got {c!r}")
    unknown = set(c) - {"name", "answer", "synonyms", "steering_token", "story_words"}
    if unknown:
      raise InputError(f"{where}: {field}.{sorted(unknown)[0]}: expected one of name, answer, "
                       f"synonyms, steering_token, story_words, got an unknown key")
    cname = c.get("name")
    if not isinstance(cname, str) or not cname.strip():
      raise InputError(f"{where}: {field}.name: expected a non-empty string, got {cname!r}")
    answer = c.get("answer", cname)
    if not isinstance(answer, str) or not answer.strip():
      raise InputError(f"{where}: {field}.answer: expected a non-empty string, got {answer!r}")
    synonyms = _str_list(c.get("synonyms", []), where, f"{field}.synonyms")
    story_words = _str_list(c.get("story_words", []), where, f"{field}.story_words")
    token = c.get("steering_token")
    if token is None:
      if len(cats) > 10:
        raise InputError(f"{where}: {field}.steering_token: expected an explicit token when "
                         f"there are more than 10 categories, got none")
      token = str(k)
    if not isinstance(token, str) or not token:
      raise InputError(f"{where}: {field}.steering_token: expected a non-empty string, "
                       f"got {token!r}")
    syn = tuple(dict.fromkeys([answer.strip().lower(), *(s.lower() for s in synonyms)]))
    categories.append(Category(cname.strip(), answer.strip(), syn, token, story_words))
  seen: dict[str, int] = {}
  for k, c in enumerate(categories):
    for key, field in ((c.name.lower(), "name"), (c.answer.lower(), "answer")):
      if (key, field) in seen:
        raise InputError(f"{where}: attribute.categories[{k}].{field}: expected unique "
                         f"categories, got duplicate {key!r}")
      seen[(key, field)] = k
  tokens = [c.steering_token for c in categories]
  if len(set(tokens)) != len(tokens):
    raise InputError(f"{where}: attribute.categories.steering_token: expected distinct tokens, "
                     f"got {tokens}")
  owners: dict[str, int] = {}
  for k, c in enumerate(categories):
    for w in c.synonyms:
      if owners.setdefault(w, k) != k:
        raise InputError(f"{where}: attribute.categories[{k}].synonyms: expected words unique to "
                         f"one category, got {w!r} in categories {owners[w]} and {k}")
  noun = d.get("noun", name)
  if not isinstance(noun, str) or not noun.strip():
    raise InputError(f"{where}: attribute.noun: expected a non-empty string, got {noun!r}")
  return AttributeSpec(name.strip(), tuple(categories), noun=noun.strip())
