"""Chat-template tokenization, label masks, steering positions, padded batches, KTO KL pairs.

Sequence = prompt ids + completion ids, tokenized separately and concatenated:

- prompt (``prompt_format="chat"``, default): ``apply_chat_template([user: prompt],
  add_generation_prompt=True)`` rendered to text, tokenized without extra special tokens;
  (``"reference"``): the raw text ``<Q>{prompt}<A>`` tokenized with the tokenizer's own
  specials (BOS).
- completion: [steering token] + answer tokens + end-of-turn tokens (what the chat template puts
  after an assistant message, e.g. ``<|eot_id|>`` or ``<|im_end|>``; the EOS token for
  ``reference``). IFT / DPO completions have no steering token.

Length policy: prompts are truncated from the left to ``max_prompt_length``, completions to
``max_length - len(prompt)`` (``max_prompt_length < max_length``, so the steering token is never
lost).

Batch arrays (numpy, right-padded to a length L from ``bucket_lengths``):

  input_ids [B, L] int32, attention_mask [B, L] int32 (1 = token, 0 = pad),
  labels [B, L] int32 (labels[:, t] = input_ids[:, t + 1]; pad id where there is none),
  label_mask [B, L] float32 (1 where labels[:, t] is a completion token: steering token, answer,
    end of turn), steering_position [B] int32 (= index of the last prompt token, whose logits
    predict the steering token), category [B] int32, target [B, K] float32, desirable [B] int32.
  KTO adds kl_input_ids, kl_attention_mask, kl_labels, kl_label_mask: row i = prompt of row i with
    the completion of row (i + 1) mod B. KTO rows are laid out as [desirable_0..desirable_{P-1},
    undesirable_0..undesirable_{P-1}] (row j and row j + P are a pair), B = 2P.
  DPO: chosen_* and rejected_* versions of input_ids, attention_mask, labels, label_mask, plus
    category and target.

Packed KTO batches (``collate(..., layout="packed")``): one row per pair, [prompt | desirable |
undesirable | mismatched of the desirable row | mismatched of the undesirable row], so the shared
prompt is computed once for four sequences; keys in ``pack_shared_prefix`` (labels in two groups:
the targets, then the mismatched pairs), plus target [P, K] and category [P]. Packed DPO batches: one
row per record, [prompt | chosen | rejected], labels in one group.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping, Sequence

import numpy as np

from distfair_jax.data.attributes import AttributeSpec
from distfair_jax.errors import InputError

PROMPT_FORMATS = ("chat", "reference")
_PROBE_QUESTION = "A person is randomly selected. What is this person's category?"


def bucket_lengths(max_length: int, smallest: int = 32) -> tuple[int, ...]:
  """Padded lengths: powers of two from ``smallest`` below ``max_length``, then ``max_length``."""
  out, n = [], smallest
  while n < max_length:
    out.append(n)
    n *= 2
  return tuple(out) + (max_length,)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= length."""
  for b in buckets:
    if length <= b:
      return b
  raise InputError(f"batch: length: expected at most {buckets[-1]} tokens, got {length}")


def _name(tokenizer) -> str:
  return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


_LOCK = threading.Lock()  # HF tokenizers may mutate their backend per call: one call at a time


def _ids(tokenizer, text: str, special: bool = False) -> list[int]:
  with _LOCK:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


class Encoder:
  """Turns records into token ids for one tokenizer; checks the chat template once.

  Args:
    tokenizer: a Hugging Face tokenizer (with a chat template for ``prompt_format="chat"``).
    attribute: when given, its steering tokens are checked up front (``steering_ids``: [K]).
    prompt_format: "chat" (default) or "reference" (``<Q>{question}<A>``, no template).
    max_length, max_prompt_length: the length policy (see the module docstring).
  """

  def __init__(self, tokenizer, *, attribute: AttributeSpec | None = None,
               prompt_format: str = "chat", max_length: int = 1024,
               max_prompt_length: int = 512):
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
    self.name = _name(tokenizer)
    pad = tokenizer.pad_token_id
    if pad is None:
      pad = tokenizer.eos_token_id
    if pad is None:
      raise InputError(f"tokenizer {self.name}: pad_token: expected a pad or eos token, got none")
    self.pad_id = int(pad)
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
      raise InputError(f"tokenizer {self.name}: chat_template: expected a chat template for "
                       f"prompt_format 'chat', got none (use prompt_format 'reference')")
    self.end_ids = self._end_of_turn_ids()
    self._prompt_cache: dict[str, list[int]] = {}
    self._text_cache: dict[str, list[int]] = {}
    self._steer_cache: dict[str, int] = {}
    self.steering_ids = None
    if attribute is not None:
      self.steering_ids = np.asarray(
          [self.steering_id(c.steering_token, c.answer) for c in attribute.categories], np.int32)

  # -- text rendering --------------------------------------------------------------------------

  def prompt_text(self, prompt: str) -> str:
    if self.prompt_format == "reference":
      return f"<Q>{prompt}<A>"
    return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                              add_generation_prompt=True, tokenize=False)

  def _full_text(self, prompt: str, content: str) -> str:
    if self.prompt_format == "reference":
      return f"<Q>{prompt}<A>{content}"
    return self.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": content}],
        tokenize=False)

  def _end_of_turn_ids(self) -> list[int]:
    eos = self.tokenizer.eos_token_id
    if self.prompt_format == "reference":
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
    special = self.prompt_format == "reference"
    prompt = _ids(self.tokenizer, self.prompt_text(_PROBE_QUESTION), special)
    full = _ids(self.tokenizer, self._full_text(_PROBE_QUESTION, token + answer), special)
    if full[:len(prompt)] != prompt or len(full) <= len(prompt) or full[len(prompt)] != ids[0]:
      got = (full[len(prompt):len(prompt) + 2] if full[:len(prompt)] == prompt
             else "a changed prompt")
      raise InputError(f"tokenizer {self.name}: steering_token: expected {token!r} (id {ids[0]}) "
                       f"to be the first assistant token after the generation prompt, got {got} "
                       f"(the tokenizer merges it with its neighbours)")
    self._steer_cache[token] = ids[0]
    return ids[0]

  def prompt_ids(self, prompt: str) -> list[int]:
    """Prompt ids, truncated from the left to ``max_prompt_length``."""
    ids = self._prompt_cache.get(prompt)
    if ids is None:
      ids = _ids(self.tokenizer, self.prompt_text(prompt), self.prompt_format == "reference")
      ids = ids[-self.max_prompt_length:]
      self._prompt_cache[prompt] = ids
    return ids

  def completion_ids(self, response: str, steering_token: str | None = None) -> list[int]:
    """[steering id] + answer ids + end-of-turn ids (untruncated)."""
    ids = self._text_cache.get(response)
    if ids is None:
      ids = _ids(self.tokenizer, response) if response else []
      self._text_cache[response] = ids
    head = [] if steering_token is None else [self.steering_id(steering_token)]
    return head + ids + self.end_ids

  def encode_record(self, rec: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """One record -> {"prompt": ids, "completion": ids (or "chosen"/"rejected"), "category",
    "target", "desirable"}; completions are not yet truncated (see ``fit``)."""
    out = {"prompt": self.prompt_ids(rec["prompt"]), "category": int(rec["category"]),
           "target": np.asarray(rec["target"], np.float32)}
    if kind in ("sft", "kto"):
      out["completion"] = self.completion_ids(rec["response"], rec["steering_token"])
      out["desirable"] = int(rec.get("status", "desirable") == "desirable")
    elif kind == "ift":
      out["completion"] = self.completion_ids(rec["response"])
      out["desirable"] = 1
    elif kind == "dpo":
      out["chosen"] = self.completion_ids(rec["chosen"])
      out["rejected"] = self.completion_ids(rec["rejected"])
    else:
      raise InputError(f"tokenize: kind: expected one of sft, kto, ift, dpo, got {kind!r}")
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
# Padding into arrays


def pack_sequences(prompts: Sequence[list[int]], completions: Sequence[list[int]], length: int,
                   pad_id: int) -> dict[str, np.ndarray]:
  """Right-padded arrays for prompt + completion pairs.

  Returns input_ids, attention_mask, labels [B, L] int32, label_mask [B, L] float32,
  steering_position [B] int32 (see the module docstring), L = ``length``.
  """
  b = len(prompts)
  input_ids = np.full((b, length), pad_id, np.int32)
  attention_mask = np.zeros((b, length), np.int32)
  labels = np.full((b, length), pad_id, np.int32)
  label_mask = np.zeros((b, length), np.float32)
  steering_position = np.zeros((b,), np.int32)
  for i, (p, c) in enumerate(zip(prompts, completions)):
    seq = list(p) + list(c)
    n = len(seq)
    if n > length:
      raise InputError(f"batch: length: expected at most {length} tokens, got {n}")
    input_ids[i, :n] = seq
    attention_mask[i, :n] = 1
    labels[i, :n - 1] = seq[1:]
    label_mask[i, len(p) - 1:n - 1] = 1.0
    steering_position[i] = len(p) - 1
  return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
          "label_mask": label_mask, "steering_position": steering_position}


def pack_shared_prefix(prompts: Sequence[list[int]], branches: Sequence[Sequence[list[int]]],
                       length: int, label_length: int, pad_id: int,
                       groups: Sequence[Sequence[int]] | None = None) -> dict[str, np.ndarray]:
  """One row per prompt: [prompt | branch_0 | ... | branch_{C-1} | pad] (shared-prefix packing).

  Every branch is a completion of the row's prompt; the model sees each one as the sequence
  prompt + branch (``Llama.__call__`` with ``segment_ids`` and ``positions``), so the prompt is
  computed once for C sequences. The labels (every completion token, as in ``pack_sequences``) are
  laid out in G groups of branches (``groups``, default one group of all C branches), so that a
  caller can treat one group differently (e.g. without gradient). Returns (R rows, T = ``length``,
  N = ``label_length``):

    packed_input_ids [R, T] int32 (pad id in padding),
    packed_positions [R, T] int32 (prompt 0..p-1; each branch continues from p),
    packed_segment_ids [R, T] int32 (0 pad, 1 prompt, 2 + c for branch c),
    label_source [R, G, N] int32 (index in the row of the hidden state that predicts each label:
      the previous token of the branch, or the last prompt token for a branch's first token),
    label_ids [R, G, N] int32 (the completion tokens, pad id in padding),
    label_branch [R, G, N] int32 (the branch c of each label, -1 in padding),
    steering_position [R] int32 (p - 1, whose logits predict every branch's first token).
  """
  r = len(prompts)
  groups = [list(g) for g in (groups or [range(len(branches[0]) if branches else 0)])]
  g_n = len(groups)
  out = {"packed_input_ids": np.full((r, length), pad_id, np.int32),
         "packed_positions": np.zeros((r, length), np.int32),
         "packed_segment_ids": np.zeros((r, length), np.int32),
         "label_source": np.zeros((r, g_n, label_length), np.int32),
         "label_ids": np.full((r, g_n, label_length), pad_id, np.int32),
         "label_branch": np.full((r, g_n, label_length), -1, np.int32),
         "steering_position": np.zeros((r,), np.int32)}
  for i, (p, comps) in enumerate(zip(prompts, branches)):
    n_tokens = len(p) + sum(len(c) for c in comps)
    n_labels = max(sum(len(comps[c]) for c in g) for g in groups)
    if n_tokens > length or n_labels > label_length:
      raise InputError(f"batch: length: expected a packed row of at most {length} tokens and "
                       f"{label_length} labels per group, got {n_tokens} and {n_labels}")
    n_p = len(p)
    out["packed_input_ids"][i, :n_p] = p
    out["packed_positions"][i, :n_p] = np.arange(n_p)
    out["packed_segment_ids"][i, :n_p] = 1
    out["steering_position"][i] = n_p - 1
    starts, at = [], n_p
    for c, comp in enumerate(comps):
      n = len(comp)
      starts.append(at)
      out["packed_input_ids"][i, at:at + n] = comp
      out["packed_positions"][i, at:at + n] = np.arange(n_p, n_p + n)
      out["packed_segment_ids"][i, at:at + n] = 2 + c
      at += n
    for g, members in enumerate(groups):
      lab = 0
      for c in members:
        comp, at = comps[c], starts[c]
        n = len(comp)
        if not n:
          continue
        out["label_source"][i, g, lab:lab + n] = [n_p - 1] + list(range(at, at + n - 1))
        out["label_ids"][i, g, lab:lab + n] = comp
        out["label_branch"][i, g, lab:lab + n] = c
        lab += n
  return out


def rotate(items: Sequence[Any], shift: int = 1) -> list[Any]:
  """items[(i + shift) mod n] at position i (the KTO mismatched completions: shift 1)."""
  n = len(items)
  return [items[(i + shift) % n] for i in range(n)]


def packed_bucket(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= n, or above the largest bucket the next multiple of it (a packed row may
  be longer than ``max_length``: it holds several sequences that share their prompt)."""
  if n <= buckets[-1]:
    return bucket_for(n, buckets)
  return -(-n // buckets[-1]) * buckets[-1]


def collate(examples: Sequence[Any], kind: str, encoder: Encoder,
            buckets: Sequence[int] | None = None, layout: str = "rows") -> dict[str, np.ndarray]:
  """Pads encoded examples (``Encoder.encode_record``) into one batch of ``kind``.

  For ``kto`` the examples are (desirable, undesirable) pairs; the batch has B = 2 * pairs rows
  laid out [desirables; undesirables] plus the mismatched ``kl_*`` arrays (B >= 2). The padded
  length L is the smallest bucket that fits every row (also the kl / chosen / rejected rows).

  ``layout="packed"`` (kto) packs the same four sequences of each pair into one row sharing
  the prompt (``pack_shared_prefix``): branches (desirable_i, undesirable_i, mismatched row i,
  mismatched row P + i), plus ``target [P, K]`` and ``category [P]`` of the desirable example;
  (dpo) one row per record, branches (chosen, rejected) in one label group, plus category and target.
  """
  if layout not in ("rows", "packed"):
    raise InputError(f"batch: layout: expected rows or packed, got {layout!r}")
  if layout == "packed" and kind not in ("kto", "dpo"):
    raise InputError(f"batch: layout: expected rows for {kind} batches (packed is for kto and "
                     f"dpo), got packed")
  if not examples:
    raise InputError("batch: size: expected at least one example, got none")
  buckets = tuple(buckets or bucket_lengths(encoder.max_length))
  fit, pad = encoder.fit, encoder.pad_id
  if kind == "kto":
    rows = [pair[0] for pair in examples] + [pair[1] for pair in examples]
    if len(rows) < 2:
      raise InputError("batch: size: expected at least 2 rows for KTO mismatched pairs, got 1")
  else:
    rows = list(examples)
  prompts = [r["prompt"] for r in rows]
  meta = {"category": np.asarray([r["category"] for r in rows], np.int32),
          "target": np.stack([r["target"] for r in rows]).astype(np.float32)}
  if kind == "dpo":
    chosen = [fit(p, r["chosen"]) for p, r in zip(prompts, rows)]
    rejected = [fit(p, r["rejected"]) for p, r in zip(prompts, rows)]
    if layout == "packed":  # one row per record: [prompt | chosen | rejected]
      n_tokens = max(len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected))
      n_labels = max(len(c) + len(r) for c, r in zip(chosen, rejected))
      out = pack_shared_prefix(prompts, list(zip(chosen, rejected)),
                               packed_bucket(n_tokens, buckets),
                               packed_bucket(n_labels, bucket_lengths(buckets[-1], smallest=16)),
                               pad, groups=((0, 1),))
      return {**out, **meta}
    length = bucket_for(max(len(p) + max(len(c), len(r)) for p, c, r in
                            zip(prompts, chosen, rejected)), buckets)
    out = {}
    for name, comps in (("chosen", chosen), ("rejected", rejected)):
      arrays = pack_sequences(prompts, comps, length, pad)
      arrays.pop("steering_position")
      out.update({f"{name}_{k}": v for k, v in arrays.items()})
    return {**out, **meta}
  completions = [fit(p, r["completion"]) for p, r in zip(prompts, rows)]
  lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
  kl_completions = None
  if kind == "kto":
    kl_completions = [fit(p, r["completion"]) for p, r in zip(prompts, rotate(rows))]
    lengths += [len(p) + len(c) for p, c in zip(prompts, kl_completions)]
  if layout == "packed":
    return _collate_packed(prompts, completions, kl_completions, meta, buckets, pad)
  length = bucket_for(max(lengths), buckets)
  out = pack_sequences(prompts, completions, length, pad)
  out.update(meta)
  out["desirable"] = np.asarray([r["desirable"] for r in rows], np.int32)
  if kl_completions is not None:
    kl = pack_sequences(prompts, kl_completions, length, pad)
    kl.pop("steering_position")
    out.update({f"kl_{k}": v for k, v in kl.items()})
  return out


# Branches of a packed KTO row and their label groups: targets (with gradient), mismatched (without).
KTO_PACKED_BRANCHES = ("desirable", "undesirable", "mismatched_of_desirable", "mismatched_of_undesirable")
KTO_PACKED_GROUPS = ((0, 1), (2, 3))


def _collate_packed(prompts, completions, kl_completions, meta, buckets, pad) -> dict[str, np.ndarray]:
  """The KTO batch in the shared-prefix layout (see ``collate``); rows j and j + P share a prompt."""
  p = len(prompts) // 2
  branches = [(completions[i], completions[p + i], kl_completions[i], kl_completions[p + i])
              for i in range(p)]
  n_tokens = max(len(prompts[i]) + sum(len(c) for c in b) for i, b in enumerate(branches))
  n_labels = max(max(len(b[0]) + len(b[1]), len(b[2]) + len(b[3])) for b in branches)
  out = pack_shared_prefix(prompts[:p], branches, packed_bucket(n_tokens, buckets),
                           packed_bucket(n_labels, bucket_lengths(buckets[-1], smallest=16)), pad,
                           groups=KTO_PACKED_GROUPS)
  out["target"] = meta["target"][:p]
  out["category"] = meta["category"][:p]
  return out


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


def tokenize_batch(records: Sequence[Mapping[str, Any]], tokenizer, kind: str, *,
                   encoder: Encoder | None = None, layout: str = "rows",
                   **encoder_kwargs) -> dict[str, np.ndarray]:
  """One padded batch from records (KTO: in file order, desirable then undesirable per pair)."""
  encoder = encoder or Encoder(tokenizer, **encoder_kwargs)
  if kind == "kto":
    examples = [(encoder.encode_record(d, kind), encoder.encode_record(u, kind))
                for d, u in pair_records(records)]
  else:
    examples = [encoder.encode_record(r, kind) for r in records]
  return collate(examples, kind, encoder, layout=layout)
