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
MAIN="$ROOT/third_party/latent-diffusion/main.py"
PYTHON_BIN="${PYTHON:-python}"
CONFIGS=()
RESUME=""
GPUS=""
NODES=1
NODE_RANK=""
MASTER_ADDR_ARG=""
MASTER_PORT_ARG=29500
RUN_TIME=""
SLURM=0
PARTITION=""
TIME_LIMIT="72:00:00"
CPUS_PER_TASK=8
DATA=""
LOGDIR="logs"
NAME=""
DRY_RUN=0
EXTRA=()

die() { echo "train_vqgan.sh: $*" >&2; exit 2; }
need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) need "$@"; CONFIGS+=("$2"); shift 2 ;;
    --resume) need "$@"; RESUME="$2"; shift 2 ;;
    --gpus) need "$@"; GPUS="$2"; shift 2 ;;
    --nodes) need "$@"; NODES="$2"; shift 2 ;;
    --node-rank) need "$@"; NODE_RANK="$2"; shift 2 ;;
    --master-addr) need "$@"; MASTER_ADDR_ARG="$2"; shift 2 ;;
    --master-port) need "$@"; MASTER_PORT_ARG="$2"; shift 2 ;;
    --run-time) need "$@"; RUN_TIME="$2"; shift 2 ;;
    --slurm) SLURM=1; shift ;;
    --partition) need "$@"; PARTITION="$2"; shift 2 ;;
    --time) need "$@"; TIME_LIMIT="$2"; shift 2 ;;
    --cpus-per-task) need "$@"; CPUS_PER_TASK="$2"; shift 2 ;;
    --data) need "$@"; DATA="$2"; shift 2 ;;
    --logdir) need "$@"; LOGDIR="$2"; shift 2 ;;
    --name) need "$@"; NAME="$2"; shift 2 ;;
    --python) need "$@"; PYTHON_BIN="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,29p' "${BASH_SOURCE[0]}"; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (see --help; main.py arguments go after --)" ;;
  esac
done

[[ -f "$MAIN" ]] || { echo "train_vqgan.sh: $MAIN is missing: run scripts/setup_submodules.sh first" >&2; exit 1; }
if [[ -n "$RESUME" ]]; then
  [[ -e "$RESUME" ]] || die "--resume $RESUME does not exist (give a run folder under logs/ or a checkpoint in one)"
  [[ -z "$NAME" ]] || die "--name and --resume exclude each other (main.py keeps the resumed folder's name)"
else
  [[ ${#CONFIGS[@]} -gt 0 ]] || die "give --config FILE (or --resume DIR)"
  for c in "${CONFIGS[@]}"; do [[ -f "$c" ]] || die "config $c not found"; done
fi
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'"
if [[ -n "$GPUS" && ! "$GPUS" =~ ^[0-9]+(,[0-9]+)*,?$ ]]; then
  die "--gpus takes GPU ids such as 0, or 0,1,2,3; got '$GPUS'"
fi
if [[ "$NODES" -gt 1 && -z "$GPUS" ]]; then
  die "several nodes need --gpus (the ids used on every node)"
fi
if [[ -n "$DATA" ]]; then
  [[ -d "$DATA" ]] || die "--data $DATA is not a folder (expected train/<wnid>/*.JPEG and val/<wnid>/*.JPEG)"
  export IMAGENET_ROOT="$DATA"
fi

# Absolute paths, so the command means the same from the SLURM script's folder or any other.
abspath() { realpath -m -- "$1"; }
if [[ -n "$RESUME" ]]; then RESUME="$(abspath "$RESUME")"; fi
for i in "${!CONFIGS[@]}"; do CONFIGS[i]="$(abspath "${CONFIGS[i]}")"; done
LOGDIR="$(abspath "$LOGDIR")"
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
N_PER_NODE=$(awk -F, '{n=0; for (i=1;i<=NF;i++) if ($i!="") n++; print n}' <<<"${GPUS:-}")

if [[ "$SLURM" == 1 ]]; then
  [[ -n "$GPUS" ]] || die "--slurm needs --gpus"
  # srun starts one task per GPU; Lightning reads SLURM's variables for ranks, and all ranks share one run time.
  cat <<EOF
#!/usr/bin/env bash
#SBATCH --job-name=vqgan
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$N_PER_NODE
#SBATCH --gres=gpu:$N_PER_NODE
#SBATCH --cpus-per-task=$CPUS_PER_TASK
#SBATCH --time=$TIME_LIMIT
${PARTITION:+#SBATCH --partition=$PARTITION}
#SBATCH --output=vqgan-%j.out
set -euo pipefail
cd $(printf '%q' "$ROOT")
export PYTHONPATH=$(printf '%q' "$PYTHONPATH")
mkdir -p $(printf '%q' "$LOGDIR")
${IMAGENET_ROOT:+export IMAGENET_ROOT=$(printf '%q' "$IMAGENET_ROOT")}
export LDM_MAIN_RUN_TIME="\$(date +%Y-%m-%dT%H-%M-%S)"
srun $(printf '%q ' "$PYTHON_BIN" "$MAIN" "${ARGS[@]}")
EOF
  exit 0
fi

CMD=()
if [[ "$NODES" -gt 1 ]]; then
  [[ -n "$NODE_RANK" && -n "$MASTER_ADDR_ARG" ]] || die "--nodes $NODES needs --node-rank and --master-addr (or --slurm)"
  [[ -n "$RUN_TIME" ]] || die "--nodes $NODES needs --run-time T, the same on every node (e.g. \$(date +%Y-%m-%dT%H-%M-%S) on node 0), so all ranks log into one folder"
  export LDM_MAIN_RUN_TIME="$RUN_TIME"
  CMD=("$PYTHON_BIN" -m torch.distributed.run --nnodes "$NODES" --nproc_per_node "$N_PER_NODE"
       --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR_ARG" --master_port "$MASTER_PORT_ARG" "$MAIN" "${ARGS[@]}")
else
  # one node: Lightning starts the DDP processes itself
  CMD=("$PYTHON_BIN" "$MAIN" "${ARGS[@]}")
fi

if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
