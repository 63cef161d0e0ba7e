#!/usr/bin/env bash
# FSDP2 pretraining under torchrun, on one node or several (one process per GPU, or per CPU rank).
#
# One node, 8 GPUs:
#   NPROC_PER_NODE=8 CONFIG=configs/fsdp.json launchers/torchrun/pretrain_fsdp.sh --out runs/fsdp
# Two nodes: run the same line on both, NODE_RANK=0 on the node whose address is MASTER_ADDR:
#   NNODES=2 NODE_RANK=0 NPROC_PER_NODE=8 MASTER_ADDR=10.0.0.1 launchers/torchrun/pretrain_fsdp.sh \
#       --out /nfs/runs/fsdp --data /nfs/corpus
#   NNODES=2 NODE_RANK=1 NPROC_PER_NODE=8 MASTER_ADDR=10.0.0.1 launchers/torchrun/pretrain_fsdp.sh \
#       --out /nfs/runs/fsdp --data /nfs/corpus
#
# NNODES          nodes in the job (default 1)
# NODE_RANK       this node's index, 0..NNODES-1 (default 0)
# NPROC_PER_NODE  processes on this node, one per GPU (default 1)
# MASTER_ADDR     address of node 0, reachable from every node (default 127.0.0.1)
# MASTER_PORT     rendezvous port on node 0 (default 29500); set another for a second job
# CONFIG          DeepSpeed-style JSON; FSDP2 reads its batch, optimizer, scheduler and bf16 keys,
#                 and its "attent" section switches the teacher on (default configs/fsdp.json)
# VENV            environment with attent-scale installed (default: .venv of this checkout, as
#                 `make setup` makes it; else torchrun on PATH)
# TORCHRUN        the torchrun command (default: $VENV/bin/torchrun, else torchrun on PATH)
# Any further arguments go to attent_scale.pretrain_fsdp (see --help). With several nodes, --out
# must be on a filesystem every node sees (checkpoints are written by every rank), and so must
# --data unless the corpus is read through --remote (then --data is each node's local cache).
set -euo pipefail
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
CONFIG=${CONFIG:-configs/fsdp.json}
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"
TORCHRUN=${TORCHRUN:-$(project_tool torchrun)}
exec "$TORCHRUN" --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m attent_scale.pretrain_fsdp --config "$CONFIG" "$@"
