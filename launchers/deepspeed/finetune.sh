#!/usr/bin/env bash
# Single-node fine-tuning with the DeepSpeed launcher (one process per GPU, or per CPU rank).
#
#   NUM_GPUS=2 CONFIG=configs/finetune_zero2.json launchers/deepspeed/finetune.sh \
#       --model runs/100m/hf --train data/gsm8k-train --out runs/ft-attent
#
# NUM_GPUS     processes to start (default 1)
# CONFIG       DeepSpeed JSON; its "attent" section switches the teacher on
#              (default configs/finetune_zero2.json)
# MASTER_PORT  rendezvous port on this machine (default 29500); set another for a second job
# VENV         environment with attent-scale installed (default: .venv of this checkout, as
#              `make setup` makes it; else the commands on PATH)
# DEEPSPEED    the deepspeed command (default: $VENV/bin/deepspeed, else deepspeed on PATH)
# Any further arguments go to attent_scale.finetune (see --help), e.g. --epochs, --lora-rank.
set -euo pipefail
NUM_GPUS=${NUM_GPUS:-1}
CONFIG=${CONFIG:-configs/finetune_zero2.json}
MASTER_PORT=${MASTER_PORT:-29500}
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"
DEEPSPEED=${DEEPSPEED:-$(project_tool deepspeed)}
exec "$DEEPSPEED" --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" \
    --module attent_scale.finetune --deepspeed "$CONFIG" "$@"
