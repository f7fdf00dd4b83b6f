"""Build, validate and tokenize datasets: `distfair data build|validate|tokenizer`.

  distfair data build gender_real_us --out data/gender_real_us [--overwrite]
  distfair data build my_attribute.yaml --out data/mine --rows-per-occupation 100 --seed 0
  distfair data validate data/gender_real_us            # a dataset directory or one JSONL file
  distfair data validate my_sft.jsonl --kind sft --tokenizer ~/models/Llama-3.2-1B-Instruct
  distfair data tokenizer --out runs/tiny_tokenizer     # the tiny offline tokenizer

Built-in datasets: gender_real_uk, gender_real_us, gender_even_uk, gender_even_us, race_even_us,
sentiment_even_us. Bad input exits with code 2 and a one-line message; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os

from distfair_jax.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
  sub.required = True
  b = sub.add_parser("build", help="build a dataset's JSONL files and manifest")
  b.add_argument("dataset", help="a built-in dataset name or a YAML spec file")
  b.add_argument("--out", required=True, help="output directory (must be new or empty)")
  b.add_argument("--rows-per-occupation", type=int, default=100)
  b.add_argument("--stories-per-occupation", type=int, default=0,
                 help="extra story rows per occupation (v3-style training)")
  b.add_argument("--pair-stories-per-occupation", type=int, default=None,
                 help="how many of the story rows also become kto / dpo pairs (default: all)")
  b.add_argument("--test-rounds", type=int, default=100)
  b.add_argument("--seed", type=int, default=0)
  b.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
  v = sub.add_parser("validate", help="check a dataset directory or a JSONL file of records")
  v.add_argument("path")
  v.add_argument("--kind", choices=["sft", "kto", "ift", "dpo", "test"],
                 help="record kind (default: from the file name)")
  v.add_argument("--dataset", help="also check against this dataset (name or YAML spec)")
  v.add_argument("--tokenizer", help="also check the steering tokens for this tokenizer directory")
  v.add_argument("--prompt-format", choices=["chat", "reference"], default="chat")
  t = sub.add_parser("tokenizer", help="build the tiny offline tokenizer")
  t.add_argument("--out", required=True)
  t.add_argument("--vocab-size", type=int, default=2048)
  t.add_argument("--seed", type=int, default=0)
  t.add_argument("--overwrite", action="store_true")


def _check_tokens(records: dict[str, list[dict]], paths: dict[str, str], tokenizer_dir: str,
                  prompt_format: str, spec=None) -> None:
  """The steering tokens of the records (and of ``spec``'s attribute) for this tokenizer: each one
  in-vocabulary token, first after the generation prompt, and distinct across categories."""
  from distfair_jax.data import tokenize  # pylint: disable=g-import-not-at-top
  from distfair_jax.data.tokenizer import load_tokenizer_dir  # pylint: disable=g-import-not-at-top
  tok = load_tokenizer_dir(tokenizer_dir)
  encoder = tokenize.Encoder(tok, prompt_format=prompt_format)
  owner: dict[int, tuple[str, str]] = {}  # id -> (token, where)

  def check(token: str, where: str) -> None:
    try:
      i = encoder.steering_id(token)
    except InputError as e:
      raise InputError(f"{where}: {e}") from None
    if i in owner and owner[i][0] != token:
      raise InputError(f"{where}: tokenizer {encoder.name}: steering_token: expected distinct "
                       f"tokens, got {token!r} and {owner[i][0]!r} ({owner[i][1]}) both id {i}")
    owner.setdefault(i, (token, where))

  if spec is not None:
    for k, token in enumerate(spec.attribute.steering_tokens):
      check(token, f"{spec.source}: attribute.categories[{k}]")
  for kind, recs in records.items():
    for i, rec in enumerate(recs):
      if "steering_token" in rec:
        check(rec["steering_token"], f"{paths[kind]}: record {i + 1}")


def run(args: argparse.Namespace) -> int:
  from distfair_jax.data import build  # pylint: disable=g-import-not-at-top
  if args.data_command == "build":
    ds = build.build_dataset(args.dataset, args.out, rows_per_occupation=args.rows_per_occupation,
                             test_rounds=args.test_rounds, seed=args.seed,
                             stories_per_occupation=args.stories_per_occupation,
                             pair_stories_per_occupation=args.pair_stories_per_occupation,
                             overwrite=args.overwrite)
    counts = ", ".join(f"{k} {n}" for k, n in ds.manifest["counts"].items())
    print(f"wrote {ds.spec.name} to {args.out}: {counts}")
    return 0
  if args.data_command == "validate":
    spec = build.resolve_spec(args.dataset) if args.dataset else None
    if os.path.isdir(args.path):
      records = build.read_dataset(args.path)
      with open(os.path.join(args.path, "manifest.json"), encoding="utf-8") as f:
        files = json.load(f)["files"]
      paths = {k: os.path.join(args.path, v) for k, v in files.items()}
      if spec is not None:
        for kind, recs in records.items():
          build.validate_records(recs, "test" if kind.startswith("test") else kind,
                                 source=paths[kind], spec=spec)
    else:
      records = {"file": build.read_jsonl(args.path, args.kind, spec=spec)}
      paths = {"file": args.path}
    if args.tokenizer:
      _check_tokens(records, paths, args.tokenizer, args.prompt_format, spec)
    total = sum(len(r) for r in records.values())
    print(f"{args.path}: ok ({total} records in {len(records)} file(s))")
    return 0
  if args.data_command == "tokenizer":
    from distfair_jax.data.tokenizer import build_tiny_tokenizer  # pylint: disable=g-import-not-at-top
    tok = build_tiny_tokenizer(args.out, vocab_size=args.vocab_size, seed=args.seed,
                               overwrite=args.overwrite)
    print(f"wrote a {len(tok)}-token tokenizer to {args.out}")
    return 0
  raise InputError(f"data: action: expected build, validate or tokenizer, "
                   f"got {args.data_command!r}")
