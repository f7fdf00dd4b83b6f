#!/usr/bin/env bash
# shellcheck disable=SC2016  # the worker-side commands are single-quoted on purpose: expanded on the worker
# Stop a training run on a TPU VM slice (checkpoint first) and delete the slice.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../_lib.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") NAME --zone ZONE [--grace SECONDS] [--keep-slice] [--project PROJECT] [--dry-run]

Send SIGTERM to the training started by run.sh on every worker (its pid is in ~/distfair_train.pid):
the trainer saves a checkpoint at the next step and exits with 143. Wait up to --grace seconds for it,
then delete the slice (gcloud compute tpus tpu-vm delete), unless --keep-slice. Rerunning run.sh
(on this or a new slice, same --run-dir) resumes from that checkpoint.

  NAME               TPU name
  --zone ZONE        the slice's zone (default: \$CLOUDSDK_COMPUTE_ZONE)
  --grace SECONDS    how long to wait for the checkpoint (default: 300)
  --keep-slice       only stop the training; keep the slice
  --project PROJECT  Google Cloud project
  --dry-run          print the commands instead of running them
  -h, --help         this help
USAGE
}

name="" grace=300 keep=0
while (( $# )); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --zone) need_value "$1" $#; ZONE="$2"; shift 2 ;;
    --zone=*) ZONE="${1#*=}"; shift ;;
    --grace) need_value "$1" $#; grace="$2"; shift 2 ;;
    --grace=*) grace="${1#*=}"; shift ;;
    --keep-slice) keep=1; shift ;;
    --project) need_value "$1" $#; PROJECT="$2"; shift 2 ;;
    --project=*) PROJECT="${1#*=}"; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -*) die "unknown option '$1'" ;;
    *) [[ -z "$name" ]] || die "unexpected argument '$1' (NAME is '$name')"; name="$1"; shift ;;
  esac
done

[[ -n "$name" ]] || die "NAME: expected the TPU name"
check_name "$name"
check_zone "$ZONE"
check_project "$PROJECT"
[[ "$grace" =~ ^[0-9]+$ ]] || die "--grace: expected a number of seconds, got '$grace'"

# On each worker: SIGTERM the run, then wait (up to grace) until it is gone.
term='F=~/distfair_train.pid; if [ -f "$F" ] && kill -0 "$(cat "$F")" 2>/dev/null; then P=$(cat "$F"); kill -TERM "$P";'
term+=" for _ in \$(seq $grace); do kill -0 \"\$P\" 2>/dev/null || break; sleep 1; done;"
term+=' if kill -0 "$P" 2>/dev/null; then echo "$(hostname): still running after the grace period"; else echo "$(hostname): stopped"; fi;'
term+=' else echo "$(hostname): no distfair training running"; fi'
gcloud_tpu ssh "$name" "--zone=$ZONE" --worker=all "--command=$term" || (( DRY_RUN )) ||
  log "could not reach every worker (a preempted slice has no running training)"
if (( ! keep )); then
  gcloud_tpu delete "$name" "--zone=$ZONE" --quiet
fi
