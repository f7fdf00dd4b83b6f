#!/usr/bin/env bash
# Run the same `distfair train` command on every worker of a TPU VM slice.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../_lib.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") NAME CONFIG [KEY=VALUE]... --zone ZONE --run-dir DIR [--type TYPE]
                 [--env NAME=VALUE]... [--log-dir DIR] [--project PROJECT] [--dry-run]

Run 'distfair train CONFIG run_dir=DIR KEY=VALUE...' on every worker of the slice at once
(gcloud compute tpus tpu-vm ssh --worker=all), from ~/distfair_jax (installed by setup.sh). Blocks
until the training ends and exits with its status (0 done, 1 failed, 2 bad config, 143 preempted:
a checkpoint was saved; rerun the same command to resume from it).

  NAME               TPU name
  CONFIG             experiment YAML, relative to the repository root, e.g.
                     configs/experiments/gender_real_uk/llama3.2-1b.yaml
  KEY=VALUE          config overrides, e.g. model.checkpoint=ckpt/llama3.2-1b hybrid.beta=0.2
  --zone ZONE        the slice's zone (default: \$CLOUDSDK_COMPUTE_ZONE)
  --run-dir DIR      run directory: gs://BUCKET/PATH (needed on a multi-host slice: every host writes
                     its share of each checkpoint there, and a re-created slice resumes from it) or a
                     path on the worker (single-host slices only)
  --type TYPE        the slice's accelerator type: lets the script refuse a local --run-dir on a
                     multi-host slice
  --env NAME=VALUE   environment variable for the training processes (repeatable), e.g.
                     LIBTPU_INIT_ARGS=... or XLA_FLAGS=...
  --log-dir DIR      local directory for the combined output of all workers (default: logs/NAME)
  --project PROJECT  Google Cloud project
  --dry-run          print the commands instead of running them
  -h, --help         this help

Logs: each worker writes ~/distfair_logs/NAME-worker-W.log (W: its worker number) and copies it to
DIR/logs/worker-W.log when the run ends; the combined output of all workers is also appended to
LOG_DIR/all-workers.log here. Each training process gets DISTFAIR_DISTRIBUTED=1 (call
jax.distributed.initialize() on a multi-host slice). stop.sh sends SIGTERM to the run (via
~/distfair_train.pid on each worker): it saves a checkpoint and exits with 143.

Example:
  $(basename "$0") distfair-v5e configs/experiments/gender_real_uk/llama3.2-1b.yaml \\
      --zone us-west4-a --run-dir gs://my-bucket/runs/gender_real_uk/llama3.2-1b
USAGE
}

name="" config="" type="" run_dir="" log_dir="" overrides=() envs=()
while (( $# )); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --zone) need_value "$1" $#; ZONE="$2"; shift 2 ;;
    --zone=*) ZONE="${1#*=}"; shift ;;
    --run-dir) need_value "$1" $#; run_dir="$2"; shift 2 ;;
    --run-dir=*) run_dir="${1#*=}"; shift ;;
    --type) need_value "$1" $#; type="$2"; shift 2 ;;
    --type=*) type="${1#*=}"; shift ;;
    --env) need_value "$1" $#; envs+=("$2"); shift 2 ;;
    --env=*) envs+=("${1#*=}"); shift ;;
    --log-dir) need_value "$1" $#; log_dir="$2"; shift 2 ;;
    --log-dir=*) log_dir="${1#*=}"; shift ;;
    --project) need_value "$1" $#; PROJECT="$2"; shift 2 ;;
    --project=*) PROJECT="${1#*=}"; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -*) die "unknown option '$1'" ;;
    *=*) overrides+=("$1"); shift ;;
    *)
      if [[ -z "$name" ]]; then name="$1"
      elif [[ -z "$config" ]]; then config="$1"
      else die "unexpected argument '$1' (overrides are KEY=VALUE)"; fi
      shift ;;
  esac
done

[[ -n "$name" ]] || die "NAME: expected the TPU name"
check_name "$name"
[[ -n "$config" ]] || die "CONFIG: expected an experiment YAML such as configs/experiments/gender_real_uk/llama3.2-1b.yaml"
check_zone "$ZONE"
check_project "$PROJECT"
check_run_dir "$run_dir"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
[[ "$config" == *.yaml || "$config" == *.yml ]] || die "CONFIG: expected a .yaml file, got '$config'"
[[ "$config" != /* ]] || die "CONFIG: expected a path relative to the repository root (the workers run from ~/distfair_jax), got '$config'"
[[ -f "$repo/$config" ]] || die "CONFIG: expected a file under $repo, got '$config'"
for o in "${overrides[@]}"; do
  [[ "$o" =~ ^[A-Za-z_][A-Za-z0-9_.]*= ]] || die "KEY=VALUE: expected a dotted config key, got '$o'"
  [[ "$o" != run_dir=* ]] || die "KEY=VALUE: run_dir: use --run-dir, got '$o'"
done
for e in "${envs[@]}"; do
  [[ "$e" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env: expected NAME=VALUE, got '$e'"
done
if [[ -n "$type" ]]; then
  check_type "$type"
  if (( $(num_workers "$type") > 1 )) && [[ "$run_dir" != gs://* ]]; then
    die "--run-dir: $type has $(num_workers "$type") hosts: expected gs://BUCKET/PATH (a path on the workers' disks is not shared), got '$run_dir'"
  fi
fi
[[ -n "$log_dir" ]] || log_dir="logs/$name"

# The command each worker runs (bash on the TPU VM image).
train=(python3 -m distfair_jax.cli train "$config" "run_dir=$run_dir" "${overrides[@]}")
if [[ "$run_dir" == gs://* ]]; then
  copy_log="gcloud storage cp \"\$LOG\" $(quote_cmd "$run_dir/logs/")worker-\$W.log"
else
  copy_log="mkdir -p $(quote_cmd "$run_dir/logs") && cp \"\$LOG\" $(quote_cmd "$run_dir/logs/")worker-\$W.log"
fi
meta="http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number"
remote="cd ~/distfair_jax && mkdir -p ~/distfair_logs"
remote+=" && W=\$(curl -sf -m 5 -H Metadata-Flavor:Google $meta || hostname)"
remote+=" && LOG=~/distfair_logs/$name-worker-\$W.log"
remote+=" && export DISTFAIR_DISTRIBUTED=1${envs[*]:+ $(quote_cmd "${envs[@]}")}"
remote+=" && { $(quote_cmd "${train[@]}") > >(tee -a \"\$LOG\") 2>&1 & PID=\$!; echo \$PID > ~/distfair_train.pid;"
remote+=" wait \$PID; RC=\$?; rm -f ~/distfair_train.pid; sleep 1; $copy_log || true; exit \$RC; }"

ssh_cmd=(gcloud compute tpus tpu-vm ssh "$name" "--zone=$ZONE" --worker=all "--command=$remote")
[[ -n "$PROJECT" ]] && ssh_cmd+=("--project=$PROJECT")
if (( DRY_RUN )); then
  echo "mkdir -p $(quote_cmd "$log_dir")"
  echo "$(quote_cmd "${ssh_cmd[@]}") 2>&1 | tee -a $(quote_cmd "$log_dir/all-workers.log")"
  exit 0
fi
mkdir -p "$log_dir"
log "running on every worker of '$name': $(quote_cmd "${train[@]}")"
set +e
"${ssh_cmd[@]}" 2>&1 | tee -a "$log_dir/all-workers.log"
rc=${PIPESTATUS[0]}
set -e
log "finished with exit code $rc (logs: $log_dir/all-workers.log; per worker: $run_dir/logs/)"
exit "$rc"
