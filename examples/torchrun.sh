#!/usr/bin/env bash
# The whole pipeline on one machine with N GPUs, started by torchrun (one pipeline process per GPU):
#   examples/torchrun.sh configs/pipeline/paper.yaml 4
# Every rank runs the stages that use the devices (fine-tuning and artifact passes, under DDP: torchrun's
# variables tell Lightning each process's rank); merges and the report run on rank 0 alone. Each stage's log
# is <output>/logs/<stage>.log (rank 0) and <stage>.rank<N>.log (the others). Rerunning skips what is done.
# Without torchrun the same works too: `fmn-pl pipeline --config C --trainer.devices 4 --trainer.strategy ddp`
# lets Lightning start the ranks of each stage itself.
set -euo pipefail
CONFIG=${1:-configs/pipeline/paper.yaml}
NPROC=${2:-2}
shift $(( $# > 2 ? 2 : $# ))
exec torchrun --standalone --nproc_per_node "$NPROC" -m fmn_pl.cli pipeline --config "$CONFIG" \
    --trainer.devices "$NPROC" --trainer.num_nodes 1 --trainer.strategy ddp "$@"
