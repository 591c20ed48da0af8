#!/usr/bin/env bash
# Create .venv with Python 3.12 (python3.12 on PATH, else a pyenv-installed 3.12) and install the package
# with its test extras. Safe to rerun; reuses pip's cache. Used by the README commands and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
    if python3.12 -c "" >/dev/null 2>&1; then echo python3.12; return; fi
    for p in "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 \
             /usr/bin/python3.12 /usr/local/bin/python3.12; do
        if [ -x "$p" ] && "$p" -c "" >/dev/null 2>&1; then echo "$p"; return; fi
    done
    echo "no working python3.12 found (install Python 3.12)" >&2; exit 1
}

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null; then
    PY=$(find_python)
    echo "creating .venv with $PY ($($PY --version))"
    rm -rf .venv
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "WARNING: Location" || true
.venv/bin/python -c "import pmp_megatron.mcore" 2>/dev/null || { echo "install failed: pmp_megatron does not import" >&2; exit 1; }
echo "ready: .venv ($(.venv/bin/python --version))"
