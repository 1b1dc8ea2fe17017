#!/usr/bin/env bash
# The README's demo in one step: set up .venv if needed (scripts/setup.sh), then run the pipeline of
# configs/pipeline/demo.yaml (the real all-MiniLM-L6-v2 and GLUE data from ../shared; about 10 minutes on 2
# quiet CPU cores). The report lands in runs/demo/report.md. A second run finds everything up to date.
# Extra arguments go to the pipeline, e.g. `scripts/demo.sh --dry_run true` or `scripts/demo.sh --rerun merge`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false  # everything is local
exec fmn-pl pipeline --config configs/pipeline/demo.yaml "$@"
