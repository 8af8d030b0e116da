#!/usr/bin/env bash
# Set up, then run the test suite. pytest's "no tests collected" (exit 5) is not a failure here.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# circuit-tracer in its own venv (its pins conflict with ours): the agreement tests compare with it, so a
# venv that cannot be built fails the run here, with the reason, instead of skipping them
ct_venv=${CIRCUIT_CATALOG_CT_VENV:-${CIRCUIT_CATALOG_CACHE:-$HOME/.cache/circuit-catalog}/circuit-tracer-venv}
bash bench/circuit_tracer/setup_venv.sh "$ct_venv" || { echo "test.sh: circuit-tracer's venv could not be built (above)" >&2; exit 1; }
export CIRCUIT_CATALOG_CT_VENV=$ct_venv
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "no tests collected"
    exit 0
fi
exit "$rc"
