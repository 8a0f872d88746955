#!/bin/bash
# The paper pipeline on several nodes, stage by stage, resuming after a requeue:
#   teachers (haze, rain, blur) -> cache -> kt -> da -> eval (real test sets) -> report
#
#   mkdir -p logs                                   # once: Slurm does not create the --output folder
#   sbatch launch/slurm_paper.sh                    # from the repository root (shared filesystem)
#   sbatch --nodes 4 launch/slurm_paper.sh          # any node count; GPUS_PER_NODE below
#   STAGES="kt da" sbatch launch/slurm_paper.sh     # only some stages
#
# Every node runs one `accelerate launch` (srun --ntasks-per-node=1) that starts one process per
# GPU; machine rank = SLURM_NODEID, main process = the first node of the allocation.
# Preemption and time limit: Slurm sends SIGUSR1 to this script 120 s before the end (B:). The
# trap forwards it to the training step; every rank checkpoints at the next step boundary and
# exits, and the job requeues itself. The requeued job runs this script again: finished stages are
# skipped (a .done marker per stage), the interrupted one continues with `--resume auto` (same
# step, optimiser, RNG, data position and MLflow run).
#SBATCH --job-name=uniremoval-paper
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --output=logs/%x-%j.out

set -uo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE:-8}}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}                  # "a100:8" -> "8"
STAGES=${STAGES:-"teacher-haze teacher-rain teacher-blur cache kt da eval report"}
STATE_DIR=${STATE_DIR:-outputs/slurm-state}         # .done markers; delete one to rerun a stage
EXPERIMENT=${EXPERIMENT:-uniremoval}                # the MLflow experiment of every stage and the report
# MLFLOW_TRACKING_URI: set it to your server (http://host:5000); unset = sqlite:///$PWD/mlflow.db.
# With the sqlite store only rank 0 writes, but keep it on a filesystem with working locks.

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))
export MASTER_ADDR MASTER_PORT
# torchrun (inside accelerate launch) only handles TERM/INT/HUP/QUIT by default, and dies on USR1
# before its workers have written their checkpoint: add USR1 (it then forwards it to the workers),
# and give them time to checkpoint before it kills them. torchrun's --signals-to-handle is read from
# PET_SIGNALS_TO_HANDLE (accelerate launch has no flag for it); torchrun overwrites
# TORCHELASTIC_SIGNALS_TO_HANDLE with that value, so setting only the latter does nothing.
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export TORCHELASTIC_SIGNALS_TO_HANDLE=$PET_SIGNALS_TO_HANDLE
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

mkdir -p "$STATE_DIR" logs
PREEMPTED=0
STEP_PID=

on_usr1() {
    echo "[$(date -Is)] SIGUSR1: time limit or preemption ahead; checkpointing and requeueing"
    PREEMPTED=1
    # to every process of the running step (each rank sets its stop flag, checkpoints, exits)
    scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || true
}
trap on_usr1 USR1

# Run one stage on every node. `wait` returns early when the trap fires, so wait again for the
# step to finish its checkpoint before requeueing.
launch() {  # launch NAME LAUNCH_CONFIG ARGS...
    local name=$1 config=$2
    shift 2
    if [[ -e "$STATE_DIR/$name.done" ]]; then
        echo "[$(date -Is)] $name: done before, skipped"
        return 0
    fi
    echo "[$(date -Is)] $name: start on $SLURM_NNODES node(s) x $GPUS_PER_NODE GPU(s)"
    # --cpus-per-task again: srun does not take it from sbatch (Slurm >= 22.05), and the step would
    # pin all of a node's ranks and loader workers to one core
    srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} bash -c '
        exec accelerate launch --config_file "$0" \
            --num_machines "$SLURM_NNODES" --num_processes "$1" \
            --machine_rank "$SLURM_NODEID" \
            --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
            --rdzv_backend static --same_network \
            -m uniremoval "${@:2}"' "$config" "$NUM_PROCESSES" "$@" &
    STEP_PID=$!
    local rc=0
    wait "$STEP_PID" || rc=$?
    while kill -0 "$STEP_PID" 2>/dev/null; do wait "$STEP_PID" || rc=$?; done
    if [[ $PREEMPTED == 1 ]]; then
        echo "[$(date -Is)] $name: interrupted (checkpoint written); requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    if [[ $rc != 0 ]]; then
        echo "[$(date -Is)] $name: FAILED (exit $rc); fix and resubmit, finished stages will be skipped"
        exit "$rc"
    fi
    touch "$STATE_DIR/$name.done"
    echo "[$(date -Is)] $name: done"
}

# Same on one process (report, small bookkeeping), on the first node only.
single() {  # single NAME ARGS...
    local name=$1
    shift
    [[ -e "$STATE_DIR/$name.done" ]] && { echo "[$(date -Is)] $name: done before, skipped"; return 0; }
    srun --nodes=1 --ntasks=1 uniremoval "$@" || exit $?
    touch "$STATE_DIR/$name.done"
}

MULTI=launch/multi_node.yaml   # DDP; every value it holds is overridden on the command line above

for stage in $STAGES; do
    case $stage in
        teacher-*)
            deg=${stage#teacher-}
            launch "$stage" "$MULTI" train teacher --config "configs/teacher/${deg}.yaml" --resume auto \
                tracking.experiment="$EXPERIMENT" ;;
        cache)
            launch cache "$MULTI" cache --config configs/cache.yaml tracking.experiment="$EXPERIMENT" ;;
        kt)
            launch kt "$MULTI" train kt --config configs/paper/kt.yaml --resume auto tracking.experiment="$EXPERIMENT" ;;
        da)
            launch da "$MULTI" train da --config configs/paper/da.yaml --resume auto tracking.experiment="$EXPERIMENT" ;;
        eval)
            # each real test set twice, as the README's one-GPU pipeline does: the adapted student
            # (no-reference IQA; PSNR/SSIM where GT exists) and the unrestored input, the report's baseline row
            ckpt=outputs/paper-da/last.safetensors
            for set in rtts spa_test realblur_j_test; do
                metrics=brisque,piqe
                [[ $set == rtts ]] || metrics+=,psnr,ssim   # RTTS has no ground truth
                launch "eval-$set" "$MULTI" eval --checkpoint "$ckpt" --data "shards/$set" --name "$set" \
                    --experiment "$EXPERIMENT" --metrics "$metrics" --label Uni-Removal
                launch "eval-$set-input" "$MULTI" eval --checkpoint none --data "shards/$set" --name "$set" \
                    --experiment "$EXPERIMENT" --metrics "$metrics" --label input
            done ;;
        report)
            single report report --experiment "$EXPERIMENT" --format md ;;
        *)
            echo "unknown stage '$stage' (known: teacher-<type> cache kt da eval report)"; exit 2 ;;
    esac
done
echo "[$(date -Is)] all stages done"
