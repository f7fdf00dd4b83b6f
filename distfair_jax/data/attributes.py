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

``synonyms`` are extra words the evaluation parser accepts with ``eval.parser: synonyms`` (the
default, ``reference``, counts the category names only, as the paper does).
``steering_token`` defaults to the digit of the category index. (The story judges keep their own
cues: ``distfair_jax.evaluation.judges``.)

``steering_token_ids(attribute, tokenizer)`` lives in ``data.tokenize`` (it needs the chat
template).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from distfair_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class Category:
  """One category: ``answer`` is what the model should say, ``synonyms`` what the parser accepts."""
  name: str
  answer: str
  synonyms: tuple[str, ...]
  steering_token: str


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


def _category(name, answer, synonyms, index):
  return Category(name, answer, tuple(synonyms), str(index))


GENDER = AttributeSpec("gender", (
    _category("male", "Male", ["male", "man", "men"], 0),
    _category("female", "Female", ["female", "woman", "women"], 1),
), noun="gender")

RACE = AttributeSpec("race", (
    _category("White", "White", ["white", "caucasian"], 0),
    _category("Black or African American", "Black or African American",
              ["black", "african american"], 1),
    _category("American Indian or Alaska Native", "American Indian or Alaska Native",
              ["american indian", "alaska native", "native american"], 2),
    _category("Asian", "Asian", ["asian"], 3),
    _category("Native Hawaiian or Other Pacific Islander",
              "Native Hawaiian or Other Pacific Islander",
              ["native hawaiian", "pacific islander"], 4),
), noun="race")

SENTIMENT = AttributeSpec("sentiment", (
    _category("positive", "Positive", ["positive", "optimistic"], 0),
    _category("negative", "Negative", ["negative", "stressed"], 1),
    _category("neutral", "Neutral", ["neutral", "indifferent"], 2),
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


def _known_keys(d: Mapping, allowed: Sequence[str], where: str, field: str) -> None:
  unknown = set(d) - set(allowed)
  if unknown:
    raise InputError(f"{where}: {field}.{sorted(unknown)[0]}: expected one of "
                     f"{', '.join(allowed)}, got an unknown key")


def _text(value: Any, where: str, field: str) -> str:
  if not isinstance(value, str) or not value.strip():
    raise InputError(f"{where}: {field}: expected a non-empty string, got {value!r}")
  return value.strip()


def _category_from_dict(c: Any, k: int, num: int, where: str) -> Category:
  field = f"attribute.categories[{k}]"
  if isinstance(c, str):
    c = {"name": c}
  if not isinstance(c, Mapping):
    raise InputError(f"{where}: {field}: expected a mapping with name and answer, got {c!r}")
  _known_keys(c, ("name", "answer", "synonyms", "steering_token"), where, field)
  cname = _text(c.get("name"), where, f"{field}.name")
  answer = _text(c.get("answer", cname), where, f"{field}.answer")
  synonyms = _str_list(c.get("synonyms", []), where, f"{field}.synonyms")
  token = c.get("steering_token")
  if token is None:
    if num > 10:
      raise InputError(f"{where}: {field}.steering_token: expected an explicit token when "
                       f"there are more than 10 categories, got none")
    token = str(k)
  if not isinstance(token, str) or not token:
    raise InputError(f"{where}: {field}.steering_token: expected a non-empty string, "
                     f"got {token!r}")
  syn = tuple(dict.fromkeys([answer.lower(), *(s.lower() for s in synonyms)]))
  return Category(cname, answer, syn, token)


def _check_distinct(categories: Sequence[Category], where: str) -> None:
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


def attribute_from_dict(d: Any, *, where: str = "attribute") -> AttributeSpec:
  """Builds and validates a user-defined attribute (see the module docstring); a string names a
  built-in one."""
  if isinstance(d, str):
    return get_attribute(d, where=where)
  if not isinstance(d, Mapping):
    raise InputError(f"{where}: attribute: expected a built-in name or a mapping, got {d!r}")
  _known_keys(d, ("name", "noun", "categories"), where, "attribute")
  name = _text(d.get("name"), where, "attribute.name")
  cats = d.get("categories")
  if not isinstance(cats, Sequence) or isinstance(cats, str) or len(cats) < 2:
    raise InputError(f"{where}: attribute.categories: expected a list of at least 2 categories, "
                     f"got {cats!r}")
  categories = [_category_from_dict(c, k, len(cats), where) for k, c in enumerate(cats)]
  _check_distinct(categories, where)
  noun = _text(d.get("noun", name), where, "attribute.noun")
  return AttributeSpec(name, tuple(categories), noun=noun)
