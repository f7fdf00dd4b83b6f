"""``run_demo``: the miniature benchmark over datasets and seeds, orchestration only: each dataset's
``Demo`` trains and evaluates, ``seeds`` averages, ``tables`` renders, ``write_results`` writes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Sequence

from distfair_jax import fileio
from distfair_jax.data.build import DATASETS, resolve_spec
from distfair_jax.data.tokenizer import build_tiny_tokenizer, dataset_texts
from distfair_jax.demo.dataset import Demo
from distfair_jax.demo.seeds import aggregate_seeds, aggregate_v2
from distfair_jax.demo.settings import DemoSettings, settings_for
from distfair_jax.demo.tables import (comparison_plot, headline_table, kl_table, results_table,
                                      seeds_table, sweep_table, timings_table)
from distfair_jax.errors import InputError
from distfair_jax.model.modeldir import load_model_config
from distfair_jax.train.rundir import CHECKPOINTS, FINAL, SUMMARY


def _tokenizer(run_dir: str, dataset: str) -> str:
  """The tiny tokenizer's directory for ``dataset``: one for the built-in datasets (trained on their
  texts), and for a spec of your own one of its own, trained on the built-in texts plus its
  prompts and answers (``tokenizer.dataset_texts``), so that its words merge as the built-in
  ones do."""
  texts = None
  path = os.path.join(run_dir, "tokenizer")
  if dataset not in DATASETS:
    spec = resolve_spec(dataset)
    path = os.path.join(run_dir, spec.name, "tokenizer")
    texts = dataset_texts(spec)
  if not os.path.exists(os.path.join(path, "tokenizer.json")):
    build_tiny_tokenizer(path, texts=texts, overwrite=True)
  return path


def _any_stage_started(run_dir: str) -> bool:
  """Whether any training run under ``run_dir`` has a checkpoint or a finished stage (a demo whose
  first attempt failed before training holds nothing another setting would contradict)."""
  for root, dirs, files in os.walk(run_dir):
    name = os.path.basename(root)
    if (name == FINAL and SUMMARY in files) or (name == CHECKPOINTS and (dirs or files)):
      return True
  return False


def run_demo(datasets: Sequence[str], run_dir: str, *, quick: bool = False, seed: int = 0,
             seeds: Sequence[int] | None = None, fresh: bool = False,
             progress: bool = True, model: str | None = None,
             settings: DemoSettings | None = None,
             ablations: Sequence[str] | None = None) -> dict:
  """Runs the miniature benchmark; writes results.json, results.md, comparison.png; returns results.

  datasets: built-in names (``data.build.DATASETS``) or YAML spec files of your own attribute
  (``data.build.load_spec``), each checked before anything runs. ``seeds``: several seeds, each a
  whole demo under ``run_dir/seed<N>`` (kept, and reused on a rerun), and ``run_dir``'s results
  their mean and standard deviation (``aggregate_seeds``); default: the one ``seed`` in ``run_dir``.
  ``model``: a converted model directory (``distfair convert gguf-to-flax`` / ``hf-to-flax``) to
  start every method from instead of the biased base trained here, with ``REAL``'s sizes and its
  own tokenizer and chat template; ``settings`` overrides the sizes (``DEFAULT``, ``QUICK``,
  ``REAL``). ``ablations``: the datasets (names) whose runs include the ablations kl_only and
  kto_only (default: every one).
  """
  for ds in datasets:
    if ds not in DATASETS and not str(ds).endswith((".yaml", ".yml")):
      raise InputError(f"demo: dataset: expected one of {', '.join(DATASETS)} or a YAML spec file, "
                       f"got {ds!r}")
    resolve_spec(ds)  # a bad spec fails here, in one line, before any training
  names = [resolve_spec(ds).name for ds in datasets]
  unknown = sorted(set(ablations or ()) - set(names))
  if unknown:
    raise InputError(f"demo: ablations: expected some of the datasets run ({', '.join(names)}), "
                     f"got {', '.join(unknown)}")
  seeds = [int(seed)] if seeds is None else [int(x) for x in seeds]
  if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise InputError(f"demo: seeds: expected distinct non-negative integers, got {seeds}")
  if model is not None:
    _check_model_dir(model)
  if settings is None:
    settings = settings_for(quick=quick, model=model)
  run_dir = os.path.abspath(run_dir)
  if fresh and os.path.exists(run_dir):
    shutil.rmtree(run_dir)
  os.makedirs(run_dir, exist_ok=True)
  if len(seeds) == 1:
    return _run_seed(datasets, run_dir, settings=settings, quick=quick, seed=seeds[0],
                     progress=progress, model=model, ablations=ablations)
  _check_marker(run_dir, {"quick": quick, "seeds": seeds, "settings": dataclasses.asdict(settings),
                          **_model_info(model)})
  start = time.perf_counter()
  first = os.path.join(run_dir, f"seed{seeds[0]}")  # its selections fix the later seeds' rates
  per_seed = {s: _run_seed(datasets, os.path.join(run_dir, f"seed{s}"), settings=settings,
                           quick=quick, seed=s, progress=progress, model=model,
                           ablations=ablations,
                           rates_from=first if settings.tune_first_seed and s != seeds[0] else None)
              for s in seeds}
  results = aggregate_seeds(per_seed)
  write_results(run_dir, results, versions=settings.versions,
                sweeps=aggregate_v2(run_dir, seeds, "decoding_sweep.json"),
                pairs=aggregate_v2(run_dir, seeds, "kl_pairs.json"),
                timings={"seeds": {str(s): fileio.read_json(os.path.join(run_dir, f"seed{s}",
                                                                         "timings.json"))
                                   for s in seeds},
                         "total_s": round(time.perf_counter() - start, 1)},
                title=(f"# distfair demo ({_label(quick, model)}, seeds "
                       f"{', '.join(map(str, seeds))})"),
                table=seeds_table(results, settings.versions))
  return results


# Settings that change how the layers run, not the results: a demo may resume with others.
EXECUTION_SETTINGS = ("scan_layers", "remat")


def _check_marker(run_dir: str, info: dict) -> None:
  marker = os.path.join(run_dir, "demo.json")
  # A setting newer than the recorded demo had its default's behaviour there.
  defaults = json.loads(json.dumps(dataclasses.asdict(DemoSettings())))
  results_affecting = lambda d: {**d, "settings": {
      k: v for k, v in {**defaults, **d.get("settings", {})}.items()
      if k not in EXECUTION_SETTINGS}}
  if (os.path.exists(marker) and _any_stage_started(run_dir) and
      results_affecting(fileio.read_json(marker)) !=
      results_affecting(json.loads(json.dumps(info)))):
    raise InputError(f"{marker}: this run directory holds a demo with other settings (quick / "
                     f"seeds); use another --run-dir or --fresh")
  fileio.write_json(marker, info, indent=1)


def _check_model_dir(model: str) -> None:
  """A one-line error, before anything runs, for a ``--model`` that is no converted directory."""
  path = fileio.as_path(model)
  if not path.is_dir():
    raise InputError(f"{model}: demo --model: expected a directory from `distfair convert "
                     f"hf-to-flax` or `gguf-to-flax`, got {'a file' if path.exists() else 'none'}")
  load_model_config(path)  # names the file and field when it is not one


def _model_info(model: str | None) -> dict:
  return {} if model is None else {"model": os.path.abspath(model)}


def _run_seed(datasets: Sequence[str], run_dir: str, *, settings: DemoSettings, quick: bool,
              seed: int, progress: bool, model: str | None = None,
              ablations: Sequence[str] | None = None, rates_from: str | None = None) -> dict:
  """One seed's whole demo under ``run_dir`` (reused where finished); returns its results.
  ``rates_from``: the first seed's run directory, whose selections fix this seed's rates."""
  os.makedirs(run_dir, exist_ok=True)
  _check_marker(run_dir, {"quick": quick, "seed": seed, "settings": dataclasses.asdict(settings),
                          **_model_info(model)})
  results, timings, sweeps, pairs = {}, {}, {}, {}
  start = time.perf_counter()
  # The dataset the others take their learning rates from (``tune_on``) first; tables keep the
  # order asked for.
  names = [resolve_spec(ds).name for ds in datasets]
  for ds in sorted(datasets, key=lambda d: resolve_spec(d).name != settings.tune_on):
    demo = Demo(ds, run_dir, settings=settings, seed=seed,
                tokenizer_dir=model if model is not None else _tokenizer(run_dir, ds),
                progress=progress, base_model=model,
                ablations=ablations is None or resolve_spec(ds).name in set(ablations),
                rates_from=rates_from)
    results[demo.dataset] = demo.run()
    if settings.analyses:
      results.update(demo.out_of_distribution())
      sweeps[demo.dataset] = demo.decoding_sweep()
      pairs[demo.dataset] = demo.kl_pairs_variant()
    timings[demo.dataset] = demo.timings
    # After every dataset: a run of several hours (--all on a real model) shows its finished
    # datasets, and a stop loses no table.
    results = {n: results[n] for n in names if n in results} | results
    write_results(run_dir, results, versions=settings.versions, sweeps=sweeps, pairs=pairs,
                  timings={"datasets": timings, "total_s": round(time.perf_counter() - start, 1)},
                  title=f"# distfair demo ({_label(quick, model)}, seed {seed})",
                  table=results_table(results, settings.versions))
  return results


def _label(quick: bool, model: str | None) -> str:
  """The results' title: the sizes and, for a given model, its directory's name."""
  return ("quick" if quick else "default") + ("" if model is None else
                                              f", model {os.path.basename(os.path.normpath(model))}")


def write_results(run_dir: str, results: dict, *, versions: Sequence[str], sweeps: dict,
                  pairs: dict, timings: dict, title: str, table: str) -> None:
  """What a demo leaves in ``run_dir`` (one seed's or the seeds' aggregate): results.json, the
  analyses' decoding_sweep.json and kl_pairs.json, timings.json, results.md (``title``, the
  headline table, ``table``, then the KL table, the analyses' tables and the wall times) and
  comparison.png."""
  fileio.write_json(os.path.join(run_dir, "results.json"), results, indent=1)
  fileio.write_json(os.path.join(run_dir, "decoding_sweep.json"), sweeps, indent=1)
  fileio.write_json(os.path.join(run_dir, "kl_pairs.json"), pairs, indent=1)
  fileio.write_json(os.path.join(run_dir, "timings.json"), timings, indent=1)
  per_dataset = timings.get("datasets") or {}
  fileio.write_text(os.path.join(run_dir, "results.md"),
                    f"{title}\n\n## Headline\n\n{headline_table(results)}\n## All figures\n\n"
                    f"{table}"
                    f"\n## KL(target || achieved)\n\n{kl_table(results, versions)}"
                    + (f"\n## Decoding sensitivity (ours, v2)\n\n{sweep_table(sweeps)}"
                       if sweeps else "")
                    + (f"\n## KTO's mismatched pairs (ours, v2)\n\n{sweep_table(pairs, 'hybrid')}"
                       if pairs else "")
                    + (f"\n## Wall time\n\n{timings_table(per_dataset)}" if per_dataset else ""))
  comparison_plot(results, versions, os.path.join(run_dir, "comparison.png"))


