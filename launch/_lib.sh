# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run).

# shellcheck disable=SC2034  # globals set here, used by the scripts that source this file
DRY_RUN=0
PROJECT=""
ZONE="${CLOUDSDK_COMPUTE_ZONE:-}"

die() {  # a usage / input error: one line, exit 2
  echo "$(basename "$0"): error: $*" >&2
  echo "Try '$(basename "$0") --help'." >&2
  exit 2
}

log() { echo "[$(basename "$0")] $*" >&2; }

quote_cmd() {  # the command line, quoted so that a shell runs exactly it (copy-pastable)
  local out=() arg q="'"
  for arg in "$@"; do
    if [[ "$arg" =~ ^[-A-Za-z0-9_./:=@,+%]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//$q/$q\\$q$q}'")
    fi
  done
  echo "${out[*]}"
}

run() {  # run a command, or print it under --dry-run
  if (( DRY_RUN )); then
    quote_cmd "$@"
  else
    log "+ $(quote_cmd "$@")"
    "$@"
  fi
}

need_value() {  # need_value OPTION "$#": the option takes a value
  (( $2 >= 2 )) || die "$1: expected a value"
}

gcloud_tpu() {  # the gcloud command group, with --project when given
  local cmd=(gcloud compute tpus tpu-vm "$@")
  [[ -n "$PROJECT" ]] && cmd+=("--project=$PROJECT")
  run "${cmd[@]}"
}

check_name() {
  [[ "$1" =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    die "NAME: expected a TPU name (lowercase letters, digits and '-', starting with a letter), got '$1'"
}

check_zone() {
  [[ -n "$1" ]] || die "--zone: expected a zone such as us-west4-a (or set CLOUDSDK_COMPUTE_ZONE)"
  [[ "$1" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone: expected a zone such as us-west4-a, got '$1'"
}

check_type() {
  [[ "$1" =~ ^(v2|v3|v4|v5litepod|v5p|v6e)-[0-9]+$ ]] ||
    die "--type: expected an accelerator type such as v5litepod-16 or v4-32 (v2, v3, v4, v5litepod, v5p, v6e), got '$1'"
}

check_project() {
  [[ -z "$1" || "$1" =~ ^[a-z][-a-z0-9]{4,28}[a-z0-9]$ ]] || die "--project: expected a project id, got '$1'"
}

default_version() {  # the TPU VM runtime (software) version for an accelerator type
  case "$1" in
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) echo "tpu-ubuntu2204-base" ;;
  esac
}

num_workers() {  # hosts of a slice: v2/v3/v4/v5p count TensorCores (8 per host); v5e/v6e count chips
  local family="${1%-*}" n="${1##*-}"
  case "$family" in
    v5litepod | v6e) if (( n <= 8 )); then echo 1; else echo $(( n / 4 )); fi ;;
    *) if (( n <= 8 )); then echo 1; else echo $(( n / 8 )); fi ;;
  esac
}

check_run_dir() {
  [[ -n "$1" ]] || die "--run-dir: expected a directory (gs://bucket/path, or a path on the workers)"
  [[ "$1" != *" "* ]] || die "--run-dir: expected no spaces, got '$1'"
  if [[ "$1" == gs://* ]]; then
    [[ "$1" =~ ^gs://[a-z0-9][-_.a-z0-9]{1,221}[a-z0-9](/.*)?$ ]] || die "--run-dir: expected gs://BUCKET/PATH, got '$1'"
  fi
}
