#!/usr/bin/env bash
# The test command (README, CI): set up .venv if needed, then run the whole suite on CPU.
# Extra arguments go to pytest, e.g. `scripts/test.sh tests/test_data.py -x` or `scripts/test.sh -m "not real"`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false  # tests never download
if [ ! -d ../shared ]; then
    echo "note: ../shared is absent: the tests marked real (MiniLM, real GLUE files) will be skipped"
fi
ruff check . && ruff format --check --quiet .  # lint and format first: seconds, and they fail fast
mypy  # the type checker over fmn_pl ([tool.mypy] in pyproject.toml)
# -rs prints every skip with its reason. pytest's exit status 5 (nothing collected) stays a failure:
# the suite always has tests, so it can only mean a broken collection or a filter that matched nothing.
exec python -m pytest -q -rs --durations=15 "$@"
