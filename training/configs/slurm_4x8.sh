#!/bin/bash
# Tokenizer + de-tokenizer pretraining on 4 nodes x 8 GPUs with DeepSpeed ZeRO-2.
#   mkdir -p logs && sbatch training/configs/slurm_4x8.sh --config <preset/args for pretrain_tokenizer.py>
# One `accelerate launch` per node (it starts the 8 GPU workers); node 0 hosts the
# rendezvous. The training script resumes from the newest complete checkpoint in its
# output dir, so a requeued or resubmitted job continues where it stopped. The output
# dir must be on a filesystem all nodes share.
#SBATCH --job-name=divot-tokenizer
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=72:00:00
#SBATCH --requeue
#SBATCH --output=logs/%x-%j.out

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export ACCEL_CONFIG=${ACCEL_CONFIG:-training/configs/accelerate_4x8_zero2.yaml}
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}
export NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))
# CPU threads per worker for the offloaded optimizer (DeepSpeed CPU Adam) and data loading
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((SLURM_CPUS_PER_TASK / GPUS_PER_NODE))}

echo "master ${MASTER_ADDR}:${MASTER_PORT}, ${SLURM_NNODES} nodes, ${NUM_PROCESSES} processes"

# Single quotes: SLURM_NODEID must be expanded on each node, not here.
srun --kill-on-bad-exit=1 bash -c '
  accelerate launch \
    --config_file "$ACCEL_CONFIG" \
    --num_machines "$SLURM_NNODES" \
    --num_processes "$NUM_PROCESSES" \
    --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$MASTER_ADDR" \
    --main_process_port "$MASTER_PORT" \
    training/pretrain_tokenizer.py "$@"
' bash "$@"
