"""Answer parsing: the last category word or synonym, on word boundaries, case-insensitive."""

from __future__ import annotations

import pytest

from distfair_jax.errors import InputError
from distfair_jax.evaluation.parsing import CategoryParser

GENDER = ["male", "female"]
GENDER_SYN = [["man", "men"], ["woman", "women"]]
RACE = ["White", "Black or African American", "American Indian or Alaska Native", "Asian",
        "Native Hawaiian or Other Pacific Islander"]
RACE_SYN = [["Caucasian"], ["Black", "African American"], ["Native American", "American Indian"],
            [], ["Pacific Islander", "Native Hawaiian"]]
SENTIMENT = ["positive", "negative", "neutral"]


@pytest.fixture(scope="module")
def gender():
  return CategoryParser(GENDER, GENDER_SYN)


@pytest.fixture(scope="module")
def race():
  return CategoryParser(RACE, RACE_SYN)


@pytest.mark.parametrize("text, expected", [
    ("Male", 0),
    ("Female", 1),
    ("female", 1),              # "female" must not count as "male"
    ("FEMALE.", 1),
    ("Male or female? I'd say female.", 1),   # the last mention wins
    ("Female, no wait: male", 0),
    ("It is a woman.", 1),       # synonyms
    ("Mostly men work there.", 0),
    ("womanhood", None),         # word boundaries: no partial words
    ("males", None),
    ("(male)", 0),               # punctuation is a boundary
    ("", None),
    (None, None),
    ("I cannot tell.", None),
])
def test_gender(gender, text, expected):
  assert gender(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Black or African American", 1),
    ("White", 0),
    ("The answer: Black or African American.", 1),
    # the multi-word category wins over the shorter words inside it, so its trailing
    # "American" is not a later mention of anything
    ("White, or maybe Black or African American", 1),
    ("Black or African American, or maybe White", 0),
    ("American Indian or Alaska Native", 2),
    ("Native American", 2),
    ("Native Hawaiian or Other Pacific Islander", 4),
    ("pacific   islander", 4),           # any whitespace between words, case-insensitive
    ("Asian", 3),
    ("Asians", None),
    ("An American", None),
    ("Caucasian", 0),
])
def test_race_multiword(race, text, expected):
  assert race(text) == expected


def test_mentions_positions(race):
  text = "White then Black or African American"
  assert race.mentions(text) == [(0, 5, 0), (11, len(text), 1)]


def test_sentiment():
  parser = CategoryParser(SENTIMENT)
  assert parser("Neutral, then positive") == 0
  assert parser("non-negative") == 1   # hyphen is a boundary (the rule is lexical)
  assert parser.parse_many(["Negative", "meh", "NEUTRAL!"]) == [1, None, 2]


@pytest.mark.parametrize("categories, synonyms", [
    ([], None),
    (["a", "b"], [["x"]]),               # wrong number of synonym lists
    (["a", "b"], [["x"], ["X"]]),        # one term for two categories
    (["a", " "], None),                  # empty term
    (["a", "b"], ["x", "y"]),            # strings instead of lists
])
def test_bad_specs(categories, synonyms):
  with pytest.raises(InputError):
    CategoryParser(categories, synonyms)


@pytest.mark.parametrize("text, expected", [
    # Misparses a review found with synonyms on (optimistic -> positive, stressed -> negative,
    # men -> male): the category names alone read them right.
    ("Neutral - neither optimistic nor stressed.", "neutral"),
    ("Positive, though sometimes stressed", "positive"),
    ("Female. (Most are women, some men.)", "female"),
])
def test_reference_rule_counts_category_names_only(text, expected):
  from distfair_jax.data.attributes import GENDER as GENDER_SPEC, SENTIMENT as SENTIMENT_SPEC
  spec = SENTIMENT_SPEC if expected in SENTIMENT else GENDER_SPEC
  reference = CategoryParser(spec.names)
  with_synonyms = CategoryParser(spec.names, [list(c.synonyms) for c in spec.categories])
  assert spec.names[reference(text)] == expected
  assert spec.names[with_synonyms(text)] != expected       # the synonyms option misreads them


@pytest.mark.parametrize("text, bare", [
    ("Female", True), (" female.\n", True), ("**Male**", True), ("Black or  African American", True),
    ("women", True),                       # a synonym alone
    ("Female description0oniones", False),  # junk after the word: not bare, still no story
    ("Male1Female10", False), ("She is a nurse.", False), ("", False), (None, False),
])
def test_a_bare_answer_is_one_term_and_nothing_else(gender, race, text, bare):
  parser = race if "African" in str(text) else gender
  assert parser.is_bare(text) is bare
