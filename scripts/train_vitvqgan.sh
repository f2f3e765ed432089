#!/usr/bin/env bash
# Train an enhancing-transformers ViT-VQGAN config (configs/*vitvqgan*.yaml) through upstream main.py (patched):
# CPU, one node with N GPUs (DDP), several nodes (torchrun or SLURM), or resume from a checkpoint or run folder.
#
#   scripts/train_vitvqgan.sh --config rot_vitvqgan_small --gpus 0,1 --data /data/imagenet [--epochs 10 --lr 1e-4]
#   scripts/train_vitvqgan.sh --resume logs/rot_vitvqgan_small/<run-id> --gpus 0,1      # newest checkpoint there
#   scripts/train_vitvqgan.sh --config tiny_rot_vitvqgan --epochs 2                      # CPU (no --gpus)
#   # several nodes, torchrun: run on every node with its --node-rank and the same --run-id
#   scripts/train_vitvqgan.sh --config C --gpus 0,1,2,3 --nodes 2 --node-rank 0 --master-addr host0 --run-id R
#   # several nodes, SLURM: prints an sbatch script
#   scripts/train_vitvqgan.sh --config C --gpus 0,1,2,3 --nodes 4 --slurm [--partition P --time 72:00:00] | sbatch
#
# Options:
#   --config NAME|FILE   configs/NAME.yaml (main.py reads configs/<name>.yaml from the project root)
#   --resume CKPT|DIR    a .ckpt, or a run folder <logdir>/<config>/<run-id> (its newest checkpoint); the config
#                        defaults to the run's
#   --gpus IDS           GPU ids on each node, e.g. 0 or 0,1,2,3 (none: CPU); sets CUDA_VISIBLE_DEVICES
#   --cpu-procs K        CPU processes when no --gpus (DDP over gloo; default 1)
#   --nodes N            number of nodes (default 1); N > 1 needs --node-rank/--master-addr/--run-id or --slurm
#   --node-rank R, --master-addr HOST, --master-port PORT (default 29500): torchrun on several nodes
#   --run-id ID          run folder name (default: a time stamp); every node of one run must use the same
#   --slurm              print an sbatch script instead of running (with --partition, --time, --cpus-per-task)
#   --data DIR           ImageNet root (sets IMAGENET_ROOT; holds train/<wnid>/*.JPEG and val/<wnid>/*.JPEG)
#   --epochs E (10), --lr LR (1e-4), --seed S (0), --update-every U (1): main.py -e, -lr, -s, -u
#   --logdir DIR         where run folders go (default: logs): DIR/<config>/<run-id>/{ckpt,log}
#   --logger KIND        auto | wandb | tensorboard | csv (default auto: wandb when installed, else tensorboard)
#   --python BIN         interpreter (default: $PYTHON or python, i.e. the active conda env / venv)
#   --dry-run            print the command instead of running it
#   -- ARGS              passed to main.py as they are (e.g. -a for mixed precision, -b 750 image-log frequency)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/launch_common.sh
source "$ROOT/scripts/lib/launch_common.sh"
MAIN="$ROOT/third_party/enhancing-transformers/main.py"
launch_defaults  # the options shared with train_vqgan.sh: --gpus, --nodes, --slurm, --data, --logdir, ...
CONFIG=""
RESUME=""
CPU_PROCS=1
RUN_ID=""
EPOCHS=10
LR=1e-4
SEED=0
UPDATE_EVERY=1
LOGGER="auto"

vitvqgan_option() {  # one of this launcher's own options, as launch_common_option
  LAUNCH_SHIFT=2
  case "$1" in
    --config) launch_need "$@"; CONFIG="$2" ;;
    --resume) launch_need "$@"; RESUME="$2" ;;
    --cpu-procs) launch_need "$@"; CPU_PROCS="$2" ;;
    --run-id) launch_need "$@"; RUN_ID="$2" ;;
    --epochs) launch_need "$@"; EPOCHS="$2" ;;
    --lr) launch_need "$@"; LR="$2" ;;
    --seed) launch_need "$@"; SEED="$2" ;;
    --update-every) launch_need "$@"; UPDATE_EVERY="$2" ;;
    --logger) launch_need "$@"; LOGGER="$2" ;;
    *) return 1 ;;
  esac
}
launch_parse vitvqgan_option "$@"

launch_require_main "$MAIN"
LOGDIR="$(launch_abspath "$LOGDIR")"

if [[ -n "$RESUME" ]]; then
  [[ -e "$RESUME" ]] || launch_die "--resume $RESUME does not exist (give a .ckpt or a run folder <logdir>/<config>/<run-id>)"
  RESUME="$(launch_abspath "$RESUME")"
  if [[ -d "$RESUME" ]]; then
    CKPT="$(ls -t "$RESUME"/ckpt/*.ckpt 2>/dev/null | head -n 1 || true)"
    [[ -n "$CKPT" ]] || launch_die "--resume $RESUME: no checkpoint in $RESUME/ckpt/"
    RUN_DIR="$RESUME"
  else
    CKPT="$RESUME"
    RUN_DIR="$(dirname "$(dirname "$CKPT")")"
  fi
  # The run folder is <logdir>/<config>/<run-id>: its parent names the config.
  [[ -n "$CONFIG" ]] || CONFIG="$(basename "$(dirname "$RUN_DIR")")"
fi
[[ -n "$CONFIG" ]] || launch_die "give --config NAME (configs/NAME.yaml) or --resume"
CONFIG="$(basename "$CONFIG")"; CONFIG="${CONFIG%.yaml}"
[[ -f "$ROOT/configs/$CONFIG.yaml" ]] || launch_die "config $ROOT/configs/$CONFIG.yaml not found (main.py reads configs/<name>.yaml)"
[[ "$CPU_PROCS" =~ ^[1-9][0-9]*$ ]] || launch_die "--cpu-procs must be a positive integer, got '$CPU_PROCS'"
launch_check_common
if [[ "$NODES" -gt 1 && "$SLURM" == 0 ]]; then
  [[ -n "$NODE_RANK" && -n "$MASTER_ADDR_ARG" && -n "$RUN_ID" ]] \
    || launch_die "--nodes $NODES without --slurm needs --node-rank, --master-addr and the same --run-id on every node"
fi

N_GPUS="$(launch_count_gpus "$GPUS")"
RUN_ID="${RUN_ID:-$(date +%Y%m%d_%H%M%S)}"
export ENHANCING_RUN_ID="$RUN_ID"  # every process (DDP children, other nodes) writes to one run folder
# adapters/ importable even when the project is not pip-installed (main.py also appends the working directory)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

ARGS=(-c "$CONFIG" -e "$EPOCHS" -lr "$LR" -s "$SEED" -u "$UPDATE_EVERY" -ng "$N_GPUS" -nn "$NODES"
      -l "$LOGGER" -o "$LOGDIR")
[[ "$N_GPUS" -eq 0 ]] && ARGS+=(-np "$CPU_PROCS")
[[ -n "$RESUME" ]] && ARGS+=(-r "$CKPT")
ARGS+=("${EXTRA[@]+"${EXTRA[@]}"}")

if [[ "$SLURM" == 1 ]]; then
  # The run id is fixed now, for all tasks.
  launch_sbatch_head "$CONFIG" "$N_GPUS"
  cat <<EOF
export ENHANCING_RUN_ID=$(printf '%q' "$RUN_ID") PYTHONPATH=$(printf '%q' "$PYTHONPATH")
${IMAGENET_ROOT:+export IMAGENET_ROOT=$(printf '%q' "$IMAGENET_ROOT")}
export CUDA_VISIBLE_DEVICES=$GPUS
srun $(printf '%q ' "$PYTHON_BIN" "$MAIN" "${ARGS[@]}")
EOF
  exit 0
fi

cd "$ROOT"
CMD=()
if [[ -n "$GPUS" ]]; then export CUDA_VISIBLE_DEVICES="$GPUS"; fi
if [[ "$NODES" -gt 1 ]]; then
  launch_torchrun_cmd "$N_GPUS" "$MAIN" "${ARGS[@]}"
else
  CMD=("$PYTHON_BIN" "$MAIN" "${ARGS[@]}")
fi
echo "run folder: $LOGDIR/$CONFIG/$RUN_ID" >&2
if [[ "$DRY_RUN" == 1 ]]; then
  echo "${GPUS:+CUDA_VISIBLE_DEVICES=$GPUS }${IMAGENET_ROOT:+IMAGENET_ROOT=$IMAGENET_ROOT }ENHANCING_RUN_ID=$RUN_ID $(printf '%q ' "${CMD[@]}")"
  exit 0
fi
exec "${CMD[@]}"
