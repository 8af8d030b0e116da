#!/usr/bin/env bash
# Create (or reuse) a separate venv for decoderesearch/circuit-tracer, whose pins
# (transformers<=4.57.3, TransformerLens 3.x) conflict with the project's own venv.
#   usage: setup_venv.sh DIR
# Idempotent: a DIR whose venv already imports circuit_tracer with the pinned versions is left alone.
# torch is installed first and pinned, so pip takes the CPU wheel on disk instead of a CUDA build.
set -euo pipefail

TORCH_VERSION="${CT_TORCH_VERSION:-2.13.0}"
CT_SPEC="${CT_SPEC:-circuit-tracer>=0.5,<0.6}"
TRANSFORMERS_SPEC="transformers>=4.56,<=4.57.3"
TL_SPEC="transformer-lens>=3,<4"
EXTRA=(pyyaml numpy)

die() { echo "setup_venv.sh: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: setup_venv.sh DIR"
DIR="$1"
PY="$DIR/bin/python"

check() {
    "$PY" - "$TORCH_VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
import circuit_tracer, transformer_lens, transformers, torch, yaml, numpy  # noqa: F401
tv = tuple(int(x) for x in version("transformers").split(".")[:3])
assert tv <= (4, 57, 3), tv
assert version("transformer-lens").split(".")[0] == "3"
assert version("torch").split("+")[0] == sys.argv[1]
EOF
}

if [ -x "$PY" ] && check; then
    "$PY" -c 'from importlib.metadata import version as v; print("circuit-tracer venv ok:", *(f"{p}=={v(p)}" for p in ("circuit-tracer", "transformer-lens", "transformers", "torch")))'
    exit 0
fi

command -v python3 >/dev/null || die "python3 not found"
[ -x "$PY" ] || python3 -m venv "$DIR" >/dev/null || die "cannot create a venv at $DIR"
PIP=("$PY" -m pip install -q --disable-pip-version-check --no-input)

# 1. torch alone and first: a later unpinned resolve would otherwise pull a multi-GB CUDA build.
"${PIP[@]}" "torch==$TORCH_VERSION" 2>"$DIR/setup.log" \
    || die "cannot install torch==$TORCH_VERSION (see $DIR/setup.log)"
# 2. the rest, with torch held at what is installed.
echo "torch==$TORCH_VERSION" >"$DIR/torch-pin.txt"
"${PIP[@]}" -c "$DIR/torch-pin.txt" "$CT_SPEC" "$TRANSFORMERS_SPEC" "$TL_SPEC" "${EXTRA[@]}" 2>>"$DIR/setup.log" \
    || die "cannot install $CT_SPEC with $TRANSFORMERS_SPEC and $TL_SPEC (see $DIR/setup.log)"

check || die "venv at $DIR installed but circuit_tracer does not import with the pinned versions (see $DIR/setup.log)"
"$PY" -m pip freeze --disable-pip-version-check >"$DIR/versions.txt" 2>/dev/null || true
"$PY" -c 'from importlib.metadata import version as v; print("circuit-tracer venv ok:", *(f"{p}=={v(p)}" for p in ("circuit-tracer", "transformer-lens", "transformers", "torch")))'
