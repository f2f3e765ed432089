#!/usr/bin/env bash
# Train an enhancing-transformers ViT-VQGAN config (configs/*vitvqgan*.yaml) through upstream main.py (patched):
# CPU, one node with N GPUs (DDP), several nodes (torchrun or SLURM), or resume from a checkpoint or run folder.
#
#   scripts/train_vitvqgan.sh --config rot_vitvqgan_small --gpus 0,1 --data /data/imagenet [--epochs 10 --lr 1e-4]
#   scripts/train_vitvqgan.sh --resume logs/rot_vitvqgan_small/<run-id> --gpus 0,1      # go on in that run folder
#   scripts/train_vitvqgan.sh --config tiny_rot_vitvqgan --epochs 2                      # CPU (no --gpus)
#   # several nodes, torchrun: run on every node with its --node-rank and the same --run-id
#   scripts/train_vitvqgan.sh --config C --gpus 0,1,2,3 --nodes 2 --node-rank 0 --master-addr host0 --run-id R
#   # several nodes, SLURM: prints an sbatch script
#   scripts/train_vitvqgan.sh --config C --gpus 0,1,2,3 --nodes 4 --slurm [--partition P --time 72:00:00] | sbatch
#
# Options:
#   --config NAME|FILE   configs/NAME.yaml (main.py reads configs/<name>.yaml from the project root)
#   --resume DIR|CKPT    go on with a run in its own folder <logdir>/<config>/<run-id> (same logdir, config and run
#                        id, so a second --resume finds the first one's checkpoints). DIR: the run folder, from its
#                        newest checkpoint by modification time (ckpt/*.ckpt and SLURM's hpc_ckpt_*.ckpt; last.ckpt
#                        on a tie; never crash.ckpt); CKPT: one of its ckpt/*.ckpt. A .ckpt outside a run folder
#                        starts a new run folder from it (needs --config). A CSV logger's log/csv/metrics.csv, which
#                        Lightning would delete, is kept as log/csv/metrics-<time>.csv
#   --gpus IDS           GPU ids on each node, e.g. 0 or 0,1,2,3 (none: CPU); sets CUDA_VISIBLE_DEVICES
#   --cpu-procs K        CPU processes when no --gpus (DDP over gloo; default 1)
#   --nodes N            number of nodes (default 1); N > 1 needs --node-rank/--master-addr/--run-id or --slurm
#   --node-rank R, --master-addr HOST, --master-port PORT (default 29500): torchrun on several nodes
#   --run-id ID          run folder name (default: a time stamp, or the --resume run's); the same on every node
#   --slurm              print an sbatch script instead of running (with --partition, --time, --cpus-per-task)
#   --data DIR           ImageNet root (sets IMAGENET_ROOT; holds train/<wnid>/*.JPEG and val/<wnid>/*.JPEG)
#   --epochs E (10), --lr LR (1e-4), --seed S (0), --update-every U (1): main.py -e, -lr, -s, -u
#   --logdir DIR         where run folders go (default: logs, or the --resume run's): DIR/<config>/<run-id>/{ckpt,log}
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
LOGDIR=""        # unset: logs, or the --resume run's (an explicit --logdir must agree with it)
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

# The checkpoint a run goes on from: the newest by modification time of its ckpt/*.ckpt (ModelCheckpoint's
# <config>-epoch=NN.ckpt, RunGuard's last.ckpt) and of Lightning's SLURM-requeue hpc_ckpt_*.ckpt in the run folder;
# last.ckpt wins a tie, and a last.ckpt older than another checkpoint (left by an earlier stop while the run went on
# to later epochs) loses. crash.ckpt is never picked: give it as --resume CKPT on purpose.
newest_checkpoint() {
  local run=$1 newest
  newest="$(find "$run/ckpt" -maxdepth 1 -type f -name '*.ckpt' ! -name crash.ckpt -printf '%T@\t%p\n' 2>/dev/null
            find "$run" -maxdepth 1 -type f -name 'hpc_ckpt_*.ckpt' -printf '%T@\t%p\n' 2>/dev/null)"
  newest="$(sort -t $'\t' -k1,1gr <<<"$newest" | head -n 1 | cut -f 2-)"
  if [[ -n "$newest" && -f "$run/ckpt/last.ckpt" && ! "$run/ckpt/last.ckpt" -ot "$newest" ]]; then
    newest="$run/ckpt/last.ckpt"
  fi
  echo "$newest"
}

# Lightning's CSVLogger deletes the metrics.csv it finds in its folder: keep the earlier starts' rows beside it.
keep_csv_metrics() {
  local csv="$1/log/csv/metrics.csv" kept
  if [[ -f "$csv" ]]; then
    kept="${csv%.csv}-$(date +%Y%m%d_%H%M%S).csv"
    mv "$csv" "$kept" && echo "kept the metrics so far as $kept (Lightning's CSVLogger would delete them)" >&2
  fi
}

RUN_DIR=""
if [[ -n "$RESUME" ]]; then
  [[ -e "$RESUME" ]] || launch_die "--resume $RESUME does not exist (give a run folder <logdir>/<config>/<run-id> or a .ckpt)"
  RESUME="$(launch_abspath "$RESUME")"
  if [[ -d "$RESUME" ]]; then
    [[ -d "$RESUME/ckpt" ]] || launch_die "--resume $RESUME is not a run folder <logdir>/<config>/<run-id> (no ckpt/ in it)"
    RUN_DIR="$RESUME"
    CKPT="$(newest_checkpoint "$RUN_DIR")"
    [[ -n "$CKPT" ]] || launch_die "--resume $RESUME: no checkpoint in $RESUME/ckpt/"
  else
    [[ "$RESUME" == *.ckpt ]] || launch_die "--resume $RESUME is neither a folder nor a .ckpt file"
    CKPT="$RESUME"
    # <logdir>/<config>/<run-id>/ckpt/<file>.ckpt goes on in that run folder; a loose .ckpt starts a new one.
    if [[ "$(basename "$(dirname "$CKPT")")" == ckpt ]]; then RUN_DIR="$(dirname "$(dirname "$CKPT")")"; fi
  fi
fi
if [[ -n "$RUN_DIR" ]]; then
  # main.py writes to <logdir>/<config>/<run-id>: all three come from the run folder, so the run goes on there.
  RUN_CONFIG="$(basename "$(dirname "$RUN_DIR")")"
  RUN_LOGDIR="$(dirname "$(dirname "$RUN_DIR")")"
  [[ -z "$CONFIG" || "$(basename "${CONFIG%.yaml}")" == "$RUN_CONFIG" ]] \
    || launch_die "--config $CONFIG differs from the run's ($RUN_CONFIG in $RUN_DIR): drop --config to go on with the run"
  [[ -z "$RUN_ID" || "$RUN_ID" == "$(basename "$RUN_DIR")" ]] \
    || launch_die "--run-id $RUN_ID differs from the run's ($(basename "$RUN_DIR")): --resume goes on in $RUN_DIR; drop --run-id"
  [[ -z "$LOGDIR" || "$(launch_abspath "$LOGDIR")" == "$RUN_LOGDIR" ]] \
    || launch_die "--logdir $LOGDIR differs from the run's ($RUN_LOGDIR): --resume goes on in $RUN_DIR; drop --logdir"
  CONFIG="$RUN_CONFIG"
  RUN_ID="$(basename "$RUN_DIR")"
  LOGDIR="$RUN_LOGDIR"
fi
LOGDIR="$(launch_abspath "${LOGDIR:-logs}")"
[[ -n "$CONFIG" || -z "$RESUME" ]] \
  || launch_die "--resume $RESUME is not in a run folder's ckpt/: give --config NAME to start a new run from it"
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
ARGS+=("${EXTRA[@]+"${EXTRA[@]}"}")

RUN_FOLDER="$LOGDIR/$CONFIG/$RUN_ID"
if [[ "$SLURM" == 1 ]]; then
  # The run id is fixed now, for all tasks and every requeue of the job. A requeued resumed job goes on from the
  # run's newest checkpoint, not from the one it first started from (Lightning's own requeue resume only acts when
  # no checkpoint is given).
  launch_sbatch_head "$CONFIG" "$N_GPUS"
  START=()
  [[ -n "$RESUME" ]] && START=(-r "$CKPT")
  cat <<EOF
export ENHANCING_RUN_ID=$(printf '%q' "$RUN_ID") PYTHONPATH=$(printf '%q' "$PYTHONPATH")
${IMAGENET_ROOT:+export IMAGENET_ROOT=$(printf '%q' "$IMAGENET_ROOT")}
export CUDA_VISIBLE_DEVICES=$GPUS
RUN_FOLDER=$(printf '%q' "$RUN_FOLDER")
$(declare -f newest_checkpoint keep_csv_metrics)
START=(${START[@]+$(printf '%q ' "${START[@]}")})
if [[ \${#START[@]} -gt 0 && "\${SLURM_RESTART_COUNT:-0}" -gt 0 ]]; then START=(-r "\$(newest_checkpoint "\$RUN_FOLDER")"); fi
$([[ "$LOGGER" == csv ]] && echo 'keep_csv_metrics "$RUN_FOLDER"')
srun $(printf '%q ' "$PYTHON_BIN" "$MAIN" "${ARGS[@]}") \${START[@]+"\${START[@]}"}
EOF
  exit 0
fi
[[ -n "$RESUME" ]] && ARGS+=(-r "$CKPT")

cd "$ROOT"
CMD=()
if [[ -n "$GPUS" ]]; then export CUDA_VISIBLE_DEVICES="$GPUS"; fi
if [[ "$NODES" -gt 1 ]]; then
  launch_torchrun_cmd "$N_GPUS" "$MAIN" "${ARGS[@]}"
else
  CMD=("$PYTHON_BIN" "$MAIN" "${ARGS[@]}")
fi
echo "run folder: $RUN_FOLDER${RESUME:+ (going on from $CKPT)}" >&2
if [[ "$DRY_RUN" == 1 ]]; then
  echo "${GPUS:+CUDA_VISIBLE_DEVICES=$GPUS }${IMAGENET_ROOT:+IMAGENET_ROOT=$IMAGENET_ROOT }ENHANCING_RUN_ID=$RUN_ID $(printf '%q ' "${CMD[@]}")"
  exit 0
fi
# one node keeps the CSV rows (the others may share its file system)
if [[ "$LOGGER" == csv && "${NODE_RANK:-0}" == 0 ]]; then keep_csv_metrics "$RUN_FOLDER"; fi
exec "${CMD[@]}"
