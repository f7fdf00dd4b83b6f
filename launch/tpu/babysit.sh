#!/usr/bin/env bash
# Keep a training run going on a spot TPU VM slice: re-create the slice when it is preempted and rerun.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../_lib.sh"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
  cat <<USAGE
Usage: $(basename "$0") NAME CONFIG [KEY=VALUE]... --type TYPE --zone ZONE --run-dir gs://BUCKET/PATH
                 [--spot | --on-demand] [--version RUNTIME] [--max-retries N] [--retry-wait SECONDS]
                 [--setup] [--source DIR] [--ckpt SRC]... [--env NAME=VALUE]... [--log-dir DIR]
                 [--project PROJECT] [--dry-run]

Run CONFIG on the slice NAME until the training finishes. Before each attempt the slice's state is
read (gcloud compute tpus tpu-vm describe): a missing slice is created (create.sh) and set up
(setup.sh); a PREEMPTED / TERMINATED / STOPPED one is deleted first and then re-created. Then run.sh
runs the training; it resumes from the latest checkpoint in --run-dir, so no step is repeated beyond
the last checkpoint (config checkpoint.every_steps; a SIGTERM at preemption also saves one). Stops
with 0 when the training succeeds, with 2 when it reports a bad config or input (retrying would not
help), and with 1 after --max-retries failed attempts.

  NAME, CONFIG, KEY=VALUE   as for run.sh
  --type TYPE        accelerator type for create.sh, e.g. v5litepod-16 or v4-32
  --zone ZONE        zone (default: \$CLOUDSDK_COMPUTE_ZONE)
  --run-dir DIR      gs://BUCKET/PATH (required: a re-created slice has empty disks)
  --spot             spot capacity (the point of this script); --on-demand also works (the default
                     of create.sh); default here: --spot
  --version RUNTIME  TPU VM runtime version (create.sh's default by type)
  --max-retries N    attempts before giving up (default: 10)
  --retry-wait S     seconds between attempts (default: 120)
  --setup            also run setup.sh when the slice already exists and is READY at the start
  --source DIR, --ckpt SRC   passed to setup.sh
  --env, --log-dir   passed to run.sh
  --project PROJECT  Google Cloud project
  --dry-run          print the commands of one attempt (slice missing) instead of running them
  -h, --help         this help

Example:
  $(basename "$0") distfair-v5e configs/experiments/gender_real_uk/llama3.1-8b.yaml --type v5litepod-16 \\
      --zone us-west4-a --run-dir gs://my-bucket/runs/gender_real_uk/llama3.1-8b \\
      --ckpt gs://my-bucket/ckpt/llama3.1-8b
USAGE
}

name="" config="" type="" version="" run_dir="" spot=1 retries=10 wait_s=120 force_setup=0
overrides=() setup_args=() run_args=()
while (( $# )); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --type) need_value "$1" $#; type="$2"; shift 2 ;;
    --type=*) type="${1#*=}"; shift ;;
    --zone) need_value "$1" $#; ZONE="$2"; shift 2 ;;
    --zone=*) ZONE="${1#*=}"; shift ;;
    --run-dir) need_value "$1" $#; run_dir="$2"; shift 2 ;;
    --run-dir=*) run_dir="${1#*=}"; shift ;;
    --version) need_value "$1" $#; version="$2"; shift 2 ;;
    --version=*) version="${1#*=}"; shift ;;
    --spot) spot=1; shift ;;
    --on-demand) spot=0; shift ;;
    --max-retries) need_value "$1" $#; retries="$2"; shift 2 ;;
    --max-retries=*) retries="${1#*=}"; shift ;;
    --retry-wait) need_value "$1" $#; wait_s="$2"; shift 2 ;;
    --retry-wait=*) wait_s="${1#*=}"; shift ;;
    --setup) force_setup=1; shift ;;
    --source | --ckpt) need_value "$1" $#; setup_args+=("$1" "$2"); shift 2 ;;
    --source=* | --ckpt=*) setup_args+=("$1"); shift ;;
    --env | --log-dir) need_value "$1" $#; run_args+=("$1" "$2"); shift 2 ;;
    --env=* | --log-dir=*) run_args+=("$1"); shift ;;
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
[[ -n "$config" ]] || die "CONFIG: expected an experiment YAML"
[[ -n "$type" ]] || die "--type: expected an accelerator type such as v5litepod-16 or v4-32 (to re-create the slice)"
check_type "$type"
check_zone "$ZONE"
check_project "$PROJECT"
check_run_dir "$run_dir"
[[ "$run_dir" == gs://* ]] || die "--run-dir: expected gs://BUCKET/PATH (a re-created slice starts with empty disks), got '$run_dir'"
[[ "$retries" =~ ^[1-9][0-9]*$ ]] || die "--max-retries: expected a positive integer, got '$retries'"
[[ "$wait_s" =~ ^[0-9]+$ ]] || die "--retry-wait: expected a number of seconds, got '$wait_s'"

common=("--zone=$ZONE")
[[ -n "$PROJECT" ]] && common+=("--project=$PROJECT")
(( DRY_RUN )) && common+=(--dry-run)
create_args=("$name" "--type=$type" "${common[@]}")
(( spot )) && create_args+=(--spot)
[[ -n "$version" ]] && create_args+=("--version=$version")
run_cmd=("$here/run.sh" "$name" "$config" "${overrides[@]}" "--run-dir=$run_dir" "--type=$type"
         "${run_args[@]}" "${common[@]}")
# Validate run.sh's arguments now (not after renting a slice).
"$here/run.sh" "$name" "$config" "${overrides[@]}" "--run-dir=$run_dir" "--type=$type" "${run_args[@]}" \
  "--zone=$ZONE" --dry-run > /dev/null

if (( DRY_RUN )); then
  echo "# babysit '$name': up to $retries attempts, $wait_s s apart; each attempt:"
  quote_cmd gcloud compute tpus tpu-vm describe "$name" "--zone=$ZONE" "--format=value(state)" \
    ${PROJECT:+"--project=$PROJECT"}
  echo "# if PREEMPTED / TERMINATED / STOPPED:"
  gcloud_tpu delete "$name" "--zone=$ZONE" --quiet
  echo "# if missing (or just deleted):"
  "$here/create.sh" "${create_args[@]}"
  "$here/setup.sh" "$name" "${setup_args[@]}" "${common[@]}"
  echo "# then (resumes from the latest checkpoint in $run_dir):"
  "${run_cmd[@]}"
  echo "# exit code 0: done; 2: bad config (stop); anything else: next attempt"
  exit 0
fi

slice_state() {
  local describe=(gcloud compute tpus tpu-vm describe "$name" "--zone=$ZONE" "--format=value(state)")
  [[ -n "$PROJECT" ]] && describe+=("--project=$PROJECT")
  "${describe[@]}" 2>/dev/null || echo MISSING
}

attempt=0
while (( attempt < retries )); do
  attempt=$(( attempt + 1 ))
  state="$(slice_state)"
  [[ -n "$state" ]] || state=MISSING
  log "attempt $attempt/$retries: slice '$name' is $state"
  fresh=0
  case "$state" in
    READY) ;;
    CREATING | STARTING | RESTARTING | REPAIRING)
      log "waiting for '$name' to become READY"; sleep "$wait_s"; attempt=$(( attempt - 1 )); continue ;;
    MISSING) fresh=1 ;;
    *)  # PREEMPTED, TERMINATED, STOPPED, ...
      gcloud_tpu delete "$name" "--zone=$ZONE" --quiet || true
      fresh=1 ;;
  esac
  if (( fresh )); then
    if ! "$here/create.sh" "${create_args[@]}"; then
      log "could not create '$name' (no spot capacity?); retrying in $wait_s s"; sleep "$wait_s"; continue
    fi
  fi
  if (( fresh || force_setup )); then
    force_setup=0
    if ! "$here/setup.sh" "$name" "${setup_args[@]}" "${common[@]}"; then
      log "setup failed; retrying in $wait_s s"; sleep "$wait_s"; continue
    fi
  fi
  set +e
  "${run_cmd[@]}"
  rc=$?
  set -e
  case "$rc" in
    0) log "training finished (attempt $attempt)"; exit 0 ;;
    2) log "the training reported a bad config or input (exit 2): not retrying"; exit 2 ;;
    *) log "training exited with $rc (143: preempted, checkpoint saved); retrying in $wait_s s"
       sleep "$wait_s" ;;
  esac
done
log "giving up after $retries attempts"
exit 1
