"""The Encoder: chat-template tokenization, steering / pad / stop ids, and length buckets.

One ``Encoder`` per tokenizer serves both training data and sampling, so that evaluation prompts,
steering tokens and stops are tokenized exactly as in training. Sequence = prompt ids + completion
ids, tokenized separately and concatenated:

- prompt (``prompt_format="chat"``, default): the question rendered by the run's
  ``data.chat.ChatFormat`` (the chat template with ``data.system_prompt`` and
  ``data.chat_template_kwargs``, generation prompt appended), tokenized without extra special
  tokens; (``"reference"``): the same with ``<Q>{prompt}<A>`` as the user turn's content, as the
  original scripts render it (a tokenizer without a chat template: that raw text, tokenized with
  the tokenizer's own specials, BOS).
- completion: [steering token] + answer tokens + end-of-turn tokens (what the chat template puts
  after an assistant message, e.g. ``<|eot_id|>`` or ``<|im_end|>``; the EOS token for raw
  ``reference`` text). IFT / DPO completions have no steering token.
- ``steering_placement="user_turn"`` (the original code's placement): a steered record's prompt
  stops where the user turn's content ends, and its completion is [steering token] + the rest of
  the prompt (the end of the user turn and the generation prompt: ``steering_suffix``) + answer +
  end of turn; the steering token is still predicted at the last prompt position. The suffix is
  labelled like the rest (fixed text: the SFT model gives it probability ~1, so it adds ~0 to
  KTO's log-ratios); the sampler feeds it after the steering token instead of sampling it.

Steering tokens are checked once: each exactly one token, in the vocabulary (not the unknown
token: a tokenizer directory without its vocabulary file maps every digit to ``<unk>``), distinct
across categories, and the first assistant token after the generation prompt. Stop tokens: the
eos ids of the model's generation_config.json, the tokenizer's EOS and the token the template ends
an assistant turn with, and only special (added) tokens: an ordinary vocabulary token such as
Qwen2's BPE piece ``</s>`` never stops a sample.

Length policy: prompts are truncated from the left to ``max_prompt_length``, completions to
``max_length - len(prompt)`` (``max_prompt_length < max_length``, so the steering token is never
lost).

Length buckets (one place for every padded length): training batches pad to
``Encoder.buckets`` = ``bucket_lengths(max_length, length_buckets)`` (``pow2``: powers of two from
32, then ``max_length``; ``fine``: 1.5 times each power of two as well, so a batch pads at most a
third of its length, not half, for one more compiled step shape per octave); packed rows, which hold several sequences, to ``packed_bucket``; the sampler's left-padded
prompts to ``prompt_bucket``
(multiples of 16 above 32 tokens: each padded slot is read again by every decode step) and batches
of prompts scored at once to ``pow2``.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping, Sequence

import numpy as np

from distfair_jax.data.attributes import AttributeSpec
from distfair_jax.data import kinds
from distfair_jax.data.chat import PROMPT_FORMATS, SYSTEM_DEFAULT, ChatFormat
from distfair_jax.data.tokenizer import generation_eos_ids
from distfair_jax.errors import InputError

__all__ = ["Encoder", "steering_token_ids", "LENGTH_BUCKETS", "STEERING_PLACEMENTS",
           "bucket_lengths", "bucket_for", "packed_bucket",
           "pow2_bucket", "prompt_bucket", "next_pow2", "pair_records", "packed_cost_ratio",
           "special_ids"]

_PROBE_QUESTION = "A person is randomly selected. What is this person's category?"
# Token strings that end a turn or a text in the templates we know (Llama 3, Qwen 2, Gemma 2,
# tiny): stops where the tokenizer has them as special tokens (never as ordinary vocabulary).
_STOP_TOKEN_STRINGS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>",
                       "<|endoftext|>", "<end_of_turn>", "<eos>", "</s>")


# ------------------------------------------------------------------------------------------------
# Length buckets


LENGTH_BUCKETS = ("pow2", "fine")
STEERING_PLACEMENTS = ("assistant", "user_turn")


def bucket_lengths(max_length: int, length_buckets: str = "pow2", *,
                   smallest: int = 32) -> tuple[int, ...]:
  """Padded lengths below ``max_length``, then ``max_length``: from ``smallest`` each power of two
  (``pow2``: 32, 64, 128, ...; a 140-token story row pads to 256) and with ``fine`` 1.5 times each
  as well (32, 48, 64, 96, 128, 192, ...: a batch pads at most a third of its length)."""
  if length_buckets not in LENGTH_BUCKETS:
    raise InputError(f"tokenize: length_buckets: expected one of {list(LENGTH_BUCKETS)}, "
                     f"got {length_buckets!r}")
  out, n = [], smallest
  while n < max_length:
    out.append(n)
    if length_buckets == "fine" and n * 3 // 2 < max_length and n % 2 == 0:
      out.append(n * 3 // 2)
    n *= 2
  return tuple(out) + (max_length,)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= length."""
  for b in buckets:
    if length <= b:
      return b
  raise InputError(f"batch: length: expected at most {buckets[-1]} tokens, got {length}")


def packed_bucket(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= n, or above the largest bucket the next multiple of it (a packed row may
  be longer than ``max_length``: it holds several sequences that share their prompt)."""
  if n <= buckets[-1]:
    return bucket_for(n, buckets)
  return -(-n // buckets[-1]) * buckets[-1]


def next_pow2(n: int) -> int:
  """The smallest power of two >= n (1 for n <= 1)."""
  return 1 << max(int(n) - 1, 0).bit_length()


def pow2_bucket(n: int, minimum: int = 16) -> int:
  """Padded length for ``n`` tokens: powers of two up to 512, then multiples of 256."""
  n = max(int(n), 1, minimum)
  if n <= 512:
    return 1 << (n - 1).bit_length()
  return -(-n // 256) * 256


def prompt_bucket(n: int) -> int:
  """Padded prompt length for the sampler: ``pow2_bucket`` but multiples of 16 above 32 (every
  padded slot is read again by each decode step of each round, so coarse buckets cost decode time)."""
  return min(pow2_bucket(n), -(-max(int(n), 1) // 16) * 16) if n > 32 else pow2_bucket(n)


# ------------------------------------------------------------------------------------------------
# The Encoder


_LOCK = threading.Lock()  # HF tokenizers may mutate their backend per call: one call at a time


def _name(tokenizer) -> str:
  return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _ids(tokenizer, text: str, special: bool = False) -> list[int]:
  with _LOCK:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def special_ids(tokenizer) -> set[int]:
  """Ids of the tokenizer's special tokens (its named ones and the added tokens marked special)."""
  ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
  for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
    if getattr(tok, "special", False):
      ids.add(int(i))
  return ids


class Encoder:
  """Turns records into token ids for one tokenizer; checks the chat template once.

  Args:
    tokenizer: a Hugging Face tokenizer (with a chat template for ``prompt_format="chat"``).
    attribute: when given, its steering tokens are checked up front (``steering_ids``: [K]).
    prompt_format: "chat" (default) or "reference" (the user turn holds ``<Q>{question}<A>``;
      raw text when the tokenizer has no chat template).
    max_length, max_prompt_length: the length policy (see the module docstring).
    length_buckets: ``pow2`` or ``fine``, the padded lengths of training batches (``buckets``).
    steering_placement: ``assistant`` (the first assistant token) or ``user_turn`` (the end of the
      user turn's content; see the module docstring).
    system_prompt, chat_template_kwargs: the prompt's system message and template variables
      (``data.chat.ChatFormat``; a run's ``data.system_prompt`` / ``data.chat_template_kwargs``).
  """

  def __init__(self, tokenizer, *, attribute: AttributeSpec | None = None,
               prompt_format: str = "chat", max_length: int = 1024,
               max_prompt_length: int = 512, system_prompt: str = SYSTEM_DEFAULT,
               chat_template_kwargs: Mapping[str, Any] | None = None,
               length_buckets: str = "pow2", steering_placement: str = "assistant"):
    if steering_placement not in STEERING_PLACEMENTS:
      raise InputError(f"tokenize: steering_placement: expected one of "
                       f"{list(STEERING_PLACEMENTS)}, got {steering_placement!r}")
    if prompt_format not in PROMPT_FORMATS:
      raise InputError(f"tokenize: prompt_format: expected one of {list(PROMPT_FORMATS)}, "
                       f"got {prompt_format!r}")
    if not (isinstance(max_length, int) and isinstance(max_prompt_length, int) and
            0 < max_prompt_length < max_length):
      raise InputError(f"tokenize: max_prompt_length: expected 0 < max_prompt_length < max_length "
                       f"(so the steering token always fits), got {max_prompt_length} and "
                       f"{max_length}")
    self.tokenizer = tokenizer
    self.prompt_format = prompt_format
    self.max_length = max_length
    self.max_prompt_length = max_prompt_length
    self.buckets = bucket_lengths(max_length, length_buckets)
    self.name = _name(tokenizer)
    pad = tokenizer.pad_token_id
    if pad is None:
      pad = tokenizer.eos_token_id
    if pad is None:
      raise InputError(f"tokenizer {self.name}: pad_token: expected a pad or eos token, got none")
    self.pad_id = int(pad)
    self.chat = ChatFormat(tokenizer, prompt_format=prompt_format, system_prompt=system_prompt,
                           template_kwargs=chat_template_kwargs)
    self.end_ids = self._end_of_turn_ids()
    self.placement = steering_placement
    self.steering_suffix: list[int] = []  # fed after the steering token (user_turn)
    if steering_placement == "user_turn":
      tail = self.chat.user_turn_split(_PROBE_QUESTION)[1]
      self.steering_suffix = _ids(self.tokenizer, tail) if tail else []
    self._steered_cache: dict[str, list[int]] = {}
    self._prompt_cache: dict[str, list[int]] = {}
    self._text_cache: dict[str, list[int]] = {}
    self._steer_cache: dict[str, int] = {}
    self.stop_ids = self._stop_ids()
    self.steering_ids = None
    if attribute is not None:
      self.steering_ids = np.asarray(self.check_steering_tokens(
          [c.steering_token for c in attribute.categories],
          [c.answer for c in attribute.categories]), np.int32)

  @classmethod
  def for_data(cls, tokenizer, data_cfg, *, attribute: AttributeSpec | None = None) -> Encoder:
    """The Encoder of a run's ``data`` section (``config.DataConfig``): its prompt format, system
    prompt, template variables and length policy, as training and evaluation both use it."""
    d = data_cfg
    return cls(tokenizer, attribute=attribute, prompt_format=str(d.prompt_format),
               max_length=d.max_length, max_prompt_length=d.max_prompt_length,
               system_prompt=str(d.system_prompt),
               chat_template_kwargs=dict(d.chat_template_kwargs or {}),
               length_buckets=str(d.length_buckets),
               steering_placement=str(d.steering_placement))

  # -- text rendering --------------------------------------------------------------------------

  def prompt_text(self, prompt: str) -> str:
    return self.chat.prompt_text(prompt)

  def _full_text(self, prompt: str, content: str) -> str:
    return self.chat.full_text(prompt, content)

  def _end_of_turn_ids(self) -> list[int]:
    eos = self.tokenizer.eos_token_id
    if not self.chat.templated:
      if eos is None:
        raise InputError(f"tokenizer {self.name}: eos_token: expected an end token, got none")
      return [int(eos)]
    content = "Answer"
    prompt_text = self.prompt_text(_PROBE_QUESTION)
    full = self._full_text(_PROBE_QUESTION, content)
    if not full.startswith(prompt_text + content):
      raise InputError(f"tokenizer {self.name}: chat_template: expected the assistant turn to "
                       f"start right after the generation prompt, got a template that renders it "
                       f"differently")
    suffix = full[len(prompt_text) + len(content):].rstrip()
    if suffix:
      return _ids(self.tokenizer, suffix)
    if eos is None:
      raise InputError(f"tokenizer {self.name}: eos_token: expected an end-of-turn token, "
                       f"got none")
    return [int(eos)]

  def _stop_ids(self) -> list[int]:
    """End-of-turn and EOS ids (see the module docstring): the eos ids of the model's
    generation_config.json, the tokenizer's EOS id(s), the first token this template ends a turn
    with, and the end-of-turn tokens of the templates we know; special tokens only."""
    ids = set(generation_eos_ids(self.tokenizer) or [])
    eos = self.tokenizer.eos_token_id
    if isinstance(eos, int):
      ids.add(eos)
    elif isinstance(eos, (list, tuple)):
      ids.update(int(e) for e in eos)
    vocab = self.tokenizer.get_vocab()
    ids.update(int(vocab[t]) for t in _STOP_TOKEN_STRINGS if t in vocab)
    if self.end_ids:
      ids.add(int(self.end_ids[0]))
    special = special_ids(self.tokenizer)
    kept = sorted(i for i in ids if i in special)
    if not kept and isinstance(eos, int):
      kept = [int(eos)]
    return kept

  # -- ids -------------------------------------------------------------------------------------

  def steering_id(self, token: str, answer: str = "Answer") -> int:
    """The id of steering token ``token``, checked: exactly one token, and the first assistant
    token after the generation prompt when followed by ``answer``."""
    if token in self._steer_cache:
      return self._steer_cache[token]
    ids = _ids(self.tokenizer, token)
    if len(ids) != 1:
      raise InputError(f"tokenizer {self.name}: steering_token: expected {token!r} to be exactly "
                       f"one token, got {len(ids)} tokens {ids}")
    unk = getattr(self.tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk:
      raise InputError(f"tokenizer {self.name}: steering_token: expected {token!r} to be a token "
                       f"of the vocabulary, got the unknown token "
                       f"{getattr(self.tokenizer, 'unk_token', None)!r} (id {unk}); this tokenizer "
                       f"has {len(self.tokenizer)} tokens (a directory without its vocabulary "
                       f"file, tokenizer.json or tokenizer.model?)")
    special = not self.chat.templated
    if self.placement == "user_turn":  # the question's text, then the token, then the rest
      head, tail = self.chat.user_turn_split(_PROBE_QUESTION)
      prompt = _ids(self.tokenizer, head, special)
      full = _ids(self.tokenizer, head + token + tail, special)
      where = "the token after the user turn's content"
    else:
      prompt = _ids(self.tokenizer, self.prompt_text(_PROBE_QUESTION), special)
      full = _ids(self.tokenizer, self._full_text(_PROBE_QUESTION, token + answer), special)
      where = "the first assistant token after the generation prompt"
    if full[:len(prompt)] != prompt or len(full) <= len(prompt) or full[len(prompt)] != ids[0]:
      got = (full[len(prompt):len(prompt) + 2] if full[:len(prompt)] == prompt
             else "a changed prompt")
      raise InputError(f"tokenizer {self.name}: steering_token: expected {token!r} (id {ids[0]}) "
                       f"to be {where}, got {got} (the tokenizer merges it with its neighbours)")
    self._steer_cache[token] = ids[0]
    return ids[0]

  def check_steering_tokens(self, tokens: Sequence[str],
                            answers: Sequence[str] | None = None) -> list[int]:
    """The ids of the K steering tokens, each checked (``steering_id``) and distinct."""
    ids, owner = [], {}
    for k, token in enumerate(tokens):
      i = self.steering_id(token, answers[k] if answers is not None else "Answer")
      if i in owner:
        raise InputError(f"tokenizer {self.name}: steering_token: expected distinct tokens, got "
                         f"{owner[i]!r} and {token!r} both id {i}")
      owner[i] = token
      ids.append(i)
    return ids

  def prompt_ids(self, prompt: str) -> list[int]:
    """Prompt ids, truncated from the left to ``max_prompt_length``."""
    ids = self._prompt_cache.get(prompt)
    if ids is None:
      ids = _ids(self.tokenizer, self.prompt_text(prompt), not self.chat.templated)
      ids = ids[-self.max_prompt_length:]
      self._prompt_cache[prompt] = ids
    return ids

  def steered_prompt_ids(self, prompt: str) -> list[int]:
    """The prompt of a steered sequence: ``prompt_ids``, or (``user_turn``) the ids through the
    user turn's content, truncated from the left to ``max_prompt_length``."""
    if self.placement == "assistant":
      return self.prompt_ids(prompt)
    ids = self._steered_cache.get(prompt)
    if ids is None:
      head, tail = self.chat.user_turn_split(prompt)
      if (_ids(self.tokenizer, tail) if tail else []) != self.steering_suffix:
        raise InputError(f"tokenizer {self.name}: chat_template: steering_placement user_turn: "
                         f"expected one end of the user turn for every question, got "
                         f"{tail!r} for {prompt[:60]!r}")
      ids = _ids(self.tokenizer, head, not self.chat.templated)[-self.max_prompt_length:]
      self._steered_cache[prompt] = ids
    return ids

  def encode_prompts(self, prompts: Sequence[str], *,
                     steered: bool | None = None) -> list[list[int]]:
    """Prompt ids of each question (what the sampler prefills): ``steered_prompt_ids`` for a
    steered Encoder (``steered`` None: built with an attribute), else ``prompt_ids``."""
    steered = self.steering_ids is not None if steered is None else steered
    ids = self.steered_prompt_ids if steered else self.prompt_ids
    return [list(ids(p)) for p in prompts]

  def steering_head(self, steering_id: int) -> list[int]:
    """What follows a steered prompt before the answer: [steering id] + ``steering_suffix``."""
    return [int(steering_id)] + self.steering_suffix

  def completion_ids(self, response: str, steering_token: str | None = None) -> list[int]:
    """[steering id] (+ ``steering_suffix``) + answer ids + end-of-turn ids (untruncated)."""
    ids = self._text_cache.get(response)
    if ids is None:
      ids = _ids(self.tokenizer, response) if response else []
      self._text_cache[response] = ids
    head = [] if steering_token is None else self.steering_head(self.steering_id(steering_token))
    return head + ids + self.end_ids

  def encode_record(self, rec: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """One record -> {"prompt": ids, "completion": ids (or "chosen"/"rejected"), "category",
    "target", "desirable"}; completions are not yet truncated (see ``fit``). What a kind's record
    holds is read from its ``data.kinds`` entry: steered (sft, kto) or not, and its completions."""
    spec = kinds.get(kind, "tokenize")
    steered = spec.steered
    out = {"prompt": (self.steered_prompt_ids if steered else self.prompt_ids)(rec["prompt"]),
           "category": int(rec["category"]), "target": np.asarray(rec["target"], np.float32)}
    token = rec["steering_token"] if steered else None
    for key, field in spec.completions:
      out[key] = self.completion_ids(rec[field], token)
    if "completion" in out:  # a single completion: desirable unless a steered record says not
      out["desirable"] = int(rec.get("status", "desirable") == "desirable") if steered else 1
    return out

  def fit(self, prompt: list[int], completion: list[int]) -> list[int]:
    """The completion truncated to the room ``max_length - len(prompt)`` (never empty)."""
    room = self.max_length - len(prompt)
    if room < 1 and completion:
      raise InputError(f"tokenize: max_length: expected room for the steering token after a "
                       f"{len(prompt)}-token prompt, got max_length {self.max_length}")
    return completion[:room]


def steering_token_ids(attribute: AttributeSpec, tokenizer, *,
                       prompt_format: str = "chat") -> np.ndarray:
  """[K] int32 ids of the attribute's steering tokens, checked for this tokenizer and template.

  InputError unless each steering token is exactly one token and is the first assistant token
  after the chat template's generation prompt (followed by its category's answer).
  """
  return Encoder(tokenizer, attribute=attribute, prompt_format=prompt_format).steering_ids



# ------------------------------------------------------------------------------------------------
# KTO pairs


def pair_records(records: Sequence[Mapping[str, Any]]) -> list[tuple[Mapping, Mapping]]:
  """KTO records in file order (each desirable followed by its undesirable) -> pairs."""
  if len(records) % 2:
    raise InputError("kto: records: expected desirable/undesirable pairs, got an odd count")
  pairs = []
  for i in range(0, len(records), 2):
    d, u = records[i], records[i + 1]
    if d.get("status") != "desirable" or u.get("status") != "undesirable" or (
        d["prompt"] != u["prompt"]):
      raise InputError(f"kto: records[{i}]: status: expected a desirable record followed by its "
                       f"undesirable partner (same prompt), got {d.get('status')!r}, "
                       f"{u.get('status')!r}")
    pairs.append((d, u))
  return pairs



def packed_cost_ratio(examples: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> float:
  """Estimated compute of the packed KTO layout over the rows layout for encoded pairs (``Encoder.
  encode_record`` of a desirable and an undesirable record).

  Rows: every sequence is prompt + completion (L tokens), run 3x with gradient (targets), 1x without
  (mismatched) and 2x in the reference: 12 L per pair-of-rows. Packed: one row of T = prompt + four
  completions, 3x with gradient and 1x in the reference: 4 T. The ratio is 4 T / 12 L over the
  means (the mismatched completions are other pairs': their lengths are estimated by the pair's
  own). Below 1 the packed layout is cheaper: completions shorter than about twice the prompt.
  """
  if not examples:
    raise InputError("kto: records: expected at least one pair to size the batch layout, got none")
  t = l = 0.0
  for d, u in examples:
    p, cd, cu = len(d["prompt"]), len(d["completion"]), len(u["completion"])
    t += p + 2 * (cd + cu)
    l += p + (cd + cu) / 2
  return 4.0 * t / (12.0 * l)
