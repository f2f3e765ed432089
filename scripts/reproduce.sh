#!/usr/bin/env bash
# Reproduce Tables 3 and 4 of the rotation-trick paper: train (or take checkpoints for) every row, evaluate, render.
#
#   scripts/reproduce.sh --scale tiny [--out DIR] [--report DIR]          # CPU, offline, < 30 min (smoke test)
#   scripts/reproduce.sh --scale small --seeds 0,1,2 [--jobs 3] [--out DIR] [--report DIR]   # CPU, offline, ~1 h
#   scripts/reproduce.sh --scale full --imagenet ROOT --gpus 0,1,2,3 [--out DIR] [--report DIR]
#
# Options:
#   --scale tiny|small|full
#                          small: configs/small_*.yaml, the paper's codebooks (8192 x 3 VQGAN; 8192 x 32
#                          l2-normalised ViT-VQGAN), loss settings and optimisers, 32 px crops of the offline
#                          photographs, small networks; rows STE, rotation (released gradient) and rotation (the
#                          paper's formula) for both codebases. CPU, no downloads, ~5 min per row (issue 8).
#                          tiny: the configs/tiny_*.yaml models on crops of scikit-image's bundled photographs
#                          (STE, rotation trick, Gumbel for VQGAN; STE and rotation for ViT-VQGAN), CPU, no downloads.
#                          full: the paper's ImageNet runs (Table 3: 4 epochs at batch 16; Table 4: 10 epochs at
#                          batch 32), then evaluation on the 50,000 validation images. See docs/evaluation.md for the
#                          GPU-hour estimates.
#   --out DIR              training runs, checkpoints and result JSONs (default: outputs/reproduce_<scale>, plus
#                          _kmeans with --init kmeans and _<remedy> with --remedy: one folder per setting)
#   --report DIR           tables and plots (default: DIR/report)
#   --gpus IDS             GPUs for training and evaluation, e.g. 0, or 0,1,2,3 (full; default 0,)
#   --imagenet ROOT        ImageNet root with train/<wnid>/ and val/<wnid>/ (full; default $IMAGENET_ROOT)
#   --inception-weights P  local torch-fidelity Inception-v3 weights (r-FID/r-IS). tiny: without it r-FID/r-IS are
#                          skipped (the weights cannot be downloaded offline); full: downloaded when absent
#   --lpips-backbone P     local torchvision AlexNet weights for the LPIPS metric (tiny: LPIPS skipped without it)
#   --checkpoints DIR      skip training: take DIR/<row>.ckpt (row names below) and evaluate/render those (not with
#                          --seeds or --fresh)
#   --rows LIST            comma-separated subset of rows (default: all of the scale)
#   --vqgan-steps N        tiny: training steps per VQGAN row (default 800)
#   --steps N              small: training steps of every row, both codebases (default 300; ViT-VQGAN: rounded
#                          up to whole epochs of 32 steps)
#   --seeds LIST           small: run every row once per seed (e.g. 0,1,2) into DIR/seed_<S>/, then write the
#                          per-seed table, mean +- std and verdicts (scripts/seed_summary.py) into the report
#   --jobs N               with --seeds: seeds trained in parallel (default 1); each process uses one thread
#   --vit-epochs N         tiny: epochs per ViT-VQGAN row (default 30; 32 steps each, lr 3e-4 as docs/vitvqgan.md's
#                          smoke run)
#   --vqgan-lr LR          tiny: VQGAN model.base_learning_rate (default 1e-4; main.py multiplies it by the batch, 4).
#                          small: default the config's (2.5e-5 x batch 16); --vqgan-lr 4.5e-6 is the paper's.
#                          The paper's 4.5e-6 is for 4 ImageNet epochs; a few hundred CPU steps need more to learn
#                          anything. The ViT-VQGAN rows use -lr 1e-4 as the paper (tiny: 3e-4, the smoke run's).
#   --eval-images N        images evaluated per row (tiny default 64; small 128; full default: all 50,000)
#   --seed N               training seed (default: each main.py's own, 23 for latent-diffusion, 0 for enhancing);
#                          labels get " (seed N)" so replicates stay apart in the tables
#   --init upstream|kmeans small: the codebook initialisation of every row (default upstream: each codebase's own
#                          draw; kmeans: k-means on the first training batch's encoder outputs, issue 17)
#   --remedy NAME          small, with --init kmeans: every row with one collapse remedy (issue 24): plain (default),
#                          ema (EMA codebook, decay 0.99), ema08 (EMA at decay 0.8, vector-quantize-pytorch #167's
#                          setting), ema_dead (ema + dead-code restarts under an EMA count of
#                          0.03, a quarter of the uniform rate 1,024/8,192 per batch), simvq (SimVQ's linear map of a
#                          frozen codebook), residual (ViT-VQGAN rows only: 2 residual stages, shared codebook; rows
#                          vit_ste, vit_rot = rotation over the sum, vit_rot_stage = rotation per stage). Rows:
#                          vqgan_ste vqgan_rot vit_ste vit_rot (residual: vit_ste vit_rot vit_rot_stage)
#   --fresh                start every row over: an earlier run of the row (its train folder and record) is moved to
#                          DIR/previous/<time>/ first, never deleted. Without it a rerun skips rows whose record is at
#                          the requested step and resumes unfinished rows from their own newest checkpoint (never a
#                          crash.ckpt), but only when that record or run was made with the same settings (init,
#                          remedy, seed, config and overrides: row.made_by in the record, made_by.json in the run);
#                          else it stops with one line naming --fresh
#   --overwrite            let make_tables replace a report made from other records (never done unasked)
#   --dry-run              print the commands, run nothing
# Rows: tiny: vqgan_ste vqgan_rot vqgan_gumbel vit_ste vit_rot
#       small: vqgan_ste vqgan_rot vqgan_rot_paper vit_ste vit_rot vit_rot_paper vqgan_regime_ste vqgan_regime_rot
#              (regime rows: a 128 x 3 codebook, 8 latent vectors per code in a batch as the paper; not in the default)
#       full: vqgan_ste_64 vqgan_rot_64 vqgan_gumbel_64 vqgan_ste_32 vqgan_rot_32 vqgan_gumbel_32 vit_ste vit_rot
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
INVOCATION="scripts/reproduce.sh $*"
PYTHON="${PYTHON:-python}"
SCALE=""
OUT=""
REPORT=""
GPUS="0,"
IMAGENET="${IMAGENET_ROOT:-}"
INCEPTION=""
LPIPS_BACKBONE=""
CKPTS=""
ROWS=""
VQGAN_STEPS=800
VIT_EPOCHS=30
VQGAN_LR=""
EVAL_IMAGES=""
SEED=""
SEEDS=""
JOBS=1
STEPS=300
ENH_LR=1e-4  # the ViT-VQGAN rows' learning rate (the paper's); tiny: 3e-4
INIT=upstream
REMEDY=plain
FRESH=0
OVERWRITE=0
DRY=0
PASS=()  # options handed on to the per-seed runs of --seeds

die() { echo "reproduce.sh: $*" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --scale) need_value "$@"; SCALE="$2"; PASS+=("$1" "$2"); shift 2 ;;
    --out) need_value "$@"; OUT="$2"; shift 2 ;;
    --report) need_value "$@"; REPORT="$2"; shift 2 ;;
    --seeds) need_value "$@"; SEEDS="$2"; shift 2 ;;
    --jobs) need_value "$@"; JOBS="$2"; shift 2 ;;
    --steps) need_value "$@"; STEPS="$2"; PASS+=("$1" "$2"); shift 2 ;;
    --gpus) need_value "$@"; GPUS="$2"; PASS+=("$1" "$2"); shift 2 ;;
    --imagenet) need_value "$@"; IMAGENET="$2"; PASS+=("$1" "$2"); shift 2 ;;
    --inception-weights) need_value "$@"; INCEPTION="$2"; PASS+=("$1" "$2"); shift 2 ;;
    --lpips-backbone) need_value "$@"; LPIPS_BACKBONE="$2"; PASS+=("$1" "$2"); shift 2 ;;
    --checkpoints) need_value "$@"; CKPTS="$2"; shift 2 ;;
    --rows) need_value "$@"; ROWS="$2"; PASS+=("$1" "$2"); shift 2 ;;
    --vqgan-steps) need_value "$@"; VQGAN_STEPS="$2"; PASS+=("$1" "$2"); shift 2 ;;
    --vit-epochs) need_value "$@"; VIT_EPOCHS="$2"; PASS+=("$1" "$2"); shift 2 ;;
    --vqgan-lr) need_value "$@"; VQGAN_LR="$2"; PASS+=("$1" "$2"); shift 2 ;;
    --eval-images) need_value "$@"; EVAL_IMAGES="$2"; PASS+=("$1" "$2"); shift 2 ;;
    --seed) need_value "$@"; SEED="$2"; shift 2 ;;
    --init) need_value "$@"; INIT="$2"; PASS+=("$1" "$2"); shift 2 ;;
    --remedy) need_value "$@"; REMEDY="$2"; PASS+=("$1" "$2"); shift 2 ;;
    --fresh) FRESH=1; PASS+=("$1"); shift ;;
    --overwrite) OVERWRITE=1; PASS+=("$1"); shift ;;
    --dry-run) DRY=1; PASS+=("$1"); shift ;;
    -h|--help) sed -n '2,52p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ "$SCALE" == "tiny" || "$SCALE" == "small" || "$SCALE" == "full" ]] || die "--scale tiny|small|full is required"
[[ "$INIT" == upstream || "$INIT" == kmeans ]] || die "--init takes upstream or kmeans, got '$INIT'"
[[ "$INIT" == upstream || "$SCALE" == small ]] || die "--init kmeans is wired for --scale small only; for other scales set codebook_init in the config (model.params.quantizer_config.codebook_init / model.params.quantizer.codebook_init)"
[[ "$STEPS" =~ ^[1-9][0-9]*$ ]] || die "--steps needs a positive integer, got '$STEPS'"
case "$REMEDY" in plain|ema|ema08|ema_dead|simvq|residual) ;; *) die "--remedy takes plain, ema, ema08, ema_dead, simvq or residual, got '$REMEDY'" ;; esac
[[ "$REMEDY" == plain || ( "$SCALE" == small && "$INIT" == kmeans ) ]] || die "--remedy $REMEDY is wired for --scale small --init kmeans only (issue 24's study); elsewhere set the quantizer options in the config (README, 'Collapse remedies')"
if [[ -n "$CKPTS" && "$FRESH" == 1 ]]; then die "--fresh and --checkpoints exclude each other"; fi
[[ -z "$CKPTS" || -z "$SEEDS" ]] || die "--checkpoints and --seeds exclude each other: --seeds trains every seed; evaluate given checkpoints with one run per seed (--checkpoints DIR --seed S)"
OUT_DEFAULT="$ROOT/outputs/reproduce_$SCALE"
[[ "$INIT" == kmeans ]] && OUT_DEFAULT+="_kmeans"
[[ "$REMEDY" != plain ]] && OUT_DEFAULT+="_$REMEDY"
OUT="${OUT:-$OUT_DEFAULT}"
REPORT="${REPORT:-$OUT/report}"
cd "$ROOT"

if [[ -n "$SEEDS" ]]; then
  # One full run per seed (its own folder and report), --jobs of them at a time, then the across-seed summary.
  [[ -z "$SEED" ]] || die "--seed and --seeds exclude each other"
  [[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || die "--jobs needs a positive integer, got '$JOBS'"
  mkdir -p "$OUT" "$REPORT"
  START=$(date +%s)
  pids=()
  for s in ${SEEDS//,/ }; do
    [[ "$s" =~ ^[0-9]+$ ]] || die "--seeds: '$s' is not a non-negative integer"
    cmd=(bash "${BASH_SOURCE[0]}" "${PASS[@]}" --seed "$s" --out "$OUT/seed_$s" --report "$OUT/seed_$s/report")
    printf '+'; printf ' %q' "${cmd[@]}"; printf ' > %q 2>&1\n' "$OUT/seed_$s.log"
    if [[ $DRY == 1 ]]; then "${cmd[@]}"; continue; fi
    "${cmd[@]}" > "$OUT/seed_$s.log" 2>&1 &
    pids+=($!)
    while [[ $(jobs -rp | wc -l) -ge $JOBS ]]; do wait -n || true; done
  done
  fail=0
  for p in "${pids[@]}"; do wait "$p" || fail=1; done
  (( fail == 0 )) || echo "reproduce.sh: a seed's run failed (see $OUT/seed_*.log); summarising what finished" >&2
  # --embed-curves: each record keeps its training curves, so the figures survive the run folders.
  summary=("$PYTHON" scripts/seed_summary.py "$OUT" --out "$REPORT" --command "$INVOCATION" --embed-curves
           --wall-seconds "$(( $(date +%s) - START ))")
  (( OVERWRITE == 1 )) && summary+=(--overwrite)
  printf '+'; printf ' %q' "${summary[@]}"; printf '\n'
  [[ $DRY == 1 ]] || "${summary[@]}" || fail=1
  echo "reproduce.sh: seeds $SEEDS done in $(( $(date +%s) - START ))s; per-seed runs in $OUT/seed_*, summary in $REPORT"
  exit "$fail"
fi

# row -> "trainer|config|paper setting|label|extra training overrides"
declare -A SPEC
if [[ "$SCALE" == tiny ]]; then
  ALL_ROWS="vqgan_ste vqgan_rot vqgan_gumbel vit_ste vit_rot"
  SPEC[vqgan_ste]="ldm|configs/tiny_vqgan.yaml|64x64x3|tiny VQGAN (STE)|"
  SPEC[vqgan_rot]="ldm|configs/tiny_rot_vqgan.yaml|64x64x3|tiny VQGAN w/ rotation trick|"
  # The Gumbel baseline is the STE config with taming's Gumbel quantizer swapped in (adapters.integrations.ldm.GumbelVQModel).
  SPEC[vqgan_gumbel]="ldm|configs/tiny_vqgan.yaml|64x64x3|tiny Gumbel VQGAN|model.target=adapters.integrations.ldm.GumbelVQModel model.params.kl_weight=1.0e-08"
  SPEC[vit_ste]="enh|tiny_vitvqgan||tiny ViT-VQGAN (STE)|"
  SPEC[vit_rot]="enh|tiny_rot_vitvqgan||tiny ViT-VQGAN w/ rotation trick|"
  EVAL_IMAGES="${EVAL_IMAGES:-64}"
  VQGAN_LR="${VQGAN_LR:-1e-4}"
  ENH_LR=3e-4  # the tiny ViT-VQGAN smoke run's (docs/vitvqgan.md): at 1e-4 it stays noise for hundreds of steps
  # Small models on a shared CPU: one thread per process is faster than oversubscribed cores (often by 10x).
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
elif [[ "$SCALE" == small ]]; then
  # Issue 8: the paper's codebooks and losses at a size a 2-core CPU trains in minutes (configs/small_*.yaml).
  ALL_ROWS="vqgan_ste vqgan_rot vqgan_rot_paper vit_ste vit_rot vit_rot_paper"
  SPEC[vqgan_ste]="ldm|configs/small_vqgan.yaml|64x64x3|small VQGAN 8192x3 (STE)|"
  SPEC[vqgan_rot]="ldm|configs/small_rot_vqgan.yaml|64x64x3|small VQGAN 8192x3 w/ rotation trick (released)|"
  SPEC[vqgan_rot_paper]="ldm|configs/small_rot_paper_vqgan.yaml|64x64x3|small VQGAN 8192x3 w/ rotation trick (paper's formula)|"
  SPEC[vit_ste]="enh|small_vitvqgan||small ViT-VQGAN 8192x32 (STE)|"
  SPEC[vit_rot]="enh|small_rot_vitvqgan||small ViT-VQGAN 8192x32 w/ rotation trick (released)|"
  SPEC[vit_rot_paper]="enh|small_rot_paper_vitvqgan||small ViT-VQGAN 8192x32 w/ rotation trick (paper's formula)|"
  # Issue 17's regime arm: one config, the STE row sets the estimator (the only difference).
  SPEC[vqgan_regime_ste]="ldm|configs/small_regime_vqgan.yaml|64x64x3|small VQGAN 128x3 regime (STE)|model.params.gradient=ste"
  SPEC[vqgan_regime_rot]="ldm|configs/small_regime_vqgan.yaml|64x64x3|small VQGAN 128x3 regime w/ rotation trick (released)|"
  with_setting() {  # OVERRIDES FROM TO ROW...: add the overrides to each VQGAN row, and FROM -> TO in its label
    local add="$1" from="$2" to="$3" r; shift 3
    for r in "$@"; do
      SPEC[$r]="${SPEC[$r]%|*}|${SPEC[$r]##*|} $add"
      SPEC[$r]="${SPEC[$r]/"$from"/"$to"}"
    done
  }
  if [[ "$INIT" == kmeans ]]; then
    # VQGAN rows take the override; ViT-VQGAN configs name their base (configs/small_kmeans_*vitvqgan.yaml).
    with_setting "model.params.quantizer_config.codebook_init=kmeans" ")|" ", k-means init)|" \
      vqgan_ste vqgan_rot vqgan_rot_paper vqgan_regime_ste vqgan_regime_rot
    SPEC[vit_ste]="enh|small_kmeans_vitvqgan||small ViT-VQGAN 8192x32 (STE, k-means init)|"
    SPEC[vit_rot]="enh|small_kmeans_rot_vitvqgan||small ViT-VQGAN 8192x32 w/ rotation trick (released, k-means init)|"
    unset 'SPEC[vit_rot_paper]'
    ALL_ROWS="vqgan_ste vqgan_rot vqgan_rot_paper vit_ste vit_rot"
  fi
  if [[ "$REMEDY" != plain ]]; then
    # Issue 24: the same rows with one remedy; both arms of a pair get the same settings, only the estimator differs.
    # VQGAN rows take quantizer overrides; ViT-VQGAN rows name a config per remedy (configs/small_kmeans_<remedy>_*).
    case "$REMEDY" in
      ema) q="model.params.quantizer_config.codebook_update=ema"; what="EMA codebook" ;;
      ema08) q="model.params.quantizer_config.codebook_update=ema model.params.quantizer_config.ema_decay=0.8"; what="EMA codebook, decay 0.8" ;;
      ema_dead) q="model.params.quantizer_config.codebook_update=ema model.params.quantizer_config.dead_code_threshold=0.03"; what="EMA + dead-code restarts" ;;
      simvq) q="model.params.quantizer_config.codebook_param=simvq"; what="SimVQ" ;;
      residual) q=""; what="2 residual stages" ;;
    esac
    with_setting "$q" "k-means init)|" "k-means init, $what)|" vqgan_ste vqgan_rot
    SPEC[vit_ste]="enh|small_kmeans_${REMEDY}_vitvqgan||small ViT-VQGAN 8192x32 (STE, k-means init, $what)|"
    SPEC[vit_rot]="enh|small_kmeans_${REMEDY}_rot_vitvqgan||small ViT-VQGAN 8192x32 w/ rotation trick (released, k-means init, $what)|"
    unset 'SPEC[vqgan_rot_paper]'
    ALL_ROWS="vqgan_ste vqgan_rot vit_ste vit_rot"
    if [[ "$REMEDY" == residual ]]; then
      SPEC[vit_rot]="${SPEC[vit_rot]/)|/, rotation over the sum)|}"
      SPEC[vit_rot_stage]="enh|small_kmeans_residual_rot_stage_vitvqgan||small ViT-VQGAN 8192x32 w/ rotation trick (released, k-means init, $what, rotation per stage)|"
      unset 'SPEC[vqgan_ste]' 'SPEC[vqgan_rot]'
      ALL_ROWS="vit_ste vit_rot vit_rot_stage"
    fi
  fi
  EVAL_IMAGES="${EVAL_IMAGES:-128}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
else
  ALL_ROWS="vqgan_ste_64 vqgan_rot_64 vqgan_gumbel_64 vqgan_ste_32 vqgan_rot_32 vqgan_gumbel_32 vit_ste vit_rot"
  SPEC[vqgan_ste_64]="ldm|configs/vqgan_64.yaml|64x64x3|VQGAN 64x64x3|"
  SPEC[vqgan_rot_64]="ldm|configs/rot_vqgan_64.yaml|64x64x3|VQGAN w/ rotation trick 64x64x3|"
  SPEC[vqgan_gumbel_64]="ldm|configs/gumbel_vqgan_64.yaml|64x64x3|Gumbel VQGAN 64x64x3|"
  SPEC[vqgan_ste_32]="ldm|configs/vqgan_32.yaml|32x32x4|VQGAN 32x32x4|"
  SPEC[vqgan_rot_32]="ldm|configs/rot_vqgan_32.yaml|32x32x4|VQGAN w/ rotation trick 32x32x4|"
  SPEC[vqgan_gumbel_32]="ldm|configs/gumbel_vqgan_32.yaml|32x32x4|Gumbel VQGAN 32x32x4|"
  SPEC[vit_ste]="enh|vitvqgan_small||ViT-VQGAN|"
  SPEC[vit_rot]="enh|rot_vitvqgan_small||ViT-VQGAN w/ rotation trick|"
  if [[ -z "$IMAGENET" && $DRY == 0 ]]; then
    die "--scale full needs ImageNet: pass --imagenet ROOT or set IMAGENET_ROOT (train/<wnid>/, val/<wnid>/)"
  fi
  export IMAGENET_ROOT="$IMAGENET"
fi
ROWS="${ROWS:-$ALL_ROWS}"
ROWS="${ROWS//,/ }"
for row in $ROWS; do [[ -n "${SPEC[$row]+x}" ]] || die "unknown row '$row' for --scale $SCALE${REMEDY/#plain/} (rows: $ALL_ROWS)"; done
NGPU=$(awk -F, '{n=0; for (i=1;i<=NF;i++) if ($i != "") n++; print n}' <<< "$GPUS")

run() {  # print, then run unless --dry-run
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ $DRY == 0 ]]; then "$@"; fi
}

mkdir -p "$OUT/results" "$OUT/train" "$REPORT"
START=$(date +%s)
for row in $ROWS; do
  IFS='|' read -r trainer config setting label overrides <<< "${SPEC[$row]}"
  [[ -n "$SEED" ]] && label="$label (seed $SEED)"
  echo "=== $row: $label ($(( $(date +%s) - START ))s elapsed)"
  run_dir="$OUT/train/$row"
  record="$OUT/results/$row.json"
  # What makes this row (issue 23, item 3): kept in its record and its run folder; a rerun reuses only its own.
  lr="$VQGAN_LR"; [[ "$trainer" == enh ]] && lr=$ENH_LR
  made_by=$("$PYTHON" scripts/lib/row_settings.py made-by --trainer "$trainer" --config "$config" \
            --overrides "$overrides" --seed "$SEED" --lr "$lr" --init "$INIT" --remedy "$REMEDY")
  same_settings() {  # $1: a record or made_by.json; dies with one line when it was made otherwise
    local why
    why=$("$PYTHON" scripts/lib/row_settings.py check --expect "$made_by" "$1") && return 0
    die "row $row: $1 was made with other settings ($why); pass --fresh to move it aside and start over, or use another --out"
  }
  # The step a finished row's checkpoint holds (ViT-VQGAN: whole epochs of 32 steps covering --steps).
  target=$STEPS; [[ "$trainer" == enh && "$SCALE" == small ]] && target=$(( (STEPS + 31) / 32 * 32 ))
  if [[ -z "$CKPTS" && $DRY == 0 ]]; then
    if (( FRESH == 1 )) && [[ -e "$run_dir" || -e "$record" ]]; then
      aside="$OUT/previous/$(date +%Y%m%dT%H%M%S)/$row"
      mkdir -p "$aside"
      for f in "$run_dir" "$record" "${record%.json}.png"; do [[ -e "$f" ]] && mv "$f" "$aside/"; done
      echo "reproduce.sh: --fresh: the earlier run of $row was moved to $aside"
    elif [[ -f "$record" && "$SCALE" != full ]]; then
      same_settings "$record"
      done_step=$("$PYTHON" scripts/lib/checkpoints.py record-step "$record")
      if [[ "$done_step" == "$target" ]]; then
        echo "reproduce.sh: $row is finished (its record is at step $done_step); skipped (--fresh reruns it)"
        continue
      fi
      echo "reproduce.sh: $row's record is at step $done_step, not $target: training goes on"
    fi
  fi
  if [[ -n "$CKPTS" ]]; then
    ckpt="$CKPTS/$row.ckpt"
    [[ $DRY == 1 || -f "$ckpt" ]] || die "--checkpoints $CKPTS: no $row.ckpt there"
    eval_config="$config"
    [[ "$trainer" == enh ]] && eval_config="configs/$config.yaml"
  elif [[ "$trainer" == ldm ]]; then
    # latent-diffusion's main.py (patched for Lightning 2): logs/checkpoints go to <run_dir>/<time>_<name>/.
    # One run folder per row: an unfinished row resumes in it (-r keeps its folder, config and step).
    mapfile -t prior < <(ls -d "$run_dir"/*/ 2>/dev/null | sort)
    if (( ${#prior[@]} > 1 )); then
      die "row $row: $run_dir holds ${#prior[@]} runs; evaluating one of them would mix runs. Keep one, or pass --fresh"
    elif (( ${#prior[@]} == 1 )) && [[ -f "${prior[0]%/}/checkpoints/last.ckpt" ]]; then
      [[ $DRY == 1 ]] || same_settings "$run_dir/made_by.json"
      echo "reproduce.sh: $row resumes ${prior[0]%/} from its last.ckpt (step $("$PYTHON" scripts/lib/checkpoints.py step "${prior[0]%/}/checkpoints/last.ckpt"))"
      train_args=(-r "${prior[0]%/}" -t)
    else
      if (( ${#prior[@]} == 1 )); then  # a run that died before its first save: keep its logs aside
        aside="$OUT/previous/$(date +%Y%m%dT%H%M%S)/$row"; mkdir -p "$aside"; mv "${prior[0]%/}" "$aside/"
        echo "reproduce.sh: $row's earlier run had no checkpoint; moved to $aside, starting over"
      fi
      train_args=(--base "$config" -t --logdir "$run_dir")
      [[ $DRY == 1 ]] || { mkdir -p "$run_dir"; echo "$made_by" > "$run_dir/made_by.json"; }
    fi
    [[ -n "$SEED" ]] && train_args+=(--seed "$SEED")
    if [[ "$SCALE" == tiny ]]; then
      train_args+=("lightning.trainer.max_steps=$VQGAN_STEPS" "model.base_learning_rate=$VQGAN_LR")
    elif [[ "$SCALE" == small ]]; then
      train_args+=("lightning.trainer.max_steps=$STEPS")
      [[ -n "$VQGAN_LR" ]] && train_args+=("model.base_learning_rate=$VQGAN_LR")
    else
      train_args+=(--gpus "$GPUS" "lightning.trainer.max_epochs=4")
    fi
    # shellcheck disable=SC2206  # overrides are space-separated key=value words
    extra=($overrides)
    [[ "${train_args[0]}" == -r ]] && extra=()  # the resumed run's saved config already holds them
    run "$PYTHON" third_party/latent-diffusion/main.py "${train_args[@]}" "${extra[@]}"
    log_dir=$(ls -d "$run_dir"/*/ 2>/dev/null | sort | tail -n 1 || true)
    log_dir="${log_dir:-$run_dir/<time>_<name>}"  # (the placeholder only shows in --dry-run)
    ckpt="${log_dir%/}/checkpoints/last.ckpt"
    # The run's saved config holds the command-line overrides (e.g. the Gumbel quantizer).
    eval_config=$(ls "${log_dir%/}"/configs/*-project.yaml 2>/dev/null | sort | tail -n 1 || true)
    eval_config="${eval_config:-$config}"
  else
    # enhancing-transformers' main.py (patched): runs go to <run_dir>/<config>/<ENHANCING_RUN_ID>/{ckpt,log}.
    if [[ "$SCALE" == tiny ]]; then
      enh_args=(-c "$config" -lr "$ENH_LR" -e "$VIT_EPOCHS" -ng 0 -l csv -b 1000 -o "$run_dir")
    elif [[ "$SCALE" == small ]]; then
      # 32 steps per epoch (512 crops at batch 16): whole epochs covering --steps.
      enh_args=(-c "$config" -lr "$ENH_LR" -e "$(( (STEPS + 31) / 32 ))" -ng 0 -l csv -b 1000000 -o "$run_dir")
    else
      enh_args=(-c "$config" -lr "$ENH_LR" -e 10 -ng "$NGPU" -l tensorboard -o "$run_dir")
    fi
    [[ -n "$SEED" ]] && enh_args+=(-s "$SEED")
    # One folder per row (ENHANCING_RUN_ID): an unfinished row resumes from the checkpoint with the highest stored
    # step (file names sort as text: epoch=99 after epoch=121), never from an earlier run's leftover by name.
    ckdir="$run_dir/$config/$row/ckpt"
    if [[ $DRY == 0 ]] && compgen -G "$ckdir/*.ckpt" > /dev/null; then
      same_settings "$run_dir/made_by.json"
      resume_from=$("$PYTHON" scripts/lib/checkpoints.py newest "$ckdir")
      echo "reproduce.sh: $row resumes from $resume_from (step $("$PYTHON" scripts/lib/checkpoints.py step "$resume_from"))"
      enh_args+=(-r "$resume_from")
    fi
    [[ $DRY == 1 || -f "$run_dir/made_by.json" ]] || { mkdir -p "$run_dir"; echo "$made_by" > "$run_dir/made_by.json"; }
    run env ENHANCING_RUN_ID="$row" "$PYTHON" third_party/enhancing-transformers/main.py "${enh_args[@]}"
    ckpt=""
    [[ $DRY == 0 ]] && ckpt=$("$PYTHON" scripts/lib/checkpoints.py newest "$ckdir" || true)
    ckpt="${ckpt:-$ckdir/<newest by stored step>.ckpt}"
    eval_config="configs/$config.yaml"
  fi
  [[ $DRY == 1 || -f "$ckpt" ]] || die "row $row: training left no checkpoint (looked for ${ckpt:-a .ckpt under $run_dir})"
  if [[ $DRY == 0 && -z "$CKPTS" && "$SCALE" == small ]]; then
    # Evaluate the step that was asked for, never a leftover of an earlier, longer run in the same folder.
    got=$("$PYTHON" scripts/lib/checkpoints.py step "$ckpt")
    [[ "$got" == "$target" ]] || die "row $row: its newest checkpoint ($ckpt) is at step $got, not $target: an earlier run of this row went elsewhere. Pass --fresh to start the row over (the earlier run is kept aside), or ask for --steps to match"
  fi

  eval_args=(--config "$eval_config" --checkpoint "$ckpt" --out "$OUT/results/$row.json" --label "$label")
  [[ -z "$CKPTS" ]] && eval_args+=(--made-by "$made_by")
  [[ -n "$setting" ]] && eval_args+=(--setting "$setting")
  if [[ "$SCALE" != full ]]; then
    # small: per-batch usage at the training batch (16), as the paper measures it at its training batch.
    bs=4; [[ "$SCALE" == small ]] && bs=16
    eval_args+=(--offline-photos --limit "$EVAL_IMAGES" --batch-size "$bs" --device cpu --num-workers 0 --offline)
    if [[ -n "$INCEPTION" ]]; then eval_args+=(--inception-weights "$INCEPTION"); else eval_args+=(--no-fid); fi
    if [[ -n "$LPIPS_BACKBONE" ]]; then eval_args+=(--lpips-backbone "$LPIPS_BACKBONE"); else eval_args+=(--no-lpips); fi
  else
    # Per-batch codebook usage is measured at the paper's training batch: 16 (Table 3), 32 (Table 4).
    bs=16; [[ "$trainer" == enh ]] && bs=32
    eval_args+=(--data-root "$IMAGENET" --split val --batch-size "$bs")
    [[ -n "$EVAL_IMAGES" ]] && eval_args+=(--limit "$EVAL_IMAGES")
    [[ -n "$INCEPTION" ]] && eval_args+=(--inception-weights "$INCEPTION")
    [[ -n "$LPIPS_BACKBONE" ]] && eval_args+=(--lpips-backbone "$LPIPS_BACKBONE")
  fi
  if [[ "$SCALE" == full && "$NGPU" -gt 1 ]]; then
    run env CUDA_VISIBLE_DEVICES="${GPUS%,}" torchrun --standalone --nproc_per_node "$NGPU" scripts/evaluate.py "${eval_args[@]}"
  elif [[ "$SCALE" == full ]]; then
    run env CUDA_VISIBLE_DEVICES="${GPUS%,}" "$PYTHON" scripts/evaluate.py "${eval_args[@]}"
  else
    run "$PYTHON" scripts/evaluate.py "${eval_args[@]}"
  fi
done

tables=("$PYTHON" scripts/make_tables.py "$OUT/results" --out "$REPORT" --command "$INVOCATION")
(( OVERWRITE == 1 )) && tables+=(--overwrite)  # a report made from other records is replaced only when asked
run "${tables[@]}"
# The report folder keeps the records it was made from (and their example reconstructions), so it stands alone.
if [[ $DRY == 0 && "$(cd "$REPORT" && pwd)" != "$(cd "$OUT/results" && pwd)" ]]; then
  mkdir -p "$REPORT/results"
  cp "$OUT"/results/*.json "$OUT"/results/*.png "$REPORT/results/" 2>/dev/null || true
fi
echo "reproduce.sh: done in $(( $(date +%s) - START ))s; results in $OUT/results, tables and plots in $REPORT"
