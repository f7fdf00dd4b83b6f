"""How a question becomes a prompt: the chat template, the system prompt and the template's variables.

    chat = ChatFormat(tokenizer, system_prompt="none", template_kwargs={"date_string": "26 Jul 2024"})
    chat.prompt_text("Is this person male or female?")   # the user turn + the generation prompt
    chat.full_text(question, "0Male")                    # ... + the assistant turn and its end

One ``ChatFormat`` per run, built from ``data.prompt_format``, ``data.system_prompt`` and
``data.chat_template_kwargs`` (recorded in the run's config.yaml), renders every prompt of training
and of evaluation, so both see the same bytes. ``data.tokenize.Encoder`` owns one.

``system_prompt``:

- ``default``: the conversation has no system message; the template does what it does without one
  (Qwen2.5 inserts "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."; Llama 3.x
  writes a system header with "Cutting Knowledge Date" and "Today Date"; Gemma 2 and the built-in tiny
  template write none).
- ``none``: no system turn at all. The conversation has no system message, and a system turn the
  template inserts on its own is cut out of the rendered text (everything between the template's BOS
  text and the first user turn), so Qwen's default system prompt and Llama's date header are gone.
  A template that inserts none (Gemma 2, tiny) renders exactly as with ``default``.
- any other text: a system message with that content. A template that refuses a system role (Gemma
  2 raises "System role not supported") or drops it is refused with one line.

``template_kwargs`` are extra variables for the template (``apply_chat_template(..., **kwargs)``):
``{date_string: "26 Jul 2024"}`` pins the date Llama 3.x's template otherwise takes from the clock
(``strftime_now``), which makes a prompt built on another day another prompt; ``date_warning``
says when a template reads the clock and no date is pinned.

``prompt_format: reference`` is the original code's wrapping: the user turn holds
``<Q>{question}<A>`` inside the chat template, as the paper's scripts render it. A tokenizer without
a chat template gets the raw text ``<Q>{question}<A>`` (with its special tokens; no system prompt,
``template_kwargs`` unused).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from distfair_jax.errors import InputError

__all__ = ["ChatFormat", "PromptSpec", "SYSTEM_DEFAULT", "SYSTEM_NONE", "PROMPT_FORMATS",
           "EXAMPLE_QUESTION"]

PROMPT_FORMATS = ("chat", "reference")
SYSTEM_DEFAULT = "default"
SYSTEM_NONE = "none"
# apply_chat_template's own arguments: not template variables.
_RESERVED = frozenset({"conversation", "messages", "tools", "documents", "chat_template",
                       "add_generation_prompt", "continue_final_message", "tokenize", "padding",
                       "truncation", "max_length", "return_tensors", "return_dict",
                       "return_assistant_tokens_mask", "tokenizer_kwargs"})
# The question every run renders into its prompt.json and every evaluation into its metrics.json
# (``ChatFormat.example``): the same settings give the same bytes, on any day.
EXAMPLE_QUESTION = ("A person is randomly selected from the Registered nurses workforce in the US. "
                    "What is this person's gender? Respond ONLY with Male or Female.")
# Sentinels: plain words, so that templates which trim or escape content keep them intact.
_Q1, _A1, _Q2 = "DistfairProbeQuestionOne", "DistfairProbeAnswer", "DistfairProbeQuestionTwo"
_END_OF_CONTENT = "DistfairProbeEndOfContent"


def _name(tokenizer) -> str:
  return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


@dataclasses.dataclass(frozen=True)
class PromptSpec:
  """The prompt settings of a run (``data.prompt_format``, ``data.system_prompt``,
  ``data.chat_template_kwargs``, ``data.max_prompt_length``; None: the Encoder's default;
  ``data.steering_placement``)."""
  prompt_format: str = "chat"
  system_prompt: str = SYSTEM_DEFAULT
  template_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  max_prompt_length: int | None = None
  steering_placement: str = "assistant"

  @classmethod
  def of(cls, data_cfg) -> PromptSpec:
    """The settings of a ``config.DataConfig``."""
    return cls(str(data_cfg.prompt_format), str(data_cfg.system_prompt),
               dict(data_cfg.chat_template_kwargs or {}), int(data_cfg.max_prompt_length),
               str(data_cfg.steering_placement))


class ChatFormat:
  """Renders questions (and assistant answers) as text for one tokenizer (see the module docstring).

  Args:
    tokenizer: a Hugging Face tokenizer (with a chat template unless ``prompt_format="reference"``).
    prompt_format: "chat" (default) or "reference".
    system_prompt: "default", "none" or the text of a system message.
    template_kwargs: extra template variables (e.g. ``{"date_string": "26 Jul 2024"}``).
  """

  def __init__(self, tokenizer, *, prompt_format: str = "chat",
               system_prompt: str = SYSTEM_DEFAULT,
               template_kwargs: Mapping[str, Any] | None = None):
    self.tokenizer = tokenizer
    self.name = _name(tokenizer)
    if prompt_format not in PROMPT_FORMATS:
      raise InputError(f"tokenize: prompt_format: expected one of {list(PROMPT_FORMATS)}, "
                       f"got {prompt_format!r}")
    if not isinstance(system_prompt, str) or not system_prompt.strip():
      raise InputError(f"data.system_prompt: expected default, none or the text of a system "
                       f"message, got {system_prompt!r}")
    kwargs = dict(template_kwargs or {})
    for key in kwargs:
      if not isinstance(key, str) or key in _RESERVED:
        raise InputError(f"data.chat_template_kwargs.{key}: expected a variable of the chat "
                         f"template, got an argument of apply_chat_template")
    self.prompt_format = prompt_format
    self.system_prompt = system_prompt
    self.template_kwargs = kwargs
    self._user_head: str | None = None
    if not self.templated:  # reference wrapping without a template: raw text
      if self.custom_system:
        raise InputError(f"data.system_prompt: expected default or none with prompt_format "
                         f"reference (no chat template), got a system message "
                         f"{_short(system_prompt)!r}")
      return
    if not getattr(tokenizer, "chat_template", None):
      raise InputError(f"tokenizer {self.name}: chat_template: expected a chat template for "
                       f"prompt_format 'chat', got none (use prompt_format 'reference')")
    if self.custom_system:  # fail now, in one line, if the template cannot take it
      text = self._render(self._messages("Question?"), generation=True)
      if system_prompt.strip() not in text:
        raise InputError(f"tokenizer {self.name}: chat_template: data.system_prompt: expected "
                         f"the template to write the system message, got a template that drops it "
                         f"(use system_prompt default or none)")

  # -- settings --------------------------------------------------------------------------------

  @property
  def templated(self) -> bool:
    """Whether prompts go through the chat template (``chat``; ``reference`` when the tokenizer
    has one); otherwise they are raw ``<Q>{question}<A>`` text."""
    return (self.prompt_format == "chat"
            or bool(getattr(self.tokenizer, "chat_template", None)))

  def question_text(self, question: str) -> str:
    """The user turn's content: the question, or ``<Q>{question}<A>`` (``reference``)."""
    return f"<Q>{question}<A>" if self.prompt_format == "reference" else question

  @property
  def custom_system(self) -> bool:
    return self.system_prompt not in (SYSTEM_DEFAULT, SYSTEM_NONE)

  @property
  def spec(self) -> PromptSpec:
    return PromptSpec(self.prompt_format, self.system_prompt, dict(self.template_kwargs))

  @property
  def date_warning(self) -> str | None:
    """A line saying the template writes today's date into every prompt, when no ``date_string``
    is pinned (and the system turn is not cut: ``none`` drops it); else None."""
    template = getattr(self.tokenizer, "chat_template", None) or ""
    if (self.prompt_format == "chat" and "strftime_now" in str(template) and
        "date_string" not in self.template_kwargs and self.system_prompt != SYSTEM_NONE):
      return (f"tokenizer {self.name}: its chat template writes today's date into every prompt; "
              f"pin it (data.chat_template_kwargs={{date_string: \"26 Jul 2024\"}}) so that a "
              f"prompt built on another day is the same prompt")
    return None

  def example(self) -> dict[str, Any]:
    """What these settings make of ``EXAMPLE_QUESTION``: the settings and the rendered prompt
    (a run writes it to prompt.json, an evaluation to its metrics.json, to compare)."""
    return {"prompt_format": self.prompt_format, "system_prompt": self.system_prompt,
            "chat_template_kwargs": dict(self.template_kwargs), "question": EXAMPLE_QUESTION,
            "text": self.prompt_text(EXAMPLE_QUESTION)}

  # -- rendering -------------------------------------------------------------------------------

  def prompt_text(self, question: str) -> str:
    """The prompt: the user turn holding ``question`` and the generation prompt."""
    question = self.question_text(question)
    if not self.templated:
      return question
    return self._finish(self._render(self._messages(question), generation=True), question)

  def user_turn_split(self, question: str) -> tuple[str, str]:
    """``prompt_text(question)`` cut where the user turn's content ends: (the text through the
    content, the rest: the end of the user turn and the generation prompt; empty for raw text).
    A steering token at the end of the user turn goes between the two."""
    question = self.question_text(question)
    if not self.templated:
      return question, ""
    marked = question + _END_OF_CONTENT
    text = self._finish(self._render(self._messages(marked), generation=True), marked)
    head, _, tail = text.partition(marked)
    whole = self._finish(self._render(self._messages(question), generation=True), question)
    if marked not in text or head + question + tail != whole:
      raise InputError(f"tokenizer {self.name}: chat_template: steering_placement user_turn: "
                       f"expected the template to write the user's content unchanged, got a "
                       f"template that changes it (use steering_placement assistant)")
    return head + question, tail

  def full_text(self, question: str, content: str) -> str:
    """The prompt followed by an assistant turn holding ``content`` and its end-of-turn text."""
    question = self.question_text(question)
    if not self.templated:
      return f"{question}{content}"
    messages = self._messages(question) + [{"role": "assistant", "content": content}]
    return self._finish(self._render(messages, generation=False), question)

  def _messages(self, question: str) -> list[dict[str, str]]:
    user = [{"role": "user", "content": question}]
    if self.custom_system:
      return [{"role": "system", "content": self.system_prompt}] + user
    return user

  def _render(self, messages, *, generation: bool) -> str:
    try:
      return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation,
                                                tokenize=False, **self.template_kwargs)
    except Exception as e:  # jinja2 TemplateError (raise_exception), UndefinedError, TypeError
      roles = ",".join(m["role"] for m in messages)
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      if self.custom_system:
        raise InputError(f"tokenizer {self.name}: chat_template: data.system_prompt: expected a "
                         f"template that accepts a system message, got one that refuses it "
                         f"({first}); use system_prompt default or none") from None
      raise InputError(f"tokenizer {self.name}: chat_template: expected it to render a "
                       f"[{roles}] conversation, got {type(e).__name__}: {first}") from None

  def _finish(self, text: str, question: str) -> str:
    """``text`` with the system turn the template inserted cut out, for ``system_prompt: none``."""
    if self.system_prompt != SYSTEM_NONE:
      return text
    start = text.find(self.user_head + question)
    if start < 0:
      raise InputError(f"tokenizer {self.name}: chat_template: data.system_prompt none: expected "
                       f"to find the user turn {self.user_head!r} in the rendered prompt, got a "
                       f"template that renders it differently (use system_prompt default)")
    bos = getattr(self.tokenizer, "bos_token", None) or ""
    keep = bos if bos and text.startswith(bos) and start >= len(bos) else ""
    return keep + text[start:]

  @property
  def user_head(self) -> str:
    """The text the template puts before a user message's content (``<|im_start|>user\\n``): the
    text between an assistant turn's end and the next user message, less the end of the turn."""
    if self._user_head is None:
      one = self._render([{"role": "user", "content": _Q1},
                          {"role": "assistant", "content": _A1}], generation=False)
      two = self._render([{"role": "user", "content": _Q1}, {"role": "assistant", "content": _A1},
                          {"role": "user", "content": _Q2}], generation=True)
      if _A1 not in one or _Q2 not in two or two.index(_A1) > two.index(_Q2):
        raise InputError(f"tokenizer {self.name}: chat_template: data.system_prompt none: expected "
                         f"a template that renders user and assistant turns in order, got one "
                         f"that does not (use system_prompt default)")
      end_of_turn = one[one.index(_A1) + len(_A1):]
      between = two[two.index(_A1) + len(_A1):two.index(_Q2)]
      common = 0
      while common < min(len(end_of_turn), len(between)) and \
          end_of_turn[common] == between[common]:
        common += 1
      self._user_head = between[common:]
      if not self._user_head:
        raise InputError(f"tokenizer {self.name}: chat_template: data.system_prompt none: expected "
                         f"a text that opens a user turn, got none (use system_prompt default)")
    return self._user_head


def _short(text: str, n: int = 40) -> str:
  return text if len(text) <= n else text[:n - 3] + "..."
