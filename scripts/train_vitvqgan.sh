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
MAIN="$ROOT/third_party/enhancing-transformers/main.py"
PYTHON_BIN="${PYTHON:-python}"
CONFIG=""
RESUME=""
GPUS=""
CPU_PROCS=1
NODES=1
NODE_RANK=""
MASTER_ADDR_ARG=""
MASTER_PORT_ARG=29500
RUN_ID=""
SLURM=0
PARTITION=""
TIME_LIMIT="72:00:00"
CPUS_PER_TASK=8
DATA=""
EPOCHS=10
LR=1e-4
SEED=0
UPDATE_EVERY=1
LOGDIR="logs"
LOGGER="auto"
DRY_RUN=0
EXTRA=()

die() { echo "train_vitvqgan.sh: $*" >&2; exit 2; }
need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) need "$@"; CONFIG="$2"; shift 2 ;;
    --resume) need "$@"; RESUME="$2"; shift 2 ;;
    --gpus) need "$@"; GPUS="$2"; shift 2 ;;
    --cpu-procs) need "$@"; CPU_PROCS="$2"; shift 2 ;;
    --nodes) need "$@"; NODES="$2"; shift 2 ;;
    --node-rank) need "$@"; NODE_RANK="$2"; shift 2 ;;
    --master-addr) need "$@"; MASTER_ADDR_ARG="$2"; shift 2 ;;
    --master-port) need "$@"; MASTER_PORT_ARG="$2"; shift 2 ;;
    --run-id) need "$@"; RUN_ID="$2"; shift 2 ;;
    --slurm) SLURM=1; shift ;;
    --partition) need "$@"; PARTITION="$2"; shift 2 ;;
    --time) need "$@"; TIME_LIMIT="$2"; shift 2 ;;
    --cpus-per-task) need "$@"; CPUS_PER_TASK="$2"; shift 2 ;;
    --data) need "$@"; DATA="$2"; shift 2 ;;
    --epochs) need "$@"; EPOCHS="$2"; shift 2 ;;
    --lr) need "$@"; LR="$2"; shift 2 ;;
    --seed) need "$@"; SEED="$2"; shift 2 ;;
    --update-every) need "$@"; UPDATE_EVERY="$2"; shift 2 ;;
    --logdir) need "$@"; LOGDIR="$2"; shift 2 ;;
    --logger) need "$@"; LOGGER="$2"; shift 2 ;;
    --python) need "$@"; PYTHON_BIN="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,32p' "${BASH_SOURCE[0]}"; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (see --help; main.py arguments go after --)" ;;
  esac
done

[[ -f "$MAIN" ]] || { echo "train_vitvqgan.sh: $MAIN is missing: run scripts/setup_submodules.sh first" >&2; exit 1; }
abspath() { realpath -m -- "$1"; }
LOGDIR="$(abspath "$LOGDIR")"

if [[ -n "$RESUME" ]]; then
  [[ -e "$RESUME" ]] || die "--resume $RESUME does not exist (give a .ckpt or a run folder <logdir>/<config>/<run-id>)"
  RESUME="$(abspath "$RESUME")"
  if [[ -d "$RESUME" ]]; then
    CKPT="$(ls -t "$RESUME"/ckpt/*.ckpt 2>/dev/null | head -n 1 || true)"
    [[ -n "$CKPT" ]] || die "--resume $RESUME: no checkpoint in $RESUME/ckpt/"
    RUN_DIR="$RESUME"
  else
    CKPT="$RESUME"
    RUN_DIR="$(dirname "$(dirname "$CKPT")")"
  fi
  # The run folder is <logdir>/<config>/<run-id>: its parent names the config.
  [[ -n "$CONFIG" ]] || CONFIG="$(basename "$(dirname "$RUN_DIR")")"
fi
[[ -n "$CONFIG" ]] || die "give --config NAME (configs/NAME.yaml) or --resume"
CONFIG="$(basename "$CONFIG")"; CONFIG="${CONFIG%.yaml}"
[[ -f "$ROOT/configs/$CONFIG.yaml" ]] || die "config $ROOT/configs/$CONFIG.yaml not found (main.py reads configs/<name>.yaml)"
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'"
[[ "$CPU_PROCS" =~ ^[1-9][0-9]*$ ]] || die "--cpu-procs must be a positive integer, got '$CPU_PROCS'"
if [[ -n "$GPUS" && ! "$GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  die "--gpus takes GPU ids such as 0 or 0,1,2,3; got '$GPUS'"
fi
[[ "$NODES" -eq 1 || -n "$GPUS" ]] || die "several nodes need --gpus (the ids used on every node)"
if [[ "$NODES" -gt 1 && "$SLURM" == 0 ]]; then
  [[ -n "$NODE_RANK" && -n "$MASTER_ADDR_ARG" && -n "$RUN_ID" ]] \
    || die "--nodes $NODES without --slurm needs --node-rank, --master-addr and the same --run-id on every node"
fi
if [[ -n "$DATA" ]]; then
  [[ -d "$DATA" ]] || die "--data $DATA is not a folder (expected train/<wnid>/*.JPEG and val/<wnid>/*.JPEG)"
  export IMAGENET_ROOT="$(abspath "$DATA")"
fi

N_GPUS=0
[[ -n "$GPUS" ]] && N_GPUS=$(awk -F, '{print NF}' <<<"$GPUS")
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
  [[ -n "$GPUS" ]] || die "--slurm needs --gpus"
  # One task per GPU; Lightning reads SLURM's variables for the ranks; the run id is fixed now for all tasks.
  cat <<EOF
#!/usr/bin/env bash
#SBATCH --job-name=$CONFIG
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$N_GPUS
#SBATCH --gres=gpu:$N_GPUS
#SBATCH --cpus-per-task=$CPUS_PER_TASK
#SBATCH --time=$TIME_LIMIT
${PARTITION:+#SBATCH --partition=$PARTITION}
set -euo pipefail
cd $(printf '%q' "$ROOT")
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
  # torchrun starts the GPU processes of this node; Lightning reads torchelastic's variables for the ranks.
  CMD=("$PYTHON_BIN" -m torch.distributed.run --nnodes "$NODES" --node_rank "$NODE_RANK" --nproc_per_node "$N_GPUS"
       --master_addr "$MASTER_ADDR_ARG" --master_port "$MASTER_PORT_ARG" "$MAIN" "${ARGS[@]}")
else
  CMD=("$PYTHON_BIN" "$MAIN" "${ARGS[@]}")
fi
echo "run folder: $LOGDIR/$CONFIG/$RUN_ID" >&2
if [[ "$DRY_RUN" == 1 ]]; then
  echo "${GPUS:+CUDA_VISIBLE_DEVICES=$GPUS }${IMAGENET_ROOT:+IMAGENET_ROOT=$IMAGENET_ROOT }ENHANCING_RUN_ID=$RUN_ID $(printf '%q ' "${CMD[@]}")"
  exit 0
fi
exec "${CMD[@]}"
