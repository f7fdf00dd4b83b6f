#!/usr/bin/env bash
# Create a TPU VM slice (spot or on-demand).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../_lib.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") NAME --type TYPE --zone ZONE [--spot | --on-demand] [--version RUNTIME]
                 [--project PROJECT] [--dry-run]

Create a TPU VM slice with gcloud compute tpus tpu-vm create.

  NAME               TPU name (lowercase letters, digits, '-')
  --type TYPE        accelerator type, e.g. v5litepod-16 (16 v5e chips, 4 hosts) or v4-32 (16 v4 chips, 4 hosts)
  --zone ZONE        zone with capacity for TYPE, e.g. us-west4-a (v5e) or us-central2-b (v4);
                     default: \$CLOUDSDK_COMPUTE_ZONE
  --spot             spot (preemptible) capacity: cheaper, may be reclaimed; see babysit.sh
  --on-demand        on-demand capacity (the default)
  --version RUNTIME  TPU VM runtime version; default by type: v5litepod-* v2-alpha-tpuv5-lite,
                     v5p-* v2-alpha-tpuv5, v6e-* v2-alpha-tpuv6e, v2/v3/v4 tpu-ubuntu2204-base
  --project PROJECT  Google Cloud project (default: gcloud's configured project)
  --dry-run          print the gcloud command instead of running it
  -h, --help         this help

Example:
  $(basename "$0") distfair-v5e --type v5litepod-16 --zone us-west4-a --spot
USAGE
}

name="" type="" version="" spot=0
while (( $# )); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --type) need_value "$1" $#; type="$2"; shift 2 ;;
    --type=*) type="${1#*=}"; shift ;;
    --zone) need_value "$1" $#; ZONE="$2"; shift 2 ;;
    --zone=*) ZONE="${1#*=}"; shift ;;
    --version) need_value "$1" $#; version="$2"; shift 2 ;;
    --version=*) version="${1#*=}"; shift ;;
    --project) need_value "$1" $#; PROJECT="$2"; shift 2 ;;
    --project=*) PROJECT="${1#*=}"; shift ;;
    --spot) spot=1; shift ;;
    --on-demand) spot=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -*) die "unknown option '$1'" ;;
    *) [[ -z "$name" ]] || die "unexpected argument '$1' (NAME is '$name')"; name="$1"; shift ;;
  esac
done

[[ -n "$name" ]] || die "NAME: expected the TPU name"
check_name "$name"
[[ -n "$type" ]] || die "--type: expected an accelerator type such as v5litepod-16 or v4-32"
check_type "$type"
check_zone "$ZONE"
check_project "$PROJECT"
[[ -n "$version" ]] || version="$(default_version "$type")"
[[ "$version" =~ ^[-a-z0-9.]+$ ]] || die "--version: expected a runtime version such as v2-alpha-tpuv5-lite, got '$version'"

args=(create "$name" "--zone=$ZONE" "--accelerator-type=$type" "--version=$version")
(( spot )) && args+=(--spot)
(( DRY_RUN )) || log "creating $type ($(num_workers "$type") hosts, $( (( spot )) && echo spot || echo on-demand)) '$name' in $ZONE"
gcloud_tpu "${args[@]}"
