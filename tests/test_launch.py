"""launch/: --help, argument checks, the exact gcloud commands of --dry-run, babysit's retry loop
(against a stand-in gcloud), and shellcheck."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ["tpu/create.sh", "tpu/setup.sh", "tpu/run.sh", "tpu/babysit.sh", "tpu/stop.sh",
           "gpu/run.sh", "local/demo.sh", "local/multihost.sh"]
CONFIG = "configs/experiments/gender_real_uk/llama3.2-1b.yaml"
SLICES = {  # type -> zone, runtime version
    "v5litepod-16": ("us-west4-a", "v2-alpha-tpuv5-lite"),
    "v4-32": ("us-central2-b", "tpu-ubuntu2204-base"),
}


def sh(script: str, *args: str, env: dict | None = None, cwd: str | None = None):
  full_env = dict(os.environ)
  full_env.pop("CLOUDSDK_COMPUTE_ZONE", None)
  full_env.update(env or {})
  return subprocess.run([os.path.join(LAUNCH, script), *args], capture_output=True, text=True,
                        env=full_env, cwd=cwd or ROOT, timeout=60)


def lines(result) -> list[str]:
  assert result.returncode == 0, result.stderr
  return [l for l in result.stdout.splitlines() if l and not l.startswith("#")]


def remote_command(line: str) -> str:
  """The --command=... of a printed gcloud ssh line (exactly as the shell would pass it)."""
  args = shlex.split(line.split(" 2>&1 | tee")[0])
  return next(a for a in args if a.startswith("--command="))[len("--command="):]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
  r = sh(script, "--help")
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith("Usage:")


@pytest.mark.parametrize("tpu_type", sorted(SLICES))
def test_create_dry_run(tpu_type):
  zone, version = SLICES[tpu_type]
  spot = lines(sh("tpu/create.sh", "my-tpu", "--type", tpu_type, "--zone", zone, "--spot", "--dry-run"))
  assert spot == [f"gcloud compute tpus tpu-vm create my-tpu --zone={zone} "
                  f"--accelerator-type={tpu_type} --version={version} --spot"]
  ondemand = lines(sh("tpu/create.sh", "my-tpu", "--type", tpu_type, "--zone", zone,
                      "--project", "my-project", "--dry-run"))
  assert ondemand == [f"gcloud compute tpus tpu-vm create my-tpu --zone={zone} "
                      f"--accelerator-type={tpu_type} --version={version} --project=my-project"]


@pytest.mark.parametrize("tpu_type", sorted(SLICES))
def test_setup_dry_run(tpu_type):
  zone, _ = SLICES[tpu_type]
  out = lines(sh("tpu/setup.sh", "my-tpu", "--zone", zone, "--ckpt", "gs://my-bucket/ckpt/llama3.2-1b",
                 "--dry-run"))
  assert out[0].startswith("tar -czf ") and f"-C {ROOT} ." in out[0]
  assert out[1].startswith("gcloud compute tpus tpu-vm scp ")
  assert f"my-tpu:distfair_src.tgz --zone={zone} --worker=all" in out[1]
  assert out[2].startswith(f"gcloud compute tpus tpu-vm ssh my-tpu --zone={zone} --worker=all ")
  assert 'pip install -q -e ".[tpu]"' in remote_command(out[2])
  assert remote_command(out[3]) == "gcloud storage cp -r gs://my-bucket/ckpt/llama3.2-1b ~/distfair_jax/ckpt/"


@pytest.mark.parametrize("tpu_type", sorted(SLICES))
def test_run_dry_run(tpu_type):
  zone, _ = SLICES[tpu_type]
  run_dir = "gs://my-bucket/runs/gender_real_uk/llama3.2-1b"
  out = lines(sh("tpu/run.sh", "my-tpu", CONFIG, "hybrid.beta=0.2", "--zone", zone, "--run-dir",
                 run_dir, "--type", tpu_type, "--env", "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2",
                 "--dry-run"))
  assert out[0] == "mkdir -p logs/my-tpu"
  assert out[1].startswith(f"gcloud compute tpus tpu-vm ssh my-tpu --zone={zone} --worker=all ")
  assert out[1].endswith("2>&1 | tee -a logs/my-tpu/all-workers.log")
  remote = remote_command(out[1])
  assert (f"python3 -m distfair_jax.cli train {CONFIG} run_dir={run_dir} hybrid.beta=0.2"
          in remote)
  assert "export DISTFAIR_DISTRIBUTED=1 'LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2'" in remote
  assert "~/distfair_logs/my-tpu-worker-$W.log" in remote  # a log per worker
  assert f"gcloud storage cp \"$LOG\" {run_dir}/logs/worker-$W.log" in remote
  subprocess.run(["bash", "-n", "-c", remote], check=True)  # the worker-side script parses


def test_run_refuses_a_local_run_dir_on_a_multi_host_slice():
  r = sh("tpu/run.sh", "my-tpu", CONFIG, "--zone", "us-west4-a", "--run-dir", "runs/x",
         "--type", "v5litepod-16", "--dry-run")
  assert r.returncode == 2 and "--run-dir: v5litepod-16 has 4 hosts" in r.stderr
  ok = sh("tpu/run.sh", "my-tpu", CONFIG, "--zone", "us-west4-a", "--run-dir", "runs/x",
          "--type", "v5litepod-8", "--dry-run")
  assert ok.returncode == 0 and "mkdir -p runs/x/logs" in ok.stdout


@pytest.mark.parametrize("tpu_type", sorted(SLICES))
def test_babysit_dry_run(tpu_type):
  zone, version = SLICES[tpu_type]
  run_dir = "gs://my-bucket/runs/x"
  out = lines(sh("tpu/babysit.sh", "my-tpu", CONFIG, "--type", tpu_type, "--zone", zone, "--run-dir",
                 run_dir, "--max-retries", "3", "--dry-run"))
  assert out[0] == f"gcloud compute tpus tpu-vm describe my-tpu --zone={zone} '--format=value(state)'"
  assert out[1] == f"gcloud compute tpus tpu-vm delete my-tpu --zone={zone} --quiet"
  assert out[2] == (f"gcloud compute tpus tpu-vm create my-tpu --zone={zone} "
                    f"--accelerator-type={tpu_type} --version={version} --spot")
  assert any(l.startswith(f"gcloud compute tpus tpu-vm ssh my-tpu --zone={zone} --worker=all") and
             "distfair_jax.cli train" in l for l in out)
  assert any("pip install" in l for l in out)


def test_stop_dry_run():
  out = lines(sh("tpu/stop.sh", "my-tpu", "--zone", "us-west4-a", "--grace", "60", "--dry-run"))
  assert out[0].startswith("gcloud compute tpus tpu-vm ssh my-tpu --zone=us-west4-a --worker=all ")
  assert 'kill -TERM "$P"' in remote_command(out[0]) and "seq 60" in remote_command(out[0])
  assert out[1] == "gcloud compute tpus tpu-vm delete my-tpu --zone=us-west4-a --quiet"
  kept = lines(sh("tpu/stop.sh", "my-tpu", "--zone", "us-west4-a", "--keep-slice", "--dry-run"))
  assert len(kept) == 1 and "delete" not in kept[0]


def test_gpu_and_local_dry_run():
  out = lines(sh("gpu/run.sh", "configs/experiments/tiny.yaml", "sft.epochs=1", "--run-dir", "gs://b-1/r",
                 "--coordinator", "10.0.0.1:1234", "--num-processes", "2", "--process-id", "1",
                 "--gpus", "0,1", "--dry-run"))
  assert out[1] == ("env CUDA_VISIBLE_DEVICES=0,1 JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 "
                    "JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 python3 -m distfair_jax.cli train "
                    "configs/experiments/tiny.yaml run_dir=gs://b-1/r sft.epochs=1 "
                    "2>&1 | tee -a logs/tiny/process-1.log")
  single = lines(sh("gpu/run.sh", "configs/experiments/tiny.yaml", "--dry-run"))
  assert "JAX_" not in single[1]
  rehearsal = lines(sh("local/multihost.sh", "--dry-run", "--port", "4321", "--log-dir", "L", "2",
                       "train", "configs/experiments/tiny.yaml", "run_dir=r"))
  common = ("env JAX_COORDINATOR_ADDRESS=127.0.0.1:4321 JAX_NUM_PROCESSES=2 "
            "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo "
            "XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1")
  assert rehearsal[1:] == [
      f"{common} JAX_PROCESS_ID={i} python3 -m distfair_jax.cli train "
      f"configs/experiments/tiny.yaml run_dir=r > L/process-{i}.log 2>&1 &" for i in (0, 1)] + ["wait"]
  for bad, message in ((["0", "train"], "N: expected a positive integer"),
                       (["2"], "N COMMAND: expected"),
                       (["--devices-per-process", "x", "2", "train"], "--devices-per-process")):
    r = sh("local/multihost.sh", *bad)
    assert r.returncode == 2 and message in r.stderr, r.stderr
  demo = lines(sh("local/demo.sh", "--dry-run", "--out", "a dir"))
  assert demo[0].startswith("JAX_PLATFORMS=cpu ") and demo[0].endswith("demo --out 'a dir'")


BAD = [
    (("tpu/create.sh", "my-tpu", "--zone", "us-west4-a", "--dry-run"), "--type: expected"),
    (("tpu/create.sh", "my-tpu", "--type", "v9-8", "--zone", "us-west4-a"), "--type: expected"),
    (("tpu/create.sh", "my-tpu", "--type", "v4-32"), "--zone: expected"),
    (("tpu/create.sh", "My_TPU", "--type", "v4-32", "--zone", "us-central2-b"), "NAME: expected"),
    (("tpu/create.sh", "my-tpu", "--type", "v4-32", "--zone", "us-central2-b", "--bogus"),
     "unknown option '--bogus'"),
    (("tpu/create.sh", "my-tpu", "--type"), "--type: expected a value"),
    (("tpu/setup.sh", "my-tpu", "--zone", "us-west4-a", "--source", "/nonexistent"), "--source: expected"),
    (("tpu/run.sh", "my-tpu", "--zone", "us-west4-a", "--run-dir", "gs://my-bucket/r"), "CONFIG: expected"),
    (("tpu/run.sh", "my-tpu", "configs/nope.yaml", "--zone", "us-west4-a", "--run-dir", "gs://my-bucket/r"),
     "CONFIG: expected a file"),
    (("tpu/run.sh", "my-tpu", CONFIG, "--zone", "us-west4-a"), "--run-dir: expected"),
    (("tpu/run.sh", "my-tpu", CONFIG, "run_dir=x", "--zone", "us-west4-a", "--run-dir", "gs://my-bucket/r"),
     "use --run-dir"),
    (("tpu/babysit.sh", "my-tpu", CONFIG, "--type", "v4-32", "--zone", "us-central2-b", "--run-dir",
      "runs/local"), "--run-dir: expected gs://"),
    (("tpu/babysit.sh", "my-tpu", CONFIG, "--type", "v4-32", "--zone", "us-central2-b", "--run-dir",
      "gs://my-bucket/r", "--max-retries", "0"), "--max-retries: expected"),
    (("tpu/stop.sh", "my-tpu", "--zone", "us-west4-a", "--grace", "soon"), "--grace: expected"),
    (("gpu/run.sh", "configs/experiments/tiny.yaml", "--coordinator", "h:1"), "expected all three"),
    (("gpu/run.sh", "configs/experiments/tiny.yaml", "--coordinator", "h:1", "--num-processes", "2",
      "--process-id", "2"), "--process-id: expected 0..1"),
    (("gpu/run.sh", "configs/experiments/tiny.yaml", "--gpus", "all"), "--gpus: expected"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD])
def test_bad_arguments_fail_with_a_message(args, message):
  r = sh(*args)
  assert r.returncode == 2, (r.stdout, r.stderr)
  assert message in r.stderr and r.stderr.count("\n") <= 2
  assert not r.stdout


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Stand-in gcloud: records each call; 'describe' prints the next line of $FAKE/states (then READY);
# the training ssh exits with the next line of $FAKE/codes (then 0).
echo "$*" >> "$FAKE/calls"
pop() { local v; v=$(head -n1 "$1" 2>/dev/null); [ -n "$v" ] && sed -i 1d "$1"; echo "${v:-$2}"; }
case "$*" in
  *" describe "*) echo "$(pop "$FAKE/states" READY)" ;;
  *" ssh "*distfair_jax.cli\ train*) exit "$(pop "$FAKE/codes" 0)" ;;
esac
exit 0
"""


@pytest.fixture
def fake_gcloud(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  src = tmp_path / "src"
  src.mkdir()
  (src / "pyproject.toml").write_text("")
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE": str(tmp_path), "TMPDIR": str(tmp_path)}

  def babysit(states, codes, retries=3):
    (tmp_path / "states").write_text("".join(s + "\n" for s in states))
    (tmp_path / "codes").write_text("".join(f"{c}\n" for c in codes))
    (tmp_path / "calls").write_text("")
    r = sh("tpu/babysit.sh", "my-tpu", CONFIG, "--type", "v5litepod-16", "--zone", "us-west4-a",
           "--run-dir", "gs://my-bucket/r", "--source", str(src), "--max-retries", str(retries),
           "--retry-wait", "0", env=env, cwd=str(tmp_path))
    calls = [c.split()[3] for c in (tmp_path / "calls").read_text().splitlines()]
    return r, calls

  return babysit


def test_babysit_recreates_a_preempted_slice_and_resumes(fake_gcloud):
  # attempt 1: no slice -> create, setup, train (preempted: 143); attempt 2: PREEMPTED -> delete,
  # create, setup, train (0).
  r, calls = fake_gcloud(states=["MISSING", "PREEMPTED"], codes=[143, 0])
  assert r.returncode == 0, r.stderr
  assert calls == ["describe", "create", "scp", "ssh", "ssh",
                   "describe", "delete", "create", "scp", "ssh", "ssh"]
  assert "attempt 2/3" in r.stderr


def test_babysit_gives_up_after_max_retries_and_stops_on_bad_config(fake_gcloud):
  r, calls = fake_gcloud(states=[], codes=[1, 1, 1, 1], retries=2)
  assert r.returncode == 1 and "giving up after 2 attempts" in r.stderr
  assert calls == ["describe", "ssh", "describe", "ssh"]  # READY: no re-creation
  r, calls = fake_gcloud(states=[], codes=[2])
  assert r.returncode == 2 and calls == ["describe", "ssh"]


def test_shellcheck():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
  files = [os.path.join(LAUNCH, s) for s in SCRIPTS] + [os.path.join(LAUNCH, "_lib.sh")]
  r = subprocess.run(["shellcheck", "-x", *files], capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 0, r.stdout
