"""Evaluate a model: many rounds per occupation and test version, parsed, judged and scored.

  distfair eval runs/gender_real_uk --versions v1,v2,v3 --rounds 100 --steering model
  distfair eval ckpt/llama1b --dataset gender_real_us --steering none --out runs/zero_shot
  distfair eval runs/x --judge openai --judge-url http://localhost:8000/v1 --judge-model Qwen2.5-72B

MODEL is a training run directory (config.yaml; the last finished stage is evaluated, or --stage) or
a converted model directory (`distfair convert hf-to-flax`; needs --dataset). Writes OUT/eval/
<version>.jsonl (one row per sample), OUT/eval/metrics.json, OUT/eval/report.md and plots; OUT
defaults to MODEL. One decoding configuration (temperature, top-p, top-k, max new tokens) is used
for every version and recorded in metrics.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from distfair_jax.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("model", metavar="MODEL",
                      help="training run directory, or converted model directory")
  parser.add_argument("--dataset", default=None,
                      help="built-in dataset name or YAML spec (default: the run's own dataset)")
  parser.add_argument("--stage", default=None,
                      help="run directory: which finished stage (default: the last one)")
  parser.add_argument("--out", default=None, help="write OUT/eval (default: MODEL)")
  parser.add_argument("--versions", default="v1,v2,v3",
                      help="comma-separated test versions (default: %(default)s)")
  parser.add_argument("--rounds", type=int, default=100,
                      help="samples per occupation per version (default: %(default)s)")
  parser.add_argument("--steering", choices=("model", "target", "none"), default="model",
                      help="steering token from the model's own distribution, from the target, or "
                      "no steering token (baselines) (default: %(default)s)")
  parser.add_argument("--prompt-engineering", action="store_true",
                      help="use the prompt-engineering baseline's prompts (target stated in words)")
  g = parser.add_argument_group("decoding (one configuration for every method compared)")
  g.add_argument("--temperature", type=float, default=1.0, help="(default: %(default)s)")
  g.add_argument("--top-p", type=float, default=1.0, help="(default: %(default)s, off)")
  g.add_argument("--top-k", type=int, default=0, help="(default: %(default)s, off)")
  g.add_argument("--greedy", action="store_true", help="argmax decoding")
  g.add_argument("--max-new-tokens", type=int, default=16,
                 help="answer tokens for v1/v2, steering token not counted (default: %(default)s)")
  g.add_argument("--story-max-new-tokens", type=int, default=96,
                 help="story tokens for v3 (default: %(default)s)")
  g.add_argument("--batch-size", type=int, default=256,
                 help="rows decoded together (default: %(default)s)")
  g.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="converted model: compute/param dtype (default: as stored)")
  j = parser.add_argument_group("story judge (v3)")
  j.add_argument("--judge", choices=("rules", "openai"), default="rules",
                 help="rules: offline lexicons; openai: an OpenAI-compatible server (default: "
                 "%(default)s)")
  j.add_argument("--judge-url", default=None, help="e.g. http://localhost:8000/v1")
  j.add_argument("--judge-model", default=None, help="served model name")
  j.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                 help="environment variable holding the API key, if any (default: %(default)s)")
  j.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per request")
  j.add_argument("--judge-workers", type=int, default=8, help="concurrent requests")
  parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
  parser.add_argument("--n-bootstrap", type=int, default=1000,
                      help="bootstrap replicates for the 95%% intervals (default: %(default)s)")
  parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT/eval")


@dataclasses.dataclass
class LoadedModel:
  """What evaluation needs from MODEL: the model, its tokenizer and the dataset to test on."""
  model: Any
  tokenizer: Any
  dataset: str | None
  prompt_format: str
  info: dict[str, Any]


def load_for_eval(path: str, *, stage: str | None = None, dtype: str | None = None) -> LoadedModel:
  """A training run directory (config.yaml) or a converted model directory (model_config.json)."""
  if not os.path.isdir(path):
    raise InputError(f"{path}: model: expected a run or converted model directory, got "
                     f"{'a file' if os.path.exists(path) else 'no such directory'}")
  if os.path.exists(os.path.join(path, "config.yaml")):
    from distfair_jax.train.export import load_run
    model, tokenizer, _, cfg, stage = load_run(path, stage)
    return LoadedModel(model, tokenizer, cfg.data.spec or cfg.data.dataset, cfg.data.prompt_format,
                       {"model": os.path.abspath(path), "kind": "run", "stage": stage})
  if os.path.exists(os.path.join(path, "model_config.json")):
    from distfair_jax import convert
    model, tokenizer, _ = convert.load_pretrained(path, dtype=dtype)
    if tokenizer is None:
      raise InputError(f"{path}: tokenizer: expected tokenizer files in the model directory, "
                       f"got none")
    return LoadedModel(model, tokenizer, None, "chat",
                       {"model": os.path.abspath(path), "kind": "converted"})
  raise InputError(f"{path}: model: expected config.yaml (a run) or model_config.json (a converted "
                   f"model), got neither")


def _make_judge(args: argparse.Namespace):
  from distfair_jax.judges import make_judge
  if args.judge == "rules":
    return make_judge("rules")
  return make_judge("openai", base_url=args.judge_url, model=args.judge_model,
                    api_key=os.environ.get(args.judge_api_key_env) or None,
                    timeout=args.judge_timeout, workers=args.judge_workers)


def run(args: argparse.Namespace) -> int:
  from distfair_jax.data.build import build_dataset
  from distfair_jax.evaluate import EvalConfig, evaluate
  from distfair_jax.sample import DecodeConfig

  versions = tuple(v.strip() for v in args.versions.split(",") if v.strip())
  decode = DecodeConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        greedy=args.greedy, max_new_tokens=args.max_new_tokens,
                        story_max_new_tokens=args.story_max_new_tokens)
  judge = _make_judge(args) if "v3" in versions else None
  out = args.out or args.model
  if os.path.exists(os.path.join(out, "eval")) and not args.overwrite:
    raise InputError(f"{os.path.join(out, 'eval')}: eval: expected no existing evaluation (use "
                     f"--overwrite), got an existing directory")
  loaded = load_for_eval(args.model, stage=args.stage, dtype=args.dtype)
  dataset_name = args.dataset or loaded.dataset
  if dataset_name is None:
    raise InputError(f"{args.model}: dataset: expected --dataset for a converted model directory, "
                     f"got none")
  config = EvalConfig(versions=versions, rounds=args.rounds, steering=args.steering, decode=decode,
                      batch_size=args.batch_size, seed=args.seed, n_bootstrap=args.n_bootstrap,
                      prompt_field="pe_prompt" if args.prompt_engineering else "prompt",
                      prompt_format=loaded.prompt_format, plots=not args.no_plots)
  dataset = build_dataset(dataset_name, test_rounds=args.rounds)
  test_sets = {v: dataset[f"test_{v}"] for v in versions}
  meta = {**loaded.info, "dataset": dataset.spec.name}
  if judge is not None and args.judge == "openai":
    meta["judge_url"], meta["judge_model"] = args.judge_url, args.judge_model
  evaluate(loaded.model, loaded.tokenizer, dataset.spec.attribute, test_sets, out, config=config,
           judge=judge, overwrite=args.overwrite, metadata=meta,
           progress=lambda line: print(line, file=sys.stderr))
  print(os.path.join(out, "eval", "metrics.json"))
  return 0
