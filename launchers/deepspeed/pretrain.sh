#!/usr/bin/env bash
# Single-node pretraining with the DeepSpeed launcher (one process per GPU, or per CPU rank).
#
#   NUM_GPUS=2 CONFIG=configs/zero2.json launchers/deepspeed/pretrain.sh --out runs/zero2
#
# NUM_GPUS     processes to start (default 1)
# CONFIG       DeepSpeed JSON; its "attent" section switches the teacher on
#              (default configs/zero1.json)
# MASTER_PORT  rendezvous port on this machine (default 29500); set another for a second job
# VENV         environment with attent-scale installed (default: .venv of this checkout, as
#              `make setup` makes it; else the commands on PATH)
# DEEPSPEED    the deepspeed command (default: $VENV/bin/deepspeed, else deepspeed on PATH)
# Any further arguments go to attent_scale.pretrain (see --help), e.g. --epochs, --model, --data.
set -euo pipefail
NUM_GPUS=${NUM_GPUS:-1}
CONFIG=${CONFIG:-configs/zero1.json}
MASTER_PORT=${MASTER_PORT:-29500}
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"
DEEPSPEED=${DEEPSPEED:-$(project_tool deepspeed)}
exec "$DEEPSPEED" --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" \
    --module attent_scale.pretrain --deepspeed_config "$CONFIG" "$@"
