#!/usr/bin/env bash
# Idempotent set-up of .venv: CPU torch first (so no CUDA build is pulled in), then fmn-pl editable with
# its dev and notebook extras. Re-installs only when pyproject.toml changed since the last set-up.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_SPEC="${FMN_PL_TORCH:-torch==2.13.0}"  # the CPU wheel that installs from local disk here
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.fmn-pl-setup
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && python -c "import fmn_pl, torch, pytest" 2>/dev/null; then
    exit 0
fi
python -m pip install --quiet "$TORCH_SPEC"
python -m pip install --quiet -e '.[dev,notebooks]'
echo "$want" > "$stamp"
python -c "import torch, transformers, lightning; print(f'set up: torch {torch.__version__}, transformers {transformers.__version__}, lightning {lightning.__version__}')"
