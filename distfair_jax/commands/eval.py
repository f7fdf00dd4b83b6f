"""Evaluate a model: many rounds per occupation and test version, parsed, judged and scored.

  distfair eval runs/gender_real_uk                                   # the run's eval: settings
  distfair eval runs/gender_real_uk versions=[v2] rounds=50 decode.temperature=0.7
  distfair eval ckpt/llama1b dataset=gender_real_us steering=none --out runs/zero_shot
  distfair eval runs/x judge.kind=openai judge.url=http://localhost:8000/v1 judge.model=Qwen2.5-72B

MODEL is a training run directory (config.yaml; the last finished stage is evaluated, or --stage) or
a converted model directory (`distfair convert hf-to-flax`; needs dataset=...). KEY=VALUE overrides
set fields of the evaluation config (configs/base.yaml, section eval: versions, rounds, steering
model|target|none, prompt_engineering, dataset, decode.*, judge.*, batch_size, seed, n_bootstrap,
plots, dtype, system_prompt, chat_template_kwargs); a run starts from its own eval: section, a
converted model from the defaults. Prompts are rendered with the run's data.system_prompt and
data.chat_template_kwargs (a converted model: the template's default; set them with
system_prompt=none 'chat_template_kwargs={date_string: "26 Jul 2024"}'), as in training. Writes
OUT/eval/<version>.jsonl (one row per sample), OUT/eval/metrics.json, OUT/eval/report.md and plots;
OUT defaults to MODEL. One decoding configuration is used for every version and recorded in
metrics.json.
"""

from __future__ import annotations

import argparse

DISTRIBUTED = True  # runs as every process of a multi-host job (cli.main starts jax.distributed)
import os

from distfair_jax.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("model", metavar="MODEL",
                      help="training run directory, or converted model directory")
  parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                      help="evaluation settings, e.g. rounds=50 versions=[v1,v2] steering=none")
  parser.add_argument("--stage", default=None,
                      help="run directory: which finished stage (default: the last one)")
  parser.add_argument("--out", default=None, help="write OUT/eval (default: MODEL)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT/eval")


def _load(path: str, stage: str | None, overrides, mesh):
  """-> (model, tokenizer, dataset name or None, prompt settings, EvalConfig, facts for meta)."""
  from distfair_jax import fileio
  from distfair_jax.config import load_eval_config
  from distfair_jax.data.build import dataset_of
  from distfair_jax.data.chat import PromptSpec
  from distfair_jax.train.rundir import model_dir_kind, open_model_dir
  p = fileio.as_path(path)
  if model_dir_kind(p) == "run":
    opened = open_model_dir(p, stage, mesh=mesh)
    cfg = opened.config
    config = load_eval_config(cfg.eval, overrides)
    return (opened.model, opened.tokenizer, dataset_of(cfg.data), PromptSpec.of(cfg.data),
            config, {"model": str(p), "kind": "run", "stage": opened.stage})
  config = load_eval_config(None, overrides)
  opened = open_model_dir(p, mesh=mesh, dtype=config.dtype and str(config.dtype))
  model, tokenizer = opened.model, opened.tokenizer
  # A base model (e.g. gemma-3-270m) has no chat template: the original's <Q>..<A> wrapping.
  chat = tokenizer is None or getattr(tokenizer, "chat_template", None)
  prompt = PromptSpec() if chat else PromptSpec(prompt_format="reference")
  return model, tokenizer, None, prompt, config, {"model": str(p), "kind": "converted"}


def _judge(config):
  from distfair_jax.evaluation.judges import make_judge
  j = config.judge
  if "v3" not in [str(v) for v in config.versions]:
    return None
  if j.kind == "rules":
    return make_judge("rules")
  return make_judge("openai", base_url=j.url, model=j.model,
                    api_key=os.environ.get(j.api_key_env) or None, timeout=j.timeout,
                    workers=j.workers)


def run(args: argparse.Namespace) -> int:
  from distfair_jax import console, fileio
  from distfair_jax import sharding as shd
  from distfair_jax.data.build import build_dataset
  from distfair_jax.evaluation.evaluate import evaluate
  out = args.out or args.model
  fileio.check_new_dir(fileio.as_path(out) / "eval", args.overwrite, "eval")
  mesh = shd.make_mesh({"data": -1})  # data parallel over every device; the weights replicated
  model, tokenizer, run_dataset, prompt, config, meta = _load(args.model, args.stage,
                                                             args.overrides, mesh)
  dataset_name = config.dataset or run_dataset
  if dataset_name is None:
    raise InputError(f"{args.model}: dataset: expected dataset=NAME for a converted model "
                     f"directory, got none")
  judge = _judge(config)
  dataset = build_dataset(dataset_name, test_rounds=config.rounds or 100)
  test_sets = {str(v): dataset[f"test_{v}"] for v in config.versions}
  meta["dataset"] = dataset.spec.name
  if judge is not None and config.judge.kind == "openai":
    meta["judge_url"], meta["judge_model"] = config.judge.url, config.judge.model
  evaluate(model, tokenizer, dataset.spec.attribute, test_sets, out, config=config,
           prompt_format=prompt.prompt_format, system_prompt=prompt.system_prompt,
           chat_template_kwargs=prompt.template_kwargs, max_prompt_length=prompt.max_prompt_length,
           steering_placement=prompt.steering_placement,
           judge=judge if console.is_main_process() else None,
           overwrite=args.overwrite, metadata=meta, progress=console.log, mesh=mesh)
  if console.is_main_process():
    print(fileio.as_path(out) / "eval" / "metrics.json")
  return 0
