#!/bin/bash
# Any recipe on a SLURM GPU cluster: one `accelerate launch` per node, started by srun; each launcher
# starts one process per GPU and meets the others at the first node (torchrun's static rendezvous).
#
#   sbatch --nodes 2 recipes/slurm.sh recipes/e2e.py --config recipes/configs/e2e.yaml \
#       data.shards=/shared/cohort/shards out=/shared/runs/e2e resume=true
#
# `out` must be on a filesystem every node sees. With resume=true and --max_restarts, a process that dies
# restarts all of them, which continue from the last checkpoint. On CPU-only nodes set
# ACCELERATE_USE_CPU=true (without it --multi_gpu starts processes that each run alone) and GPUS_PER_NODE.
#SBATCH --job-name=hipt-e2e
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}

# single quotes: SLURM_NODEID is each node's own, expanded by the shell srun starts there
srun --kill-on-bad-exit=1 bash -c 'accelerate launch --multi_gpu \
    --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
    --num_processes $(( SLURM_NNODES * '"$GPUS_PER_NODE"' )) \
    --main_process_ip '"$MAIN_HOST"' --main_process_port '"$MAIN_PORT"' \
    --max_restarts "${MAX_RESTARTS:-3}" --mixed_precision "${MIXED_PRECISION:-bf16}" --dynamo_backend no "$@"' _ "$@"
