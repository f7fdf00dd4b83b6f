"""Tokenizers: the tiny default one, built offline, and a checked loader of Hugging Face directories.

    tok = build_tiny_tokenizer()                      # in memory (transformers tokenizer)
    tok = build_tiny_tokenizer("runs/demo/tokenizer") # also saved as a Hugging Face directory
    tok = load_tokenizer_dir("~/models/Llama-3.2-1B-Instruct")   # any local HF directory
    generation_eos_ids(tok)                           # its generation_config.json's eos ids, or None

``load_tokenizer_dir`` reads local files only, names a Git LFS pointer in place of any tokenizer file
(one line: "PATH: a Git LFS pointer, not the file"), and keeps the directory's
``generation_config.json`` ``eos_token_id`` (an id or a list: Llama 3.x lists ``<|eot_id|>`` and
``<|eom_id|>``) with the tokenizer, where ``data.tokenize.Encoder`` takes its stop tokens from.

Trained with the ``tokenizers`` library on the prompts, answers and stories of the six built-in
datasets (plus optional extra texts), so nothing is downloaded. Properties:

- byte-level BPE: any text encodes; vocabulary at most ``vocab_size`` (2048, the ``tiny`` preset's);
- every digit is its own pre-token (``Digits(individual_digits=True)``), so ``"0"``..``"9"`` are
  single tokens that never merge with neighbours (the steering tokens);
- Llama 3 special tokens: ``<|begin_of_text|>`` (BOS, added by the post-processor like Llama 3),
  ``<|end_of_text|>``, ``<|start_header_id|>``, ``<|end_header_id|>``, ``<|eot_id|>`` (EOS / end of
  turn) and ``<|finetune_right_pad_id|>`` (padding);
- a Llama 3 style chat template
  (``<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>``);
- deterministic: the same inputs give the same files, byte for byte.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

from distfair_jax import fileio
from distfair_jax.data import attributes, build
from distfair_jax.errors import InputError

BOS = "<|begin_of_text|>"
EOT_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PAD = "<|finetune_right_pad_id|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOT_TEXT, START_HEADER, END_HEADER, EOT, PAD)

# What transformers may read from a tokenizer directory (config.json: the model type, for some).
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json", "config.json")
GENERATION_CONFIG = "generation_config.json"
_EOS_ATTR = "distfair_generation_eos_ids"

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "(message['content'] | trim) + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}")


# Story cue words per built-in category (pronouns and titles, tone words): part of the corpus, after
# each category's answer and synonyms, so that they merge like the stories' words.
_CUE_WORDS = {
    ("gender", "male"): ("he", "him", "his", "himself", "mr"),
    ("gender", "female"): ("she", "her", "hers", "herself", "ms", "mrs"),
    ("race", "White"): ("white",),
    ("race", "Black or African American"): ("black", "african american"),
    ("race", "American Indian or Alaska Native"): ("american indian", "alaska native",
                                                   "native american"),
    ("race", "Asian"): ("asian",),
    ("race", "Native Hawaiian or Other Pacific Islander"): ("native hawaiian", "pacific islander"),
    ("sentiment", "positive"): ("happy", "hopeful", "optimistic", "glad", "enjoys", "proud",
                                "excited"),
    ("sentiment", "negative"): ("stressed", "worried", "tired", "anxious", "dreads", "frustrated",
                                "exhausted"),
    ("sentiment", "neutral"): ("indifferent", "routine", "ordinary", "unremarkable", "shrugs",
                               "usual"),
}


def training_texts(*, seed: int = 0, rows_per_occupation: int = 12,
                   stories_per_occupation: int = 12) -> list[str]:
  """The training corpus: prompts, answers, stories and test prompts of the six datasets."""
  texts: list[str] = []
  for name in build.DATASETS:
    ds = build.build_dataset(name, rows_per_occupation=rows_per_occupation, test_rounds=3,
                             seed=seed, stories_per_occupation=stories_per_occupation)
    for rec in ds["kto"]:
      texts += [rec["prompt"], rec["response"]]
    for v in build.TEST_VERSIONS:
      for rec in ds[f"test_{v}"]:
        texts += [rec["prompt"], rec["pe_prompt"]]
  for attr in attributes.BUILTIN_ATTRIBUTES.values():
    for c in attr.categories:
      texts += [c.answer, *c.synonyms, *_CUE_WORDS.get((attr.name, c.name), ())]
  texts += [f"<Q>{t}<A>" for t in texts[:50]]
  texts = list(dict.fromkeys(texts))  # dedupe, keep order
  # chat-template pieces around the special tokens, so that they merge like real text
  return texts + [f"{role}\n\n" for role in ("system", "user", "assistant") for _ in range(8)]


def dataset_texts(name_or_spec, *, seed: int = 0, rows_per_occupation: int = 12) -> list[str]:
  """Extra training texts for a dataset of your own (a ``data.build`` spec or its YAML path): its
  prompts, answers, synonyms and test prompts, so that the tiny tokenizer merges its words as it
  merges the built-in datasets' (``build_tiny_tokenizer(texts=dataset_texts(spec))``)."""
  ds = build.build_dataset(name_or_spec, rows_per_occupation=rows_per_occupation, test_rounds=3,
                           seed=seed, stories_per_occupation=rows_per_occupation)
  texts: list[str] = []
  for rec in ds["kto"]:
    texts += [rec["prompt"], rec["response"]]
  for v in build.TEST_VERSIONS:
    for rec in ds[f"test_{v}"]:
      texts += [rec["prompt"], rec["pe_prompt"]]
  for c in ds.spec.attribute.categories:
    texts += [c.answer, *c.synonyms] * 4
  return list(dict.fromkeys(texts)) + [c.answer for c in ds.spec.attribute.categories] * 8


def _train(texts: Sequence[str], vocab_size: int):
  # pylint: disable-next=g-import-not-at-top
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
  ])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  bos_id = tok.token_to_id(BOS)
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
  return tok


def build_tiny_tokenizer(out_dir: str | os.PathLike | None = None, *,
                         texts: Iterable[str] | None = None, vocab_size: int = 2048,
                         seed: int = 0, overwrite: bool = False):
  """Trains the tiny tokenizer; saves it to ``out_dir`` (a Hugging Face directory) when given.

  Args:
    out_dir: where to save (written to a temp dir, then renamed; an existing non-empty directory is
      refused unless ``overwrite``).
    texts: extra training texts, added to the built-in corpus.
    vocab_size: upper bound of the vocabulary (specials + 256 bytes + merges), 300..65536.
    seed: seed of the built-in corpus (datasets built with this seed).
  Returns:
    ``transformers.PreTrainedTokenizerFast`` with bos/eos/pad tokens and the chat template.
  """
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not (
      300 <= vocab_size <= 65536):
    raise InputError(f"tokenizer: vocab_size: expected an integer in [300, 65536], "
                     f"got {vocab_size!r}")
  if out_dir is not None:
    fileio.check_new_dir(out_dir, overwrite, "out")
  corpus = training_texts(seed=seed)
  if texts is not None:
    extra = list(texts)
    if not all(isinstance(t, str) for t in extra):
      raise InputError("tokenizer: texts: expected strings, got a non-string item")
    corpus += extra
  tok = _train(corpus, vocab_size)
  hf = PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=BOS, eos_token=EOT, pad_token=PAD,
      chat_template=CHAT_TEMPLATE, model_max_length=1 << 20, padding_side="right",
      clean_up_tokenization_spaces=False)
  if out_dir is not None:
    with fileio.atomic_dir(out_dir, overwrite=overwrite, what="out") as tmp:
      hf.save_pretrained(str(tmp))
  return hf


# ------------------------------------------------------------------------------------------------
# Loading Hugging Face tokenizer directories


def _eos_list(value: Any, where: str) -> list[int] | None:
  if value is None:
    return None
  values = value if isinstance(value, (list, tuple)) else [value]
  if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                           for v in values):
    raise InputError(f"{where}: eos_token_id: expected a token id or a list of token ids, "
                     f"got {value!r}")
  return [int(v) for v in values]


def read_generation_eos(path: str | os.PathLike) -> list[int] | None:
  """``eos_token_id`` of ``path/generation_config.json`` as a list (None without the file or the
  field)."""
  gen = fileio.as_path(path) / GENERATION_CONFIG
  if not gen.exists():
    return None
  data = fileio.read_json(gen, "a generation config (JSON object)")
  return _eos_list(data.get("eos_token_id"), str(gen))


def generation_eos_ids(tokenizer) -> list[int] | None:
  """The eos ids of the generation_config.json next to the tokenizer's files (None: none known)."""
  ids = getattr(tokenizer, _EOS_ATTR, None)
  return None if ids is None else list(ids)


def set_generation_eos_ids(tokenizer, ids: Sequence[int] | None) -> None:
  """Records generation eos ids with a tokenizer (what ``load_tokenizer_dir`` does)."""
  setattr(tokenizer, _EOS_ATTR, None if ids is None else tuple(int(i) for i in ids))


def load_tokenizer_dir(path: str | os.PathLike):
  """A transformers tokenizer from a local Hugging Face directory, checked (see the module
  docstring); InputError (one line) for no directory, a Git LFS pointer or an unreadable one."""
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  p = fileio.as_path(path)
  if not p.is_dir():
    raise InputError(f"{p}: tokenizer: expected a Hugging Face tokenizer directory, got "
                     f"{'a file' if p.exists() else 'no such directory'}")
  for name in TOKENIZER_FILES:
    fileio.check_not_lfs_pointer(p / name)
  if not any((p / name).exists() for name in TOKENIZER_FILES[:5]):
    raise InputError(f"{p}: tokenizer: expected tokenizer files ({', '.join(TOKENIZER_FILES[:4])}),"
                     f" got none")
  try:
    tok = AutoTokenizer.from_pretrained(os.fspath(p), local_files_only=True)
  except (OSError, ValueError, TypeError, KeyError) as e:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise InputError(f"{p}: tokenizer: expected a Hugging Face tokenizer, got "
                     f"{type(e).__name__}: {first}") from None
  set_generation_eos_ids(tok, read_generation_eos(p))
  return tok
