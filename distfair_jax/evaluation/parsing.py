"""Parse a model's free-text answer into a category index (the paper's rule).

The category of an answer is the category word (or one of its synonyms) that occurs *last* in it,
matched case-insensitively on word boundaries: "female" does not contain "male", "women" is not
"woman". Multi-word categories ("Black or African American") are one match: at any position the
longest term wins, and the words inside a longer match are not matched again, so "African American"
inside "Black or African American" is not a separate, later mention. Whitespace inside a
multi-word term matches any run of whitespace. Answers with no category word are unparsed (None).

Independent of the attribute specs: callers pass category names and, optionally, synonyms per
category as plain strings.

    parser = CategoryParser(["male", "female"], synonyms=[["man", "men"], ["woman", "women"]])
    parser("I would say Female.")   # -> 1
    parser("no idea")               # -> None
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence

from distfair_jax.errors import InputError

__all__ = ["CategoryParser"]


def _term_pattern(term: str) -> str:
  words = term.split()
  return r"\s+".join(re.escape(w) for w in words)


class CategoryParser:
  """Maps answer text -> index of the last-mentioned category, or None.

  Args:
    categories: the K category names, in steering order; each name is itself a matching term.
    synonyms: optional, K sequences of extra terms accepted for each category (may be empty).
    source: names the origin of the terms in error messages (e.g. a spec file).

  Raises:
    InputError: empty term, wrong number of synonym lists, or one term given for two categories.
  """

  def __init__(self, categories: Sequence[str],
               synonyms: Sequence[Sequence[str]] | None = None, *, source: str = "categories"):
    if isinstance(categories, str) or not len(categories):
      raise InputError(f"{source}: categories: expected a non-empty list of names, got {categories!r}")
    if synonyms is None:
      synonyms = [() for _ in categories]
    if isinstance(synonyms, str) or len(synonyms) != len(categories):
      raise InputError(f"{source}: synonyms: expected {len(categories)} lists (one per category), "
                       f"got {synonyms!r}")
    self.categories = tuple(str(c) for c in categories)
    owner: dict[str, int] = {}  # normalised term -> category index
    for k, (name, extra) in enumerate(zip(categories, synonyms)):
      if isinstance(extra, str):
        raise InputError(f"{source}: synonyms[{k}]: expected a list of strings, got {extra!r}")
      for term in (name, *extra):
        if not isinstance(term, str) or not term.strip():
          raise InputError(f"{source}: category {k}: expected non-empty strings as terms, got {term!r}")
        key = " ".join(term.split()).casefold()
        if owner.get(key, k) != k:
          raise InputError(f"{source}: synonyms: term {term!r} is given for both category "
                           f"{self.categories[owner[key]]!r} and {self.categories[k]!r}")
        owner[key] = k
    self._owner = owner
    # Longest terms first, so that at one position the longest alternative wins.
    terms = sorted(owner, key=lambda t: (-len(t), t))
    alternation = "|".join(_term_pattern(t) for t in terms)
    self._regex = re.compile(rf"(?<!\w)(?:{alternation})(?!\w)", re.IGNORECASE)

  @property
  def num_categories(self) -> int:
    return len(self.categories)

  def mentions(self, text: str | None) -> list[tuple[int, int, int]]:
    """All non-overlapping category mentions, left to right, as (start, end, category index)."""
    return [(m.start(), m.end(), self._owner[" ".join(m.group(0).split()).casefold()])
            for m in self._regex.finditer(text or "")]

  def __call__(self, text: str | None) -> int | None:
    """The index of the last category mentioned in ``text``, or None when there is none."""
    if not text:
      return None
    found = self.mentions(text)
    return found[-1][2] if found else None

  def parse_many(self, texts: Iterable[str | None]) -> list[int | None]:
    return [self(t) for t in texts]

  def is_bare(self, text: str | None) -> bool:
    """Whether ``text`` is one category term and nothing else (around it only whitespace and
    punctuation): a bare answer, as a steered model gives to a story prompt when it has lost its
    prose ("Female")."""
    key = " ".join((text or "").strip(string.whitespace + string.punctuation).split()).casefold()
    return key in self._owner
