#!/usr/bin/env bash
# Install distfair_jax on every worker of a TPU VM slice (and copy converted checkpoints there).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../_lib.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") NAME --zone ZONE [--source DIR] [--ckpt SRC]... [--project PROJECT] [--dry-run]

Copy this checkout to every worker of the slice and install it there (pip install -e '.[tpu]'),
over gcloud compute tpus tpu-vm scp/ssh --worker=all. Lands in ~/distfair_jax on each worker.

  NAME               TPU name
  --zone ZONE        the slice's zone (default: \$CLOUDSDK_COMPUTE_ZONE)
  --source DIR       the checkout to install (default: this repository); .git, .venv and runs/ are left out
  --ckpt SRC         a converted checkpoint (\`distfair convert hf-to-flax\` output) to put in
                     ~/distfair_jax/ckpt/ on every worker: a local directory (scp) or gs://... (copied
                     by the workers with gcloud storage cp); repeatable. The experiment configs expect
                     ckpt/<model> (e.g. --ckpt ckpt/llama3.2-1b) or model.checkpoint=... on run.sh
  --project PROJECT  Google Cloud project
  --dry-run          print the commands instead of running them
  -h, --help         this help

Example:
  $(basename "$0") distfair-v5e --zone us-west4-a --ckpt gs://my-bucket/ckpt/llama3.2-1b
USAGE
}

name="" source_dir="" ckpts=()
while (( $# )); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --zone) need_value "$1" $#; ZONE="$2"; shift 2 ;;
    --zone=*) ZONE="${1#*=}"; shift ;;
    --source) need_value "$1" $#; source_dir="$2"; shift 2 ;;
    --source=*) source_dir="${1#*=}"; shift ;;
    --ckpt) need_value "$1" $#; ckpts+=("$2"); shift 2 ;;
    --ckpt=*) ckpts+=("${1#*=}"); shift ;;
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
[[ -n "$source_dir" ]] || source_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
[[ -f "$source_dir/pyproject.toml" ]] || die "--source: expected a distfair_jax checkout (with pyproject.toml), got '$source_dir'"
for c in "${ckpts[@]}"; do
  if [[ "$c" == gs://* ]]; then
    [[ "$c" =~ ^gs://[a-z0-9][-_.a-z0-9]*[a-z0-9]/.+$ ]] || die "--ckpt: expected gs://BUCKET/PATH, got '$c'"
  else
    [[ -f "$c/model_config.json" ]] ||
      (( DRY_RUN )) || die "--ckpt: expected a directory from \`distfair convert hf-to-flax\` (with model_config.json), got '$c'"
  fi
done

tarball="${TMPDIR:-/tmp}/distfair_src_${name}.tgz"
remote_tgz="distfair_src.tgz"
run tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=.ci-venv --exclude=runs \
  --exclude=ckpt --exclude=__pycache__ -C "$source_dir" .
gcloud_tpu scp "$tarball" "$name:$remote_tgz" "--zone=$ZONE" --worker=all
install="mkdir -p ~/distfair_jax/ckpt && tar -xzf ~/$remote_tgz -C ~/distfair_jax && cd ~/distfair_jax"
install+=' && python3 -m pip install -q --upgrade pip && python3 -m pip install -q -e ".[tpu]"'
# shellcheck disable=SC2016  # expanded on the worker
install+=' && python3 -m distfair_jax.cli --help > /dev/null && echo "distfair_jax installed on $(hostname)"'
gcloud_tpu ssh "$name" "--zone=$ZONE" --worker=all "--command=$install"
for c in "${ckpts[@]}"; do
  if [[ "$c" == gs://* ]]; then
    gcloud_tpu ssh "$name" "--zone=$ZONE" --worker=all "--command=gcloud storage cp -r $c ~/distfair_jax/ckpt/"
  else
    gcloud_tpu scp --recurse "$c" "$name:distfair_jax/ckpt/" "--zone=$ZONE" --worker=all
  fi
done
(( DRY_RUN )) || rm -f "$tarball"
