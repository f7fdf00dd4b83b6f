"""Config composition, overrides and the errors that name the key and the file."""

import dataclasses
import os

import pytest

from distfair_jax.config import (Config, config_from_dict, config_to_dict, load_config,
                                 load_eval_config)
from distfair_jax.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "configs", "base.yaml")


def _write(path, text):
  path.write_text(text, encoding="utf-8")
  return str(path)


def test_base_yaml_documents_every_field_with_defaults(tmp_path):
  cfg = load_config(BASE, ["run_dir=x"])
  assert cfg == Config(run_dir="x")  # base.yaml restates the schema's defaults exactly
  text = open(BASE, encoding="utf-8").read()
  for line in text.splitlines():
    if line.strip() and not line.strip().startswith("#") and ":" in line:
      key, rest = line.split(":", 1)
      if rest.strip() and not rest.strip().startswith("#") and key.strip() not in ("optim",):
        if key.strip() not in ("b1", "b2", "eps"):  # optimizer constants documented once
          assert "#" in rest, f"base.yaml: {key.strip()} has no comment"


def test_composition_and_overrides(tmp_path):
  _write(tmp_path / "model.yaml", "model:\n  preset: llama3.2-1b\n  dtype: bfloat16\n")
  _write(tmp_path / "data.yaml", "data:\n  dataset: race_even_us\nsft:\n  epochs: 5\n")
  exp = _write(tmp_path / "exp.yaml",
               f"defaults: [{BASE}, model.yaml, data.yaml]\nrun_dir: runs/a\nsft:\n  epochs: 1\n")
  cfg = load_config(exp, ["sft.optim.learning_rate=3e-4", "lora.enabled=true", "stages=[sft]"])
  assert cfg.model.preset == "llama3.2-1b" and cfg.model.dtype == "bfloat16"
  assert cfg.data.dataset == "race_even_us"
  assert cfg.sft.epochs == 1  # the file itself wins over its defaults
  assert cfg.sft.optim.learning_rate == pytest.approx(3e-4)
  assert cfg.lora.enabled is True and cfg.stages == ["sft"]
  assert cfg.hybrid.optim.learning_rate == pytest.approx(1e-6)
  assert config_from_dict(config_to_dict(cfg)) == cfg


def test_unknown_key_names_key_and_file(tmp_path):
  bad = _write(tmp_path / "bad.yaml", "run_dir: r\nsft:\n  epochz: 3\n")
  with pytest.raises(InputError, match=r"bad\.yaml: sft\.epochz: Key 'epochz' not in"):
    load_config(bad)
  with pytest.raises(InputError, match=r"command line: lora\.rnak"):
    load_config(None, ["run_dir=r", "lora.rnak=4"])


def test_wrong_type_names_key_and_file(tmp_path):
  bad = _write(tmp_path / "bad.yaml", "run_dir: r\nhybrid:\n  beta: lots\n")
  with pytest.raises(InputError, match=r"bad\.yaml: hybrid\.beta: .*could not be converted"):
    load_config(bad)
  with pytest.raises(InputError, match=r"command line: sft\.batch_size"):
    load_config(None, ["run_dir=r", "sft.batch_size=four"])


def test_missing_value_names_key_and_file(tmp_path):
  f = _write(tmp_path / "nodir.yaml", "seed: 3\n")
  with pytest.raises(InputError, match=r"nodir\.yaml: run_dir: missing value"):
    load_config(f)


def test_bad_choices_and_batch(tmp_path):
  with pytest.raises(InputError, match=r"hybrid\.ablation: expected one of"):
    load_config(None, ["run_dir=r", "hybrid.ablation=half"])
  with pytest.raises(InputError, match=r"hybrid\.batch_size: expected an even number"):
    load_config(None, ["run_dir=r", "hybrid.batch_size=1"])
  with pytest.raises(InputError, match=r"stages\[1\]: expected one of sft, hybrid, ift, dpo, "
                                      r"got 'rlhf'"):
    load_config(None, ["run_dir=r", "stages=[sft,rlhf]"])
  with pytest.raises(InputError, match=r"model\.dtype: expected one of float32, bfloat16, got "
                                      r"'float16'"):
    load_config(None, ["run_dir=r", "model.dtype=float16"])
  with pytest.raises(InputError, match=r"command line: eval\.decode\.top_p: expected a number in"):
    load_config(None, ["run_dir=r", "eval.decode.top_p=0"])


# Every numeric setting's range: (override, expected text). Declared with the field
# (``_ranged``), checked before anything runs.
RANGES = [
    ("sft.optim.learning_rate=-1e-3", "a finite number > 0, got -0.001"),
    ("sft.optim.learning_rate=0", "a finite number > 0, got 0.0"),
    ("hybrid.optim.learning_rate=1e400", "a finite number > 0, got inf"),
    ("dpo.optim.learning_rate=nan", "a finite number > 0, got nan"),
    ("sft.optim.grad_accum=0", "an integer >= 1, got 0"),
    ("sft.optim.warmup_steps=-10", "an integer >= 0, got -10"),
    ("sft.optim.b1=1", r"a number in \[0, 1\), got 1.0"),
    ("sft.optim.weight_decay=-0.1", "a finite number >= 0, got -0.1"),
    ("sft.optim.clip_norm=-1", "a finite number >= 0, got -1.0"),
    ("sft.epochs=0", "an integer >= 1, got 0"),
    ("sft.batch_size=0", "an integer >= 1, got 0"),
    ("sft.max_steps=-1", "an integer >= 0, got -1"),
    ("dpo.batch_size=0", "an integer >= 1, got 0"),
    ("hybrid.epochs=0", "an integer >= 1, got 0"),
    ("hybrid.beta=-1", "a finite number > 0, got -1.0"),
    ("dpo.beta=0", "a finite number > 0, got 0.0"),
    ("hybrid.kl_weight=-1", "a finite number >= 0, got -1.0"),
    ("dpo.label_smoothing=0.5", r"a number in \[0, 0.5\), got 0.5"),
    ("checkpoint.keep=0", "an integer >= 1, got 0"),
    ("checkpoint.every_steps=-5", "an integer >= 0, got -5"),
    ("heldout.max_batches=-1", "an integer >= 0, got -1"),
    ("logging.every_steps=0", "an integer >= 1, got 0"),
    ("lora.dropout=2", r"a number in \[0, 1\], got 2.0"),
    ("lora.rank=0", "an integer >= 1, got 0"),
    ("lora.alpha=0", "a finite number > 0, got 0.0"),
    ("data.heldout_fraction=1.5", r"a number in \[0, 1\), got 1.5"),
    ("data.heldout_fraction=1", r"a number in \[0, 1\), got 1.0"),
    ("data.rows_per_occupation=0", "an integer >= 1, got 0"),
    ("data.max_length=0", "an integer >= 1, got 0"),
    ("data.story_rows_per_occupation=0", "an integer >= 1, or null, got 0"),
    ("mesh.fsdp=0", "an integer >= 1, or -1, got 0"),
    ("seed=99999999999999999999999", r"an integer in \[0, 2\*\*32\), got 99999999999999999999999"),
    ("seed=-1", r"an integer in \[0, 2\*\*32\), got -1"),
    ("data.seed=4294967296", r"an integer in \[0, 2\*\*32\), got 4294967296"),
    ("eval.seed=4294967296", r"an integer in \[0, 2\*\*32\), got 4294967296"),
    ("eval.batch_size=0", "an integer >= 1, got 0"),
    ("eval.n_bootstrap=-1", "an integer >= 0, got -1"),
    ("eval.decode.temperature=-1", "a finite number >= 0, got -1.0"),
    ("eval.decode.max_new_tokens=0", "an integer >= 1, got 0"),
    ("eval.judge.workers=0", "an integer >= 1, got 0"),
    ("eval.judge.timeout=0", "a finite number > 0, got 0.0"),
]


@pytest.mark.parametrize("override, expected", RANGES)
def test_every_numeric_setting_is_checked_with_its_range(override, expected):
  key = override.split("=")[0]
  with pytest.raises(InputError, match=rf"^command line: {key}: expected {expected}$"):
    load_config(None, ["run_dir=r", override])


def test_every_numeric_field_declares_a_range():
  from distfair_jax import config as C
  unranged = [f"{cls.__name__}.{f.name}" for cls in (
      C.MeshConfig, C.LoraConfig, C.DataConfig, C.OptimConfig, C.SFTConfig, C.HybridConfig,
      C.DPOConfig, C.CheckpointConfig, C.HeldoutConfig, C.LoggingConfig, C.DecodeConfig,
      C.JudgeConfig, C.EvalConfig, C.Config)
      for f in dataclasses.fields(cls)
      if f.type in ("int", "float", "Optional[int]", "Optional[float]")
      and "range" not in f.metadata]
  assert unranged == []


def test_range_edges_pass_and_the_error_names_the_file_that_set_the_key(tmp_path):
  cfg = load_config(None, ["run_dir=r", "seed=4294967295", "data.heldout_fraction=0",
                           "lora.dropout=1", "sft.optim.warmup_steps=0", "mesh.data=-1",
                           "eval.rounds=null", "heldout.max_batches=0"])
  assert cfg.seed == 2**32 - 1 and cfg.data.heldout_fraction == 0 and cfg.eval.rounds is None
  exp = _write(tmp_path / "exp.yaml", f"defaults: [{BASE}]\nrun_dir: r\nsft:\n  optim:\n"
                                      f"    learning_rate: -1.0e-3\n")
  with pytest.raises(InputError, match=r"exp\.yaml: sft\.optim\.learning_rate: expected a finite "
                                      r"number > 0, got -0\.001$"):
    load_config(exp, ["sft.epochs=3"])  # the file set the bad key, not the command line
  with pytest.raises(InputError, match=r"^command line: sft\.epochs: expected an integer >= 1"):
    load_config(exp, ["sft.epochs=0", "sft.optim.learning_rate=1e-3"])
  with pytest.raises(InputError, match=r"^command line: n_bootstrap: expected an integer >= 0"):
    load_eval_config(None, ["n_bootstrap=-3"])


def test_sections_built_in_code_are_checked_too():
  from distfair_jax import config as C
  with pytest.raises(InputError, match=r"^grad_accum: expected an integer >= 1, got 0$"):
    C.OptimConfig(grad_accum=0)
  with pytest.raises(InputError, match=r"^seed: expected an integer in \[0, 2\*\*32\)"):
    C.Config(run_dir="r", seed=2**70)
  with pytest.raises(InputError, match=r"^batch_size: expected an even number >= 2"):
    C.HybridConfig(batch_size=3)


def test_cli_exits_2_with_one_line_for_a_setting_out_of_range(capsys):
  from distfair_jax.cli import main
  assert main(["train", BASE, "run_dir=r", "seed=99999999999999999999999"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Traceback" not in err
  assert "command line: seed: expected an integer in [0, 2**32)" in err


def test_an_openai_judge_needs_its_model_and_url():
  with pytest.raises(InputError, match=r"^command line: judge\.model: expected the served model "
                                      r"name for judge\.kind=openai \(judge\.model=NAME\), got None$"):
    load_eval_config(None, ["judge.kind=openai", "judge.url=http://localhost:8000/v1"])
  with pytest.raises(InputError, match=r"^command line: eval\.judge\.url: expected the server's URL"):
    load_config(None, ["run_dir=r", "eval.judge.kind=openai", "eval.judge.model=m"])
  cfg = load_eval_config(None, ["judge.kind=openai", "judge.url=http://h/v1", "judge.model=m"])
  assert (cfg.judge.url, cfg.judge.model) == ("http://h/v1", "m")


@pytest.mark.parametrize("argv", [
    ["eval", "RUN", "--overwrite", "rounds=1", "versions=[v2]"],
    ["eval", "RUN", "rounds=1", "--overwrite", "versions=[v2]"],
    ["eval", "RUN", "rounds=1", "versions=[v2]", "--overwrite"],
    ["eval", "--overwrite", "RUN", "rounds=1", "versions=[v2]"],
])
def test_options_and_overrides_in_either_order(argv):
  from distfair_jax.cli import build_parser, parse
  args = parse(build_parser(), argv)
  assert (args.model, args.overrides, args.overwrite) == ("RUN", ["rounds=1", "versions=[v2]"], True)


def test_a_stray_argument_after_an_option_is_the_subcommands_usage_error(capsys):
  from distfair_jax.cli import main
  with pytest.raises(SystemExit) as e:
    main(["eval", "RUN", "--overwrite", "rounds"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("usage: distfair eval ") and \
      "distfair eval: error: unrecognized arguments: rounds" in err


def test_version(capsys):
  from distfair_jax import __version__
  from distfair_jax.cli import main
  with pytest.raises(SystemExit) as e:
    main(["--version"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith(f"distfair {__version__} (jax ") and "orbax-checkpoint" in out


def test_enums_and_frozen_sections():
  from distfair_jax.config import Ablation, Stage
  cfg = load_config(None, ["run_dir=r", "hybrid.ablation=kl_only"])
  assert cfg.hybrid.ablation is Ablation.kl_only and cfg.hybrid.ablation == "kl_only"
  assert cfg.stages == [Stage.sft, Stage.hybrid] and f"{cfg.stages[0]}" == "sft"
  assert config_to_dict(cfg)["hybrid"]["ablation"] == "kl_only"  # plain YAML / JSON values
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.hybrid.beta = 0.5
  # a stage's section is hashable and compares by value: it is the stage's static spec
  other = load_config(None, ["run_dir=x", "hybrid.ablation=kl_only"]).hybrid
  assert cfg.hybrid == other and hash(cfg.hybrid) == hash(other)


def test_eval_overrides_start_from_a_base():
  from distfair_jax.config import EvalConfig, load_eval_config
  base = load_config(None, ["run_dir=r", "eval.rounds=40", "eval.decode.temperature=0.5"]).eval
  cfg = load_eval_config(base, ["versions=[v2]", "steering=none", "decode.top_k=5"])
  assert [str(v) for v in cfg.versions] == ["v2"] and cfg.steering == "none"
  assert (cfg.rounds, cfg.decode.temperature, cfg.decode.top_k) == (40, 0.5, 5)
  assert load_eval_config(None, []) == EvalConfig()
  with pytest.raises(InputError, match=r"command line: versions\[0\]: expected one of v1, v2, v3"):
    load_eval_config(None, ["versions=[v4]"])
  with pytest.raises(InputError, match=r"command line: rounds: expected an integer >= 1, or null, got 0"):
    load_eval_config(None, ["rounds=0"])
  with pytest.raises(InputError, match=r"command line: roundz"):
    load_eval_config(None, ["roundz=3"])


def test_yaml_errors(tmp_path):
  f = _write(tmp_path / "broken.yaml", "run_dir: [unclosed\n")
  with pytest.raises(InputError, match=r"broken\.yaml.*not valid YAML"):
    load_config(f)
  with pytest.raises(InputError, match=r"config file not found"):
    load_config(str(tmp_path / "nope.yaml"))
  loop = _write(tmp_path / "loop.yaml", "defaults: [loop.yaml]\n")
  with pytest.raises(InputError, match=r"circular"):
    load_config(loop)


def test_a_run_records_its_paths_absolute(tmp_path, monkeypatch):
  """Relative paths are relative to where you run; a run records them absolute, so that eval and
  export find its checkpoint, tokenizer and dataset from any directory. URLs stay."""
  import yaml
  from distfair_jax.config import PATH_FIELDS, config_to_dict, with_absolute_paths
  from distfair_jax.train.rundir import RunDir
  monkeypatch.chdir(tmp_path)
  cfg = load_config(None, ["run_dir=runs/r", "model.checkpoint=ckpt/l1b", "model.tokenizer=~/tok",
                           "model.params=gs://bucket/params", "data.spec=specs/age.yaml",
                           "data.records_dir=data/age"])
  assert cfg.model.checkpoint == "ckpt/l1b"  # `config show` prints what you wrote
  absolute = with_absolute_paths(cfg)
  assert absolute.run_dir == str(tmp_path / "runs" / "r")
  assert absolute.model.checkpoint == str(tmp_path / "ckpt" / "l1b")
  assert absolute.model.tokenizer == os.path.expanduser("~/tok")
  assert absolute.model.params == "gs://bucket/params"
  assert absolute.data.spec == str(tmp_path / "specs" / "age.yaml")
  assert absolute.data.records_dir == str(tmp_path / "data" / "age")
  assert len(PATH_FIELDS) == 6 and with_absolute_paths(absolute) == absolute
  # A run recorded with relative paths (before they were recorded absolute) is the same run.
  run = RunDir(tmp_path / "runs" / "r")
  run.path.mkdir(parents=True)
  run.config_path.write_text(yaml.safe_dump(config_to_dict(cfg)))
  (run.checkpoints_dir("sft") / "1").mkdir(parents=True)
  run.claim(absolute)
  # ... and so is the same run reached through a symlink (its directory, its checkpoint's).
  (tmp_path / "ckpt" / "l1b").mkdir(parents=True)
  (tmp_path / "runs_link").symlink_to(tmp_path / "runs", target_is_directory=True)
  (tmp_path / "ckpt_link").symlink_to(tmp_path / "ckpt", target_is_directory=True)
  linked = with_absolute_paths(dataclasses.replace(
      absolute, run_dir="runs_link/r",
      model=dataclasses.replace(absolute.model, checkpoint="ckpt_link/l1b")))
  RunDir(tmp_path / "runs_link" / "r").claim(linked)
  run.claim(absolute)
  moved = [o.replace("ckpt/l1b", "other") for o in ["run_dir=runs/r", "model.checkpoint=ckpt/l1b",
            "model.tokenizer=~/tok", "model.params=gs://bucket/params", "data.spec=specs/age.yaml",
            "data.records_dir=data/age"]]
  with pytest.raises(InputError, match=r"\(differs in model\.checkpoint; stages started: sft\)"):
    run.claim(with_absolute_paths(load_config(None, moved)))
  # A run recorded before a field existed ran with its default: the same run, unless set otherwise.
  old = config_to_dict(absolute)
  del old["data"]["steering_placement"], old["data"]["length_buckets"]
  run.config_path.write_text(yaml.safe_dump(old))
  run.claim(absolute)
  run.config_path.write_text(yaml.safe_dump(old))
  with pytest.raises(InputError, match=r"\(differs in data\.steering_placement; stages started"):
    run.claim(dataclasses.replace(absolute, data=dataclasses.replace(
        absolute.data, steering_placement="user_turn")))
  # How the layers run may change: remat always; scan_layers unless a stage stopped midway, whose
  # checkpoint holds the layers as written (a finished stage's parameters read either way).
  run.config_path.write_text(yaml.safe_dump(config_to_dict(absolute)))
  model = lambda **kw: dataclasses.replace(absolute, model=dataclasses.replace(absolute.model, **kw))
  run.claim(model(remat="full"))
  with pytest.raises(InputError, match=r"\(differs in model\.scan_layers; stages started: sft\)"):
    run.claim(model(remat="full", scan_layers=not absolute.model.scan_layers))
  (run.final_dir("sft")).mkdir(parents=True)
  (run.final_dir("sft") / "summary.json").write_text("{}")
  run.claim(model(remat="dots", scan_layers=not absolute.model.scan_layers))
  with pytest.raises(InputError, match=r"\(differs in model\.dtype; stages started: sft\)"):
    run.claim(model(dtype="bfloat16"))


def test_prompt_settings_are_typed_and_recorded(tmp_path):
  cfg = load_config(None, ["run_dir=x", "data.system_prompt=none",
                           "data.chat_template_kwargs={date_string: 26 Jul 2024}"])
  assert cfg.data.system_prompt == "none"
  assert cfg.data.chat_template_kwargs == {"date_string": "26 Jul 2024"}
  from distfair_jax.config import config_from_dict, config_to_dict, results_affecting
  assert config_from_dict(config_to_dict(cfg)) == cfg
  from distfair_jax.train.stages import SECTIONS
  assert results_affecting(config_to_dict(cfg), SECTIONS)["data"]["system_prompt"] == "none"
  ev = load_eval_config(cfg.eval, ["system_prompt=Answer tersely."])
  assert ev.system_prompt == "Answer tersely." and ev.chat_template_kwargs is None
  with pytest.raises(InputError, match=r"command line: data\.system_prompt"):
    load_config(None, ["run_dir=x", "data.system_prompt=null"])
