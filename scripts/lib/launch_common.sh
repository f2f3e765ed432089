# shellcheck shell=bash
# Shared pieces of the training launchers scripts/train_vqgan.sh (latent-diffusion) and scripts/train_vitvqgan.sh
# (enhancing-transformers). Sourced, never run; defines functions only (sourcing changes no state).
#
# The launchers keep their own options (config, resume, run naming, main.py arguments); this file holds what both
# have in common:
#   launch_die MSG...                 "<launcher>: MSG" on stderr, exit 2 (a bad argument)
#   launch_need OPT [VALUE]           launch_die unless OPT was given a non-empty value
#   launch_usage                      print the launcher's leading comment block (its --help)
#   launch_require_main MAIN          exit 1 naming scripts/setup_submodules.sh when upstream's main.py is missing
#   launch_abspath PATH               absolute path (need not exist), so commands mean the same from any folder
#   launch_defaults                   set the shared option variables to their defaults (list below)
#   launch_parse OWN_FN ARGS...       parse the command line: --help, the shared options, EXTRA after --, and
#                                     the launcher's own options through OWN_FN ARGS... (like launch_common_option)
#   launch_common_option ARGS...      parse one shared option from ARGS; sets LAUNCH_SHIFT (words used), or
#                                     returns 1 when ARGS[0] is not a shared option
#   launch_check_common [--gpus-trailing-comma]
#                                     validate --nodes, --gpus, --data; exports IMAGENET_ROOT (absolute) for --data
#   launch_count_gpus IDS             number of GPU ids in a comma list ("" -> 0; a trailing comma adds none)
#   launch_sbatch_head JOB TASKS [LINE...]
#                                     print the start of an sbatch script (one task per GPU): the #SBATCH header,
#                                     extra LINEs, strict mode, cd to ROOT; the launcher prints the rest (env, srun)
#   launch_torchrun_cmd TASKS CMD...  set CMD to torchrun (torch.distributed.run) on this node for several nodes
#
# Shared option variables (set by launch_defaults, filled by launch_common_option):
#   GPUS (--gpus), NODES (--nodes, 1), NODE_RANK (--node-rank), MASTER_ADDR_ARG (--master-addr),
#   MASTER_PORT_ARG (--master-port, 29500), SLURM (--slurm, 0/1), PARTITION (--partition),
#   TIME_LIMIT (--time, 72:00:00), CPUS_PER_TASK (--cpus-per-task, 8), DATA (--data), LOGDIR (--logdir, logs),
#   PYTHON_BIN (--python, default $PYTHON or python), DRY_RUN (--dry-run, 0/1), EXTRA (words after --).
# Other globals: reads ROOT (the project root, set by the launcher before sourcing this file); sets LAUNCH_SHIFT,
# CMD (launch_torchrun_cmd) and IMAGENET_ROOT (launch_check_common).

launch_die() {
  # BASH_SOURCE's last entry is the launcher that sourced this file, whichever function calls this.
  echo "${BASH_SOURCE[-1]##*/}: $*" >&2
  exit 2
}

launch_need() {
  [[ $# -ge 2 && -n "$2" ]] || launch_die "$1 needs a value"
}

launch_usage() {
  # The comment block after the shebang is the launcher's documentation.
  awk 'NR == 1 { next } /^#/ { print; next } { exit }' "${BASH_SOURCE[-1]}"
}

launch_require_main() {
  [[ -f "$1" ]] || { echo "${BASH_SOURCE[-1]##*/}: $1 is missing: run scripts/setup_submodules.sh first" >&2; exit 1; }
}

launch_abspath() {
  realpath -m -- "$1"
}

launch_defaults() {
  GPUS=""
  NODES=1
  NODE_RANK=""
  MASTER_ADDR_ARG=""
  MASTER_PORT_ARG=29500
  SLURM=0
  PARTITION=""
  TIME_LIMIT="72:00:00"
  CPUS_PER_TASK=8
  DATA=""
  LOGDIR="logs"
  PYTHON_BIN="${PYTHON:-python}"
  DRY_RUN=0
  EXTRA=()
}

launch_common_option() {
  LAUNCH_SHIFT=2
  case "$1" in
    --gpus) launch_need "$@"; GPUS="$2" ;;
    --nodes) launch_need "$@"; NODES="$2" ;;
    --node-rank) launch_need "$@"; NODE_RANK="$2" ;;
    --master-addr) launch_need "$@"; MASTER_ADDR_ARG="$2" ;;
    --master-port) launch_need "$@"; MASTER_PORT_ARG="$2" ;;
    --slurm) SLURM=1; LAUNCH_SHIFT=1 ;;
    --partition) launch_need "$@"; PARTITION="$2" ;;
    --time) launch_need "$@"; TIME_LIMIT="$2" ;;
    --cpus-per-task) launch_need "$@"; CPUS_PER_TASK="$2" ;;
    --data) launch_need "$@"; DATA="$2" ;;
    --logdir) launch_need "$@"; LOGDIR="$2" ;;
    --python) launch_need "$@"; PYTHON_BIN="$2" ;;
    --dry-run) DRY_RUN=1; LAUNCH_SHIFT=1 ;;
    *) return 1 ;;
  esac
}

launch_parse() {
  local own=$1
  shift
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -h|--help) launch_usage; exit 0 ;;
      --) shift; EXTRA=("$@"); return 0 ;;
    esac
    "$own" "$@" || launch_common_option "$@" \
      || launch_die "unknown argument '$1' (see --help; main.py arguments go after --)"
    shift "$LAUNCH_SHIFT"
  done
}

launch_check_common() {
  # latent-diffusion's main.py takes Lightning 1.x --gpus lists, where "0," (one GPU, id 0) differs from "0";
  # enhancing's main.py takes a GPU count, so its launcher accepts plain lists only.
  local pattern='^[0-9]+(,[0-9]+)*$' examples="0 or 0,1,2,3"
  if [[ "${1:-}" == --gpus-trailing-comma ]]; then pattern='^[0-9]+(,[0-9]+)*,?$'; examples="0, or 0,1,2,3"; fi
  [[ "$NODES" =~ ^[1-9][0-9]*$ ]] || launch_die "--nodes must be a positive integer, got '$NODES'"
  if [[ -n "$GPUS" && ! "$GPUS" =~ $pattern ]]; then
    launch_die "--gpus takes GPU ids such as $examples; got '$GPUS'"
  fi
  [[ "$NODES" -eq 1 || -n "$GPUS" ]] || launch_die "several nodes need --gpus (the ids used on every node)"
  if [[ -n "$DATA" ]]; then
    [[ -d "$DATA" ]] || launch_die "--data $DATA is not a folder (expected train/<wnid>/*.JPEG and val/<wnid>/*.JPEG)"
    # absolute: the SLURM script and the enhancing launcher run from the project root, not from here
    IMAGENET_ROOT="$(launch_abspath "$DATA")"
    export IMAGENET_ROOT
  fi
}

launch_count_gpus() {
  awk -F, '{n = 0; for (i = 1; i <= NF; i++) if ($i != "") n++; print n}' <<<"$1"
}

launch_sbatch_head() {
  local job=$1 tasks=$2
  shift 2
  [[ -n "$GPUS" ]] || launch_die "--slurm needs --gpus"
  # One task per GPU: srun starts them and Lightning reads SLURM's variables for the ranks. Two minutes before the
  # time limit SLURM sends SIGUSR1: Lightning's SLURM environment saves and requeues the job (--requeue), and
  # the output file is appended to across requeues.
  cat <<EOF
#!/usr/bin/env bash
#SBATCH --job-name=$job
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$tasks
#SBATCH --gres=gpu:$tasks
#SBATCH --cpus-per-task=$CPUS_PER_TASK
#SBATCH --time=$TIME_LIMIT
${PARTITION:+#SBATCH --partition=$PARTITION}
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
EOF
  [[ $# -eq 0 ]] || printf '%s\n' "$@"
  echo "set -euo pipefail"
  echo "cd $(printf '%q' "$ROOT")"
}

launch_torchrun_cmd() {
  local tasks=$1
  shift
  # torchrun starts this node's processes; Lightning reads torchelastic's variables for the ranks.
  CMD=("$PYTHON_BIN" -m torch.distributed.run --nnodes "$NODES" --node_rank "$NODE_RANK" --nproc_per_node "$tasks"
       --master_addr "$MASTER_ADDR_ARG" --master_port "$MASTER_PORT_ARG" "$@")
}
