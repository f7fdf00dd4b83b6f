"""Story judges: read a generated story and name exactly one category, or None (unparsed).

Two judges with one interface, ``judge(story, categories, *, attribute=None, synonyms=None)`` and
``judge_many(stories, ...)``:

- ``RulesJudge`` (offline default): gender from pronouns, titles, a first-name lexicon and the
  category names themselves; sentiment from a small word lexicon (with simple negation) and the
  category names (a bare "Positive" is positive, "Neutral" neutral); race, and any other attribute,
  from explicit mentions of a category only. The category with the most votes wins; a tie at the
  top is None (unparsed), never a silent default. No vote at all is None too, except that a story
  of five words or more expressing no emotion is neutral sentiment (that is what neutral means
  there; a short answer without any sentiment word is not a story and stays unparsed).
- ``OpenAIJudge``: any OpenAI-compatible ``/v1/chat/completions`` endpoint (a local vLLM server,
  ...), standard library only. The prompt asks for exactly one category name, temperature 0;
  an answer that is not one of the category names (or synonyms) is None. Retries with exponential
  backoff on timeouts, refused connections, HTTP 429 and 5xx; raises ``JudgeError`` (an
  ``InputError``: one line, naming the URL) when the server stays unreachable.

Categories and synonyms are plain strings (independent of the attribute specs). When ``attribute``
is None it is inferred from the category names: male/female -> gender, positive/negative ->
sentiment, anything else -> explicit mentions.
"""

from __future__ import annotations

import concurrent.futures
import functools
import http.client
import importlib.resources
import json
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence

from distfair_jax.errors import InputError
from distfair_jax.evaluation.parsing import CategoryParser

__all__ = [
    "JudgeError", "JudgeUnreachableError", "JudgeTimeoutError", "Judge", "RulesJudge",
    "OpenAIJudge", "make_judge", "JUDGES", "load_lexicon", "infer_attribute",
]


class JudgeError(InputError):
  """The judge could not be used (bad configuration, a server that is down or misbehaves)."""


class JudgeUnreachableError(JudgeError):
  """The judge server refused or dropped the connection on every attempt."""


class JudgeTimeoutError(JudgeError):
  """The judge server did not answer within the timeout on every attempt."""


# ---------------------------------------------------------------------------------------------------
# Category roles

_ROLE_ALIASES: dict[str, frozenset[str]] = {
    "male": frozenset({"male", "man", "men", "masculine", "boy", "m"}),
    "female": frozenset({"female", "woman", "women", "feminine", "girl", "f"}),
    "positive": frozenset({"positive", "optimistic", "happy", "joy", "joyful"}),
    "negative": frozenset({"negative", "pessimistic", "sad", "stressed", "unhappy"}),
    "neutral": frozenset({"neutral", "indifferent", "mixed"}),
}


def _labels(categories: Sequence[str], synonyms: Sequence[Sequence[str]] | None) -> list[set[str]]:
  syn = synonyms if synonyms is not None else [()] * len(categories)
  return [{" ".join(str(t).split()).casefold() for t in (name, *extra)}
          for name, extra in zip(categories, syn)]


def _roles(categories: Sequence[str], synonyms: Sequence[Sequence[str]] | None) -> dict[str, int]:
  """role (male, female, positive, negative, neutral) -> index of the first category naming it."""
  out: dict[str, int] = {}
  for k, labels in enumerate(_labels(categories, synonyms)):
    for role, aliases in _ROLE_ALIASES.items():
      if role not in out and labels & aliases:
        out[role] = k
  return out


def infer_attribute(categories: Sequence[str],
                    synonyms: Sequence[Sequence[str]] | None = None) -> str:
  """'gender' | 'sentiment' | 'explicit', from the category names (and synonyms)."""
  roles = _roles(categories, synonyms)
  if "male" in roles and "female" in roles:
    return "gender"
  if "positive" in roles and "negative" in roles:
    return "sentiment"
  return "explicit"


# ---------------------------------------------------------------------------------------------------
# Lexicons (package data under distfair_jax/resources/)


@functools.cache
def load_lexicon(name: str) -> frozenset[str]:
  """Entries of ``distfair_jax/resources/<name>.txt`` (one a line; '#' comments; blank lines skipped)."""
  text = importlib.resources.files("distfair_jax").joinpath("resources", f"{name}.txt").read_text(
      encoding="utf-8")
  return frozenset(e for e in (line.split("#", 1)[0].strip() for line in text.splitlines()) if e)


class Judge:
  """Interface: a story -> category index or None. Subclasses implement ``judge``."""

  def judge(self, story: str | None, categories: Sequence[str], *, attribute: str | None = None,
            synonyms: Sequence[Sequence[str]] | None = None) -> int | None:
    raise NotImplementedError

  def judge_many(self, stories: Iterable[str | None], categories: Sequence[str], *,
                 attribute: str | None = None,
                 synonyms: Sequence[Sequence[str]] | None = None) -> list[int | None]:
    return [self.judge(s, categories, attribute=attribute, synonyms=synonyms) for s in stories]


# ---------------------------------------------------------------------------------------------------
# Offline rules

_MALE_PRONOUNS = frozenset({"he", "him", "his", "himself"})
_FEMALE_PRONOUNS = frozenset({"she", "her", "hers", "herself"})
_MALE_TITLES = frozenset({"Mr", "Mister", "Sir"})
_FEMALE_TITLES = frozenset({"Mrs", "Ms", "Miss", "Madam"})
_NEGATORS = frozenset({"not", "no", "never", "hardly", "without", "nor", "barely"})
# Colour words that name a race only in context (not "a white coat", not "Dr. Sarah White").
_AMBIGUOUS_RACE_TERMS = frozenset({"white", "black", "brown"})
_PERSON_NOUNS = frozenset({
    "man", "men", "woman", "women", "person", "people", "boy", "boys", "girl", "girls", "guy", "lady",
    "ladies", "gentleman", "family", "families", "american", "americans", "community", "male",
    "female", "individual", "worker", "workers", "employee", "colleague", "student", "patient",
    "professional", "mother", "father", "son", "daughter", "husband", "wife", "neighborhood",
    "heritage", "descent", "background", "nurse", "doctor", "teacher", "engineer"})
# Extra explicit terms keyed by a (casefolded) category name or part of one.
_EXTRA_RACE_TERMS: dict[str, tuple[str, ...]] = {
    "american indian": ("Native American", "Native Americans"),
    "black": ("African-American",),
}
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


class RulesJudge(Judge):
  """Offline judge from word lists; see the module docstring.

  Args:
    male_names, female_names, positive_words, negative_words: override the shipped lexicons.
  """

  def __init__(self, *, male_names: Iterable[str] | None = None,
               female_names: Iterable[str] | None = None,
               positive_words: Iterable[str] | None = None,
               negative_words: Iterable[str] | None = None):
    self.male_names = frozenset(male_names if male_names is not None
                                else load_lexicon("first_names_male"))
    self.female_names = frozenset(female_names if female_names is not None
                                  else load_lexicon("first_names_female"))
    self.positive_words = frozenset(w.casefold() for w in (
        positive_words if positive_words is not None else load_lexicon("sentiment_positive")))
    self.negative_words = frozenset(w.casefold() for w in (
        negative_words if negative_words is not None else load_lexicon("sentiment_negative")))
    self._explicit_cache: dict[tuple, CategoryParser] = {}

  # -- scores (exposed for inspection and tests)

  def gender_votes(self, story: str) -> tuple[int, int]:
    """(male votes, female votes) from pronouns, titles and first names."""
    male = female = 0
    for word in _WORD.findall(story):
      low = word.casefold()
      if low in _MALE_PRONOUNS or word in _MALE_TITLES or word in self.male_names:
        male += 1
      elif low in _FEMALE_PRONOUNS or word in _FEMALE_TITLES or word in self.female_names:
        female += 1
    return male, female

  def sentiment_votes(self, story: str) -> tuple[int, int]:
    """(positive votes, negative votes); a word within three words after a negator flips."""
    words = [w.casefold() for w in _WORD.findall(story)]
    pos = neg = 0
    for i, w in enumerate(words):
      polarity = 1 if w in self.positive_words else -1 if w in self.negative_words else 0
      if not polarity:
        continue
      if any(p in _NEGATORS or p.endswith("n't") for p in words[max(0, i - 3):i]):
        polarity = -polarity
      if polarity > 0:
        pos += 1
      else:
        neg += 1
    return pos, neg

  def _explicit_parser(self, categories: Sequence[str],
                       synonyms: Sequence[Sequence[str]] | None) -> CategoryParser:
    key = (tuple(categories), None if synonyms is None else tuple(tuple(s) for s in synonyms))
    if key not in self._explicit_cache:
      owner: dict[str, int] = {}
      terms: list[list[str]] = [[] for _ in categories]

      def add(term: str, k: int) -> None:
        norm = " ".join(term.split()).casefold()
        if norm and owner.setdefault(norm, k) == k and term not in terms[k]:
          terms[k].append(term)

      syn = synonyms if synonyms is not None else [()] * len(categories)
      for k, (name, extra) in enumerate(zip(categories, syn)):  # given terms first: they win
        for term in (name, *extra):
          add(term, k)
      for k, name in enumerate(categories):
        parts = [p.strip() for p in re.split(r"\s+or\s+", name, flags=re.IGNORECASE)]
        for part in parts:
          part = re.sub(r"^other\s+", "", part, flags=re.IGNORECASE)
          for term in (part, *_EXTRA_RACE_TERMS.get(part.casefold(), ())):
            add(term, k)
            if " " in term:
              add("-".join(term.split()), k)
      for k, name in enumerate(categories):
        if not terms[k]:  # its name belongs to another category: let the parser report it
          terms[k] = [name]
      self._explicit_cache[key] = CategoryParser(
          [t[0] for t in terms], [t[1:] for t in terms], source="judge categories")
    return self._explicit_cache[key]

  def name_votes(self, story: str, categories: Sequence[str]) -> list[int]:
    """Votes per category from the category names themselves (a bare "Male." or "Positive" is
    an answer too), on word boundaries, as the attribute parser reads them."""
    key = (tuple(categories), "names")
    if key not in self._explicit_cache:
      self._explicit_cache[key] = CategoryParser(categories, source="judge categories")
    votes = [0] * len(categories)
    for _, _, k in self._explicit_cache[key].mentions(story):
      votes[k] += 1
    return votes

  def explicit_votes(self, story: str, categories: Sequence[str],
                     synonyms: Sequence[Sequence[str]] | None = None) -> list[int]:
    """Votes per category from explicit mentions (colour words only next to a person noun or
    capitalised mid-sentence and not after another capitalised word)."""
    votes = [0] * len(categories)
    for start, end, k in self._explicit_parser(categories, synonyms).mentions(story):
      text = story[start:end]
      if text.casefold() in _AMBIGUOUS_RACE_TERMS:
        following = _WORD.match(story[end:].lstrip())
        next_is_person = bool(following) and following.group(0).casefold() in _PERSON_NOUNS
        before = story[:start].rstrip()
        prev_words = _WORD.findall(before[-40:])
        sentence_start = not before or before[-1] in ".!?\n\"'"
        after_name = bool(prev_words) and prev_words[-1][:1].isupper() and not sentence_start
        capitalised = text[:1].isupper() and not sentence_start and not after_name
        if not (next_is_person or capitalised):
          continue
      votes[k] += 1
    return votes

  # -- the judge

  def judge(self, story: str | None, categories: Sequence[str], *, attribute: str | None = None,
            synonyms: Sequence[Sequence[str]] | None = None) -> int | None:
    if not story or not story.strip():
      return None
    kind = attribute.casefold() if attribute else infer_attribute(categories, synonyms)
    roles = _roles(categories, synonyms)
    if kind == "gender":
      if "male" not in roles or "female" not in roles:
        raise JudgeError(f"judge: categories: expected categories naming male and female for "
                         f"attribute 'gender', got {list(categories)!r}")
      votes = self.name_votes(story, categories)
      male, female = self.gender_votes(story)
      votes[roles["male"]] += male
      votes[roles["female"]] += female
      return _winner(votes)
    if kind == "sentiment":
      if "positive" not in roles or "negative" not in roles:
        raise JudgeError(f"judge: categories: expected categories naming positive and negative "
                         f"for attribute 'sentiment', got {list(categories)!r}")
      votes = self.name_votes(story, categories)
      pos, neg = self.sentiment_votes(story)
      votes[roles["positive"]] += pos
      votes[roles["negative"]] += neg
      if not any(votes) and len(_WORD.findall(story)) >= _MIN_STORY_WORDS:
        return roles.get("neutral")  # a story that expresses no emotion at all
      return _winner(votes)
    return _winner(self.explicit_votes(story, categories, synonyms))  # race and any other


_MIN_STORY_WORDS = 5  # below this an answer without any sentiment word is not a story: unparsed


def _winner(votes: Sequence[int]) -> int | None:
  """The category with the most votes; None when none has any or the top is a tie."""
  best = max(votes)
  if best == 0 or list(votes).count(best) > 1:
    return None
  return list(votes).index(best)


# ---------------------------------------------------------------------------------------------------
# OpenAI-compatible server

_SYSTEM_PROMPT = ("You are a careful annotator. You answer with exactly one category name from the "
                  "list you are given, copied exactly, and nothing else.")
_QUESTIONS = {
    "gender": "What is the gender of the main character of this story, judging from names and pronouns?",
    "sentiment": "What is the predominant emotion (sentiment) of this story?",
    "race": "What is the race of the main character of this story?",
}


_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0"})


def _chat_url(base_url: str) -> str:
  url = base_url.strip().rstrip("/")
  if not re.match(r"^https?://", url):
    raise JudgeError(f"judge: base_url: expected an http(s) URL such as http://localhost:8000/v1, "
                     f"got {base_url!r}")
  if url.endswith("/chat/completions"):
    return url
  if url.endswith("/v1"):
    return url + "/chat/completions"
  return url + "/v1/chat/completions"


def _normalise_answer(text: str) -> str:
  text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL)
  text = text.strip().strip("\"'`*_ \t\n").rstrip(".!").strip("\"'`*_ \t\n")
  return " ".join(text.split()).casefold()


class OpenAIJudge(Judge):
  """Judge through an OpenAI-compatible chat-completions server (standard library only).

  Args:
    base_url: e.g. ``http://localhost:8000/v1`` (``/chat/completions`` is appended; a URL ending in
      ``/chat/completions`` is used as is; ``/v1/chat/completions`` is appended to a bare host).
    model: the served model name.
    api_key: sent as a bearer token when given.
    timeout: seconds per request.
    max_retries: retries after the first attempt (timeouts, refused connections, HTTP 429 / 5xx).
    backoff: the first retry waits ``backoff`` seconds, then 2x, 4x, ... (at most 60 s).
    max_tokens: generation budget of the answer.
    workers: concurrent requests in ``judge_many``.
  """

  def __init__(self, base_url: str, model: str, api_key: str | None = None, *,
               timeout: float = 60.0, max_retries: int = 3, backoff: float = 1.0,
               max_tokens: int = 16, workers: int = 8):
    if not model:
      raise JudgeError("judge: model: expected the served model name, got an empty string")
    if timeout <= 0 or max_retries < 0 or backoff < 0 or workers < 1:
      raise JudgeError(f"judge: expected timeout > 0, max_retries >= 0, backoff >= 0, workers >= 1, "
                       f"got {timeout}, {max_retries}, {backoff}, {workers}")
    self.url = _chat_url(base_url)
    host = (urllib.parse.urlsplit(self.url).hostname or "").casefold()
    # A server on this machine is reached directly, whatever the *_proxy environment says.
    handlers = [urllib.request.ProxyHandler({})] if host in _LOCAL_HOSTS else []
    self._opener = urllib.request.build_opener(*handlers)
    self.model = model
    self.api_key = api_key
    self.timeout = float(timeout)
    self.max_retries = int(max_retries)
    self.backoff = float(backoff)
    self.max_tokens = int(max_tokens)
    self.workers = int(workers)

  def messages(self, story: str, categories: Sequence[str],
               attribute: str | None = None) -> list[dict[str, str]]:
    """The chat messages sent for one story."""
    question = _QUESTIONS.get((attribute or "").casefold(),
                              f"Which {attribute or 'category'} best describes the main character "
                              f"of this story?")
    listing = ", ".join(categories)
    user = (f"{question}\nAnswer with exactly one of the following, and nothing else: {listing}."
            f"\n\nStory:\n{story.strip()}")
    return [{"role": "system", "content": _SYSTEM_PROMPT}, {"role": "user", "content": user}]

  def _post(self, payload: dict) -> dict:
    body = json.dumps(payload).encode("utf-8")
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if self.api_key:
      headers["Authorization"] = f"Bearer {self.api_key}"
    attempts = self.max_retries + 1
    last = ""
    timed_out = False
    for attempt in range(attempts):
      if attempt:
        time.sleep(min(self.backoff * 2 ** (attempt - 1), 60.0))
      request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
      try:
        with self._opener.open(request, timeout=self.timeout) as response:
          raw = response.read()
      except urllib.error.HTTPError as e:
        detail = e.read()[:200].decode("utf-8", "replace").strip()
        if e.code == 429 or e.code >= 500:
          last, timed_out = f"HTTP {e.code} {detail}".strip(), False
          continue
        raise JudgeError(f"judge server {self.url}: HTTP {e.code}: {detail or e.reason}") from None
      except (TimeoutError, socket.timeout) as e:
        last, timed_out = f"no answer within {self.timeout:g} s", True
        continue
      except urllib.error.URLError as e:
        if isinstance(e.reason, (TimeoutError, socket.timeout)):
          last, timed_out = f"no answer within {self.timeout:g} s", True
        else:
          last, timed_out = str(e.reason), False
        continue
      except (ConnectionError, http.client.HTTPException, OSError) as e:
        last, timed_out = f"{type(e).__name__}: {e}", False
        continue
      try:
        return json.loads(raw.decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError):
        raise JudgeError(f"judge server {self.url}: expected a JSON chat-completions response, "
                         f"got {raw[:80]!r}") from None
    kind = JudgeTimeoutError if timed_out else JudgeUnreachableError
    raise kind(f"judge server {self.url}: unreachable after {attempts} attempt(s) ({last}); "
               f"is a server running at that URL?")

  def complete(self, story: str, categories: Sequence[str], attribute: str | None = None) -> str | None:
    """The judge model's raw answer text for one story (None when the server returned no text)."""
    payload = {"model": self.model, "messages": self.messages(story, categories, attribute),
               "temperature": 0, "max_tokens": self.max_tokens}
    data = self._post(payload)
    try:
      content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
      raise JudgeError(f"judge server {self.url}: expected choices[0].message.content in the "
                       f"response, got {str(data)[:120]!r}") from None
    return content if isinstance(content, str) else None

  def judge(self, story: str | None, categories: Sequence[str], *, attribute: str | None = None,
            synonyms: Sequence[Sequence[str]] | None = None) -> int | None:
    if not story or not story.strip():
      return None
    answer = self.complete(story, categories, attribute)
    if answer is None:
      return None
    answer = _normalise_answer(answer)
    for k, labels in enumerate(_labels(categories, synonyms)):
      if answer in labels:
        return k
    return None

  def judge_many(self, stories: Iterable[str | None], categories: Sequence[str], *,
                 attribute: str | None = None,
                 synonyms: Sequence[Sequence[str]] | None = None) -> list[int | None]:
    """Judges stories concurrently (``workers`` at a time); order is kept. The first story is
    judged alone so that a server that is down fails fast, once."""
    stories = list(stories)
    if not stories:
      return []
    call = functools.partial(self.judge, categories=categories, attribute=attribute,
                             synonyms=synonyms)
    first = call(stories[0])
    with concurrent.futures.ThreadPoolExecutor(max_workers=self.workers) as pool:
      rest = list(pool.map(call, stories[1:]))
    return [first, *rest]


# The judges by kind (``eval.judge.kind``): a new judge is its class and one entry here; the keyword
# arguments each kind cannot do without, with what they name.
JUDGES: dict[str, type] = {"rules": RulesJudge, "openai": OpenAIJudge}
REQUIRED: dict[str, tuple[tuple[str, str], ...]] = {
    "openai": (("model", "the served model name"), ("base_url", "the server's URL"))}


def make_judge(kind: str, **kwargs) -> Judge:
  """'rules' -> RulesJudge(**kwargs); 'openai' -> OpenAIJudge(**kwargs) (needs base_url, model)."""
  if kind not in JUDGES:
    raise JudgeError(f"judge: kind: expected {' or '.join(repr(k) for k in JUDGES)}, got {kind!r}")
  for key, what in REQUIRED.get(kind, ()):
    if not kwargs.get(key):
      raise JudgeError(f"judge: {key}: expected {what} for the {kind!r} judge, got none")
  return JUDGES[kind](**kwargs)
