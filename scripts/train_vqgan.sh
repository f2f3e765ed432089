#!/usr/bin/env bash
# Train a latent-diffusion VQGAN config (configs/*vqgan*.yaml) through upstream main.py: CPU, one node with N GPUs
# (DDP), several nodes (torchrun or SLURM), or resume a run folder.
#
#   scripts/train_vqgan.sh --config configs/rot_vqgan_64.yaml --gpus 0,1,2,3 [--data /data/imagenet] [-- key=value ...]
#   scripts/train_vqgan.sh --resume logs/2025-01-01T00-00-00_rot_vqgan_64 --gpus 0,1,2,3
#   scripts/train_vqgan.sh --config configs/tiny_rot_vqgan.yaml                      # CPU (no --gpus)
#   # several nodes, torchrun: run on every node with its --node-rank and the same --run-time
#   scripts/train_vqgan.sh --config C --gpus 0,1,2,3 --nodes 2 --node-rank 0 --master-addr host0 --run-time T
#   # several nodes, SLURM: writes an sbatch script to stdout
#   scripts/train_vqgan.sh --config C --gpus 0,1,2,3 --nodes 4 --slurm [--partition P --time 72:00:00] | sbatch
#
# Options:
#   --config FILE        config passed to main.py --base (repeatable: merged left to right)
#   --resume DIR|CKPT    resume a run folder (its configs and checkpoints/last.ckpt) or a checkpoint in one
#   --gpus IDS           GPU ids on each node, e.g. 0, or 0,1,2,3 (none: CPU)
#   --nodes N            number of nodes (default 1); with N > 1 use --node-rank/--master-addr or --slurm
#   --node-rank R, --master-addr HOST, --master-port PORT (default 29500), --run-time T: torchrun on several nodes
#   --slurm              print an sbatch script instead of running (with --partition, --time, --cpus-per-task)
#   --data DIR           ImageNet root (sets IMAGENET_ROOT; holds train/<wnid>/*.JPEG and val/<wnid>/*.JPEG)
#   --logdir DIR         where run folders go (default: logs)
#   --name NAME          run-folder postfix (main.py -n)
#   --python BIN         interpreter (default: python, i.e. the active conda env / venv)
#   --dry-run            print the command instead of running it
#   -- ARGS              passed to main.py as they are (e.g. lightning.trainer.max_steps=100 --scale_lr False)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/launch_common.sh
source "$ROOT/scripts/lib/launch_common.sh"
MAIN="$ROOT/third_party/latent-diffusion/main.py"
launch_defaults  # the options shared with train_vitvqgan.sh: --gpus, --nodes, --slurm, --data, --logdir, ...
CONFIGS=()
RESUME=""
RUN_TIME=""
NAME=""

vqgan_option() {  # one of this launcher's own options, as launch_common_option
  LAUNCH_SHIFT=2
  case "$1" in
    --config) launch_need "$@"; CONFIGS+=("$2") ;;
    --resume) launch_need "$@"; RESUME="$2" ;;
    --run-time) launch_need "$@"; RUN_TIME="$2" ;;
    --name) launch_need "$@"; NAME="$2" ;;
    *) return 1 ;;
  esac
}
launch_parse vqgan_option "$@"

launch_require_main "$MAIN"
if [[ -n "$RESUME" ]]; then
  [[ -e "$RESUME" ]] || launch_die "--resume $RESUME does not exist (give a run folder under logs/ or a checkpoint in one)"
  [[ -z "$NAME" ]] || launch_die "--name and --resume exclude each other (main.py keeps the resumed folder's name)"
else
  [[ ${#CONFIGS[@]} -gt 0 ]] || launch_die "give --config FILE (or --resume DIR)"
  for c in "${CONFIGS[@]}"; do [[ -f "$c" ]] || launch_die "config $c not found"; done
fi
launch_check_common --gpus-trailing-comma

# Absolute paths, so the command means the same from the SLURM script's folder or any other.
if [[ -n "$RESUME" ]]; then RESUME="$(launch_abspath "$RESUME")"; fi
for i in "${!CONFIGS[@]}"; do CONFIGS[i]="$(launch_abspath "${CONFIGS[i]}")"; done
LOGDIR="$(launch_abspath "$LOGDIR")"
# adapters/ importable even when the project is not pip-installed
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# main.py arguments. Lightning 1.x style --gpus ids keep a trailing comma so one id means "GPU 0", not "0 GPUs".
ARGS=()
if [[ -n "$RESUME" ]]; then ARGS+=(-r "$RESUME"); else ARGS+=(--base "${CONFIGS[@]}"); fi
ARGS+=(-t -l "$LOGDIR")
[[ -n "$NAME" ]] && ARGS+=(-n "$NAME")
if [[ -n "$GPUS" ]]; then
  [[ "$GPUS" == *, ]] || GPUS="$GPUS,"
  ARGS+=(--gpus "$GPUS")
fi
[[ "$NODES" -gt 1 ]] && ARGS+=(--num_nodes "$NODES")
ARGS+=("${EXTRA[@]+"${EXTRA[@]}"}")
N_PER_NODE="$(launch_count_gpus "$GPUS")"

if [[ "$SLURM" == 1 ]]; then
  # The run folder is fixed now (all ranks, and every requeue of the job, use it): a preempted job is requeued by
  # Lightning (SIGUSR1 before the time limit; RunGuard saves last.ckpt on the SIGTERM that follows) and its next
  # start resumes that folder's last.ckpt instead of starting over.
  RUN_TIME="${RUN_TIME:-$(date +%Y-%m-%dT%H-%M-%S)}"
  if [[ -n "$RESUME" ]]; then
    RUN_DIR="$RESUME"; [[ -d "$RUN_DIR" ]] || RUN_DIR="$(dirname "$(dirname "$RUN_DIR")")"
    START=(-r "$RESUME")
  else
    RUN_DIR="$LOGDIR/${RUN_TIME}_${NAME:-$(basename "${CONFIGS[0]}" .yaml)}"  # main.py's <time>_<name>
    START=(--base "${CONFIGS[@]}")
    [[ -n "$NAME" ]] && START+=(-n "$NAME")  # main.py refuses -n together with -r
  fi
  REST=()  # ARGS without -r/--base/-n
  for ((i = 0; i < ${#ARGS[@]}; i++)); do
    case "${ARGS[i]}" in
      -r|-n) ((i += 1)) ;;
      --base) while ((i + 1 < ${#ARGS[@]})) && [[ "${ARGS[i + 1]}" != -* ]]; do ((i += 1)); done ;;
      *) REST+=("${ARGS[i]}") ;;
    esac
  done
  launch_sbatch_head vqgan "$N_PER_NODE" "#SBATCH --output=vqgan-%j.out"
  cat <<EOF
export PYTHONPATH=$(printf '%q' "$PYTHONPATH")
mkdir -p $(printf '%q' "$LOGDIR")
${IMAGENET_ROOT:+export IMAGENET_ROOT=$(printf '%q' "$IMAGENET_ROOT")}
export LDM_MAIN_RUN_TIME=$(printf '%q' "$RUN_TIME")
RUN_DIR=$(printf '%q' "$RUN_DIR")
if [[ -f "\$RUN_DIR/checkpoints/last.ckpt" ]]; then START=(-r "\$RUN_DIR"); else START=($(printf '%q ' "${START[@]}")); fi
srun $(printf '%q ' "$PYTHON_BIN" "$MAIN") "\${START[@]}" $(printf '%q ' "${REST[@]}")
EOF
  exit 0
fi

CMD=()
if [[ "$NODES" -gt 1 ]]; then
  [[ -n "$NODE_RANK" && -n "$MASTER_ADDR_ARG" ]] || launch_die "--nodes $NODES needs --node-rank and --master-addr (or --slurm)"
  [[ -n "$RUN_TIME" ]] || launch_die "--nodes $NODES needs --run-time T, the same on every node (e.g. \$(date +%Y-%m-%dT%H-%M-%S) on node 0), so all ranks log into one folder"
  export LDM_MAIN_RUN_TIME="$RUN_TIME"
  launch_torchrun_cmd "$N_PER_NODE" "$MAIN" "${ARGS[@]}"
else
  # one node: Lightning starts the DDP processes itself
  CMD=("$PYTHON_BIN" "$MAIN" "${ARGS[@]}")
fi

if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
