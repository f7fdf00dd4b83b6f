#!/usr/bin/env bash
# Run `distfair train` on a GPU host (all its GPUs), or as one process of a multi-host GPU job.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../_lib.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") CONFIG [KEY=VALUE]... [--run-dir DIR] [--gpus LIST]
                 [--coordinator HOST:PORT --num-processes N --process-id I]
                 [--log-dir DIR] [--dry-run]

One host: one process drives every visible GPU (a mesh over all of them; choose its axes with
mesh.data / mesh.fsdp / mesh.tensor overrides, see \`distfair plan\`).
Several hosts: run this script once on every host with the same --coordinator (host 0's address and
a free port) and --num-processes, and --process-id 0..N-1. It exports
  JAX_COORDINATOR_ADDRESS=HOST:PORT  JAX_NUM_PROCESSES=N  JAX_PROCESS_ID=I
which the training passes to jax.distributed.initialize(coordinator_address, num_processes,
process_id) before touching a device (jax itself reads only JAX_COORDINATOR_ADDRESS). The run
directory must be shared by all hosts (gs://... or a network filesystem). Under SLURM or Open MPI,
jax.distributed.initialize() finds these values itself: leave the options out.

  CONFIG             experiment YAML, e.g. configs/experiments/gender_real_us/llama3.2-1b.yaml
  KEY=VALUE          config overrides, e.g. model.checkpoint=ckpt/llama3.2-1b mesh.fsdp=8
  --run-dir DIR      run directory (default: the config's run_dir)
  --gpus LIST        GPUs of this host to use, e.g. 0,1,2,3 (CUDA_VISIBLE_DEVICES; default: all)
  --coordinator HOST:PORT, --num-processes N, --process-id I   multi-host (all three, or none)
  --log-dir DIR      where this process's log goes (default: logs/<config name>): process-I.log
  --dry-run          print the environment and the command instead of running them
  -h, --help         this help

Exit code: the training's (0 done, 1 failed, 2 bad config, 143 preempted: rerun to resume).

Examples:
  $(basename "$0") configs/experiments/gender_real_us/llama3.2-1b.yaml model.checkpoint=ckpt/llama3.2-1b
  # host 0 and host 1 of a 2-host job:
  $(basename "$0") CONFIG --run-dir gs://b/run --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0
  $(basename "$0") CONFIG --run-dir gs://b/run --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 1
USAGE
}

config="" run_dir="" gpus="" coordinator="" nproc="" pid="" log_dir="" dry=0 overrides=()
while (( $# )); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --run-dir) need_value "$1" $#; run_dir="$2"; shift 2 ;;
    --run-dir=*) run_dir="${1#*=}"; shift ;;
    --gpus) need_value "$1" $#; gpus="$2"; shift 2 ;;
    --gpus=*) gpus="${1#*=}"; shift ;;
    --coordinator) need_value "$1" $#; coordinator="$2"; shift 2 ;;
    --coordinator=*) coordinator="${1#*=}"; shift ;;
    --num-processes) need_value "$1" $#; nproc="$2"; shift 2 ;;
    --num-processes=*) nproc="${1#*=}"; shift ;;
    --process-id) need_value "$1" $#; pid="$2"; shift 2 ;;
    --process-id=*) pid="${1#*=}"; shift ;;
    --log-dir) need_value "$1" $#; log_dir="$2"; shift 2 ;;
    --log-dir=*) log_dir="${1#*=}"; shift ;;
    --dry-run) dry=1; shift ;;
    -*) die "unknown option '$1'" ;;
    *=*) overrides+=("$1"); shift ;;
    *) [[ -z "$config" ]] || die "unexpected argument '$1' (overrides are KEY=VALUE)"; config="$1"; shift ;;
  esac
done

[[ -n "$config" ]] || die "CONFIG: expected an experiment YAML"
[[ -f "$config" ]] || die "CONFIG: expected an existing YAML file, got '$config'"
for o in "${overrides[@]}"; do
  [[ "$o" =~ ^[A-Za-z_][A-Za-z0-9_.]*= ]] || die "KEY=VALUE: expected a dotted config key, got '$o'"
  [[ "$o" != run_dir=* ]] || die "KEY=VALUE: run_dir: use --run-dir, got '$o'"
done
[[ -z "$gpus" || "$gpus" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus: expected GPU indices like 0,1,2,3, got '$gpus'"
set_count=0
for v in "$coordinator" "$nproc" "$pid"; do [[ -n "$v" ]] && set_count=$(( set_count + 1 )); done
(( set_count == 0 || set_count == 3 )) ||
  die "--coordinator, --num-processes, --process-id: expected all three (multi-host) or none (one host)"
if (( set_count == 3 )); then
  [[ "$coordinator" =~ ^[^[:space:]:]+:[0-9]{1,5}$ ]] || die "--coordinator: expected HOST:PORT, got '$coordinator'"
  [[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die "--num-processes: expected a positive integer, got '$nproc'"
  [[ "$pid" =~ ^[0-9]+$ ]] || die "--process-id: expected an integer, got '$pid'"
  (( pid < nproc )) || die "--process-id: expected 0..$(( nproc - 1 )), got '$pid'"
fi
[[ -n "$log_dir" ]] || log_dir="logs/$(basename "${config%.*}")"

env_vars=()
[[ -n "$gpus" ]] && env_vars+=("CUDA_VISIBLE_DEVICES=$gpus")
if (( set_count == 3 )); then
  env_vars+=("JAX_COORDINATOR_ADDRESS=$coordinator" "JAX_NUM_PROCESSES=$nproc" "JAX_PROCESS_ID=$pid")
fi
cmd=(python3 -m distfair_jax.cli train "$config")
[[ -n "$run_dir" ]] && cmd+=("run_dir=$run_dir")
cmd+=("${overrides[@]}")
log_file="$log_dir/process-${pid:-0}.log"

if (( dry )); then
  echo "mkdir -p $(quote_cmd "$log_dir")"
  echo "$(quote_cmd env "${env_vars[@]}" "${cmd[@]}") 2>&1 | tee -a $(quote_cmd "$log_file")"
  exit 0
fi
mkdir -p "$log_dir"
log "$(quote_cmd env "${env_vars[@]}" "${cmd[@]}")  (log: $log_file)"
set +e
env "${env_vars[@]}" "${cmd[@]}" 2>&1 | tee -a "$log_file"
rc=${PIPESTATUS[0]}
set -e
exit "$rc"
