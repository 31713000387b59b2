#!/bin/bash
# Any recipe on a SLURM GPU cluster: one `accelerate launch` per node, started by srun; each launcher
# starts one process per GPU and meets the others at the first node (torchrun's rendezvous, RDZV_BACKEND).
#
#   sbatch --nodes 2 recipes/slurm.sh recipes/e2e.py --config recipes/configs/e2e.yaml \
#       data.shards=/shared/cohort/shards out=/shared/runs/e2e resume=true
#
# `out` must be on a filesystem every node sees. With resume=true and --max_restarts, a process that dies
# restarts all of them, which continue from the last checkpoint. torch 2.14's default static rendezvous
# keeps one store across attempts, and a restarted process can read the address a dead one published there
# ("Gloo connectFullMesh failed ... Connection refused"); RDZV_BACKEND=c10d makes each attempt a new round
# with a store of its own (tested on one machine; the suite's two launchers on one host hang in it, so this
# script's test runs the static default). On CPU-only nodes set
# ACCELERATE_USE_CPU=true (without it --multi_gpu starts processes that each run alone) and GPUS_PER_NODE.
#SBATCH --job-name=hipt-e2e
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
# sed reads every line (head would stop early, and pipefail would fail the job on scontrol's SIGPIPE)
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
MAIN_PORT=${MAIN_PORT:-29500}
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1  # with c10d: the workers' store is made per round, not shared

# -q: a user error ends the job as the recipe's one `error:` line, without accelerate's Python traceback around it
# single quotes: SLURM_NODEID is each node's own, expanded by the shell srun starts there
srun --kill-on-bad-exit=1 bash -c 'accelerate launch -q --multi_gpu \
    --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
    --num_processes $(( SLURM_NNODES * '"$GPUS_PER_NODE"' )) \
    --main_process_ip '"$MAIN_HOST"' --main_process_port '"$MAIN_PORT"' --rdzv_backend "${RDZV_BACKEND:-static}" \
    --max_restarts "${MAX_RESTARTS:-3}" --mixed_precision "${MIXED_PRECISION:-bf16}" --dynamo_backend no "$@"' _ "$@"
