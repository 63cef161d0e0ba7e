#!/usr/bin/env bash
# Multi-node pretraining with the DeepSpeed launcher and a hostfile.
#
# Started once, on the first node: DeepSpeed reaches every host over passwordless ssh (pdsh).
#   HOSTFILE=hostfile CONFIG=configs/zero2.json launchers/deepspeed/multinode.sh --out runs/big
# Started on every node, without ssh (a scheduler, or you, runs one copy per node):
#   node-a$ NODE_RANK=0 HOSTFILE=hostfile launchers/deepspeed/multinode.sh --out runs/big
#   node-b$ NODE_RANK=1 HOSTFILE=hostfile launchers/deepspeed/multinode.sh --out runs/big
#
# HOSTFILE     one "<host> slots=<processes>" line per node; the line order is the node rank
#              (default ./hostfile; see launchers/deepspeed/hostfile.example)
# CONFIG       DeepSpeed JSON; its "attent" section switches the teacher on
#              (default configs/zero1.json)
# MASTER_ADDR  address of the hostfile's first node, reachable from every node
#              (default: that host's name as the hostfile writes it)
# MASTER_PORT  rendezvous port on MASTER_ADDR (default 29500); another one for a second job
# NODE_RANK    set: start only this node's processes, without ssh (0 = the hostfile's first line);
#              unset: start every node from here over ssh
# NUM_NODES    use only the hostfile's first NUM_NODES hosts (default: all of them)
# NUM_GPUS     processes per node (default: each host's slots)
# LAUNCHER     how DeepSpeed reaches the other nodes when NODE_RANK is unset: pdsh (default),
#              openmpi, mpich, impi, mvapich or slurm
# VENV         environment with attent-scale installed (default: .venv of this checkout; else
#              the commands on PATH)
# DEEPSPEED    the deepspeed command (default: $VENV/bin/deepspeed, else deepspeed on PATH)
#
# Any further arguments go to attent_scale.pretrain (see --help). Give every node the same
# --out on a shared file system, and with --remote a --data cache on a node-local disk.
# Over ssh, DeepSpeed forwards only some variables (PYTHON*, NCCL*, UCX*, ...) to the other
# nodes; name any others (OMP_NUM_THREADS, S3_ENDPOINT_URL) in a .deepspeed_env file, one
# KEY=VALUE per line, and keep secrets out of it: DeepSpeed logs that command line.
set -euo pipefail
HOSTFILE=${HOSTFILE:-hostfile}
CONFIG=${CONFIG:-configs/zero1.json}
MASTER_PORT=${MASTER_PORT:-29500}
LAUNCHER=${LAUNCHER:-pdsh}
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"
DEEPSPEED=${DEEPSPEED:-$(project_tool deepspeed)}

if [[ ! -f "$HOSTFILE" ]]; then
    echo "multinode.sh: HOSTFILE=$HOSTFILE does not exist; write one '<host> slots=<n>' line" \
         "per node (see launchers/deepspeed/hostfile.example)" >&2
    exit 2
fi
# The first host that is not a comment: DeepSpeed would otherwise ask it over ssh for its address.
MASTER_ADDR=${MASTER_ADDR:-$(awk '$1 !~ /^#/ && NF {print $1; exit}' "$HOSTFILE")}

args=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
[[ -n "${NUM_NODES:-}" ]] && args+=(--num_nodes "$NUM_NODES")
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num_gpus "$NUM_GPUS")
if [[ -n "${NODE_RANK:-}" ]]; then
    args+=(--no_ssh --node_rank "$NODE_RANK")
else
    args+=(--launcher "$LAUNCHER")
fi
exec "$DEEPSPEED" "${args[@]}" --module attent_scale.pretrain --deepspeed_config "$CONFIG" "$@"
