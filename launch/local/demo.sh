#!/usr/bin/env bash
# The whole method in miniature on this machine's CPU: `distfair demo` with the arguments given.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../_lib.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") [--dry-run] [DEMO ARGUMENTS]...

Runs 'distfair demo DEMO ARGUMENTS...' on the CPU (JAX_PLATFORMS=cpu): the built-in tiny Llama, its
tokenizer and data are built offline; nothing is downloaded. See 'distfair demo --help' for its
arguments.

  --dry-run    print the command instead of running it
  -h, --help   this help
USAGE
}

dry=0 args=()
for a in "$@"; do
  case "$a" in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry=1 ;;
    *) args+=("$a") ;;
  esac
done

if command -v distfair > /dev/null 2>&1; then
  cmd=(distfair demo "${args[@]}")
else
  cmd=(python3 -m distfair_jax.cli demo "${args[@]}")
  (( dry )) || python3 -c 'import distfair_jax' 2> /dev/null ||
    { echo "$(basename "$0"): error: distfair_jax is not installed (pip install -e . from the repository root)" >&2; exit 2; }
fi
if (( dry )); then
  echo "JAX_PLATFORMS=cpu $(quote_cmd "${cmd[@]}")"
  exit 0
fi
export JAX_PLATFORMS=cpu
exec "${cmd[@]}"
