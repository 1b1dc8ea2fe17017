#!/usr/bin/env bash
# Queue the paper's setting on a Slurm cluster: one fine-tuning job per task (in parallel), then one job for
# the artifacts, merges and report once they all succeeded.   examples/slurm/submit.sh [config]
# Run from the repository root with the environment that has fmn-pl installed (sbatch passes it on). The
# nodes need the model and data: download them once first (e.g. a dry run on a login node with internet
# checks the config; `huggingface-cli download bert-base-uncased` fills the cache), or point `model` and
# `data_dir` at local folders. Output: <config's output>/report.md; `stamps/` tells what is finished.
set -euo pipefail
export CONFIG=${1:-configs/pipeline/paper.yaml}
export TASKS=${TASKS:-"mnli qqp qnli sst2 stsb mrpc rte"}
mkdir -p logs
fmn-pl pipeline --config "$CONFIG" --dry_run true > /dev/null  # fail here, not in the queue
n=$(wc -w <<< "$TASKS")
fit=$(sbatch --parsable --array=0-$((n - 1)) examples/slurm/fit.sbatch)
sbatch --dependency=afterok:"$fit" examples/slurm/merge.sbatch
