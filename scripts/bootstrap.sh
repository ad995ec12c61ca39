#!/usr/bin/env bash
# Create .venv and install tlc into it in editable mode with the dev extras.
#
# Idempotent: a stamp file contains the SHA-256 of pyproject.toml from the last successful
# install, so a second run with an unchanged pyproject.toml only checks and exits.
#
# Environment:
#   PYTHON                interpreter for a new .venv (default: python3.11, else python3)
#   TLC_TORCH_SPEC        torch requirement installed first (default: torch==2.13.0)
#   TLC_TORCH_INDEX_URL   extra pip index for torch, for example
#                         https://download.pytorch.org/whl/cpu for the CPU-only wheels
set -euo pipefail

cd "$(dirname "$0")/.."
venv=.venv
stamp="$venv/.tlc-bootstrap-stamp"
torch_spec="${TLC_TORCH_SPEC:-torch==2.13.0}"

if [[ ! -x "$venv/bin/python" ]]; then
    python="${PYTHON:-}"
    if [[ -z "$python" ]]; then
        if command -v python3.11 >/dev/null; then python=python3.11; else python=python3; fi
    fi
    echo "bootstrap: creating $venv with $python" >&2
    "$python" -m venv "$venv"
fi

wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" && -x "$venv/bin/tlc" ]]; then
    exit 0
fi

# torch goes first and pinned, so that resolving the project's dependencies never
# replaces it with another build.
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "bootstrap: installing $torch_spec" >&2
    index=()
    if [[ -n "${TLC_TORCH_INDEX_URL:-}" ]]; then
        index=(--extra-index-url "$TLC_TORCH_INDEX_URL")
    fi
    "$venv/bin/python" -m pip install --quiet "${index[@]}" "$torch_spec"
fi

echo "bootstrap: installing tlc in editable mode" >&2
"$venv/bin/python" -m pip install --quiet -e '.[dev]'
echo "$wanted" > "$stamp"
