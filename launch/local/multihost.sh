#!/usr/bin/env bash
# A pod rehearsal on one machine: `distfair COMMAND` as N JAX processes, exactly as on N hosts.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../_lib.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") [--devices-per-process D] [--port PORT] [--log-dir DIR] [--dry-run]
                    N COMMAND [ARGUMENTS]...

Runs 'distfair COMMAND ARGUMENTS...' as N processes on this machine's CPU, each with D devices, with
the per-worker environment of a multi-host job (what launch/gpu/run.sh exports on every host):
  JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT  JAX_NUM_PROCESSES=N  JAX_PROCESS_ID=0..N-1
plus JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo (collectives between the processes),
XLA_FLAGS=--xla_force_host_platform_device_count=D and JAX_PLATFORMS=cpu. Every process runs the same
program; process 0 writes the run files. So the pod path (jax.distributed, data sharded by process,
collective checkpoints, agreement on preemption) is the one exercised here.

  N                          number of processes (>= 1)
  COMMAND [ARGUMENTS]...     a distfair command: train, eval, export, report, ...
  --devices-per-process D    CPU devices per process (default 4)
  --port PORT                the coordinator's port on 127.0.0.1 (default: a free one)
  --log-dir DIR              where process-I.log go (default: logs/multihost); process 0 also prints
  --dry-run                  print the processes' environments and commands instead of running them
  -h, --help                 this help

The processes run \$PYTHON (default python3) -m distfair_jax.cli: activate the environment that has
distfair_jax installed, or set PYTHON.

SIGTERM or SIGINT to this script goes on to every process (the training saves a checkpoint on all of
them at the same step and exits 143). Exit code: 0 when every process succeeds, else the first
failing process's status.

Examples:
  $(basename "$0") 2 train configs/experiments/tiny.yaml run_dir=runs/rehearsal
  $(basename "$0") 2 eval runs/rehearsal rounds=20
USAGE
}

devices=4 port="" log_dir="logs/multihost" dry=0
while (( $# )); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --devices-per-process) need_value "$1" $#; devices="$2"; shift 2 ;;
    --devices-per-process=*) devices="${1#*=}"; shift ;;
    --port) need_value "$1" $#; port="$2"; shift 2 ;;
    --port=*) port="${1#*=}"; shift ;;
    --log-dir) need_value "$1" $#; log_dir="$2"; shift 2 ;;
    --log-dir=*) log_dir="${1#*=}"; shift ;;
    --dry-run) dry=1; shift ;;
    -*) die "unknown option '$1'" ;;
    *) break ;;
  esac
done
(( $# >= 2 )) || die "N COMMAND: expected a process count and a distfair command"
nproc="$1"; shift
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die "N: expected a positive integer, got '$nproc'"
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || die "--devices-per-process: expected a positive integer, got '$devices'"
[[ "$1" =~ ^[a-z]+$ ]] || die "COMMAND: expected a distfair command such as train or eval, got '$1'"
if [[ -z "$port" ]]; then
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
if ! [[ "$port" =~ ^[0-9]{1,5}$ ]] || (( port < 1 || port > 65535 )); then
  die "--port: expected a port number, got '$port'"
fi

cmd=("${PYTHON:-python3}" -m distfair_jax.cli "$@")
common=("JAX_COORDINATOR_ADDRESS=127.0.0.1:$port" "JAX_NUM_PROCESSES=$nproc"
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo" "XLA_FLAGS=--xla_force_host_platform_device_count=$devices"
        "JAX_PLATFORMS=cpu" "PYTHONUNBUFFERED=1")
if (( dry )); then
  echo "mkdir -p $(quote_cmd "$log_dir")"
  for (( i = 0; i < nproc; i++ )); do
    echo "$(quote_cmd env "${common[@]}" "JAX_PROCESS_ID=$i" "${cmd[@]}") > $(quote_cmd "$log_dir/process-$i.log") 2>&1 &"
  done
  echo "wait"
  exit 0
fi

mkdir -p "$log_dir"
pids=()
# shellcheck disable=SC2329  # invoked by the traps below
forward() {  # pass a signal on to every process
  local p
  for p in "${pids[@]}"; do kill -s "$1" "$p" 2> /dev/null || true; done
}
trap 'forward TERM' TERM
trap 'forward INT' INT
log "$nproc processes x $devices CPU devices, coordinator 127.0.0.1:$port, logs in $log_dir"
for (( i = 0; i < nproc; i++ )); do
  env "${common[@]}" "JAX_PROCESS_ID=$i" "${cmd[@]}" > "$log_dir/process-$i.log" 2>&1 &
  pids+=("$!")
done
tail -n +1 -f "$log_dir/process-0.log" --pid "${pids[0]}" &
tailer=$!
rc=0
for p in "${pids[@]}"; do
  # `wait` returns early when a trapped signal arrives: wait again until the process is gone, then
  # once more for its own exit status (bash keeps it).
  while kill -0 "$p" 2> /dev/null; do wait "$p" || true; done
  status=0
  wait "$p" || status=$?
  (( rc != 0 || status == 0 )) || rc=$status
done
wait "$tailer" 2> /dev/null || true
exit "$rc"
