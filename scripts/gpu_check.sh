#!/usr/bin/env bash
# Everything the project has not yet run on a GPU, in one command, into one Markdown summary.
#
#   scripts/gpu_check.sh OUT_DIR [GPU_ID]      run on GPU GPU_ID (default 0; sets CUDA_VISIBLE_DEVICES to it)
#   scripts/gpu_check.sh --dry-run OUT_DIR     print each step's command and run nothing (no GPU needed)
#   scripts/gpu_check.sh --offline-data DIR    only write the offline ImageNet-layout photographs (step 5's data)
#
# Steps (stdout to OUT_DIR/<step>.out, stderr to OUT_DIR/<step>.err; a failing step is reported, the others run):
#   cuda_tests     pytest tests/test_quantizer_cuda.py tests/test_quantizer_search.py
#   bench_vq       scripts/bench_quantizer.py --device cuda at the paper's shapes: ours (fused and blocked search),
#                  taming + the released rotation, vector-quantize-pytorch
#   step_table3    scripts/bench_train_step.py vqgan_64 vs rot_vqgan_64, batch 16 (rotation's cost per training step)
#   step_table4    scripts/bench_train_step.py vitvqgan_small vs rot_vitvqgan_small, batch 32
#   ldm_main       the user's command, python third_party/latent-diffusion/main.py --base configs/rot_vqgan_64.yaml
#                  -t --gpus 0, for 40 steps on scikit-image's photographs laid out as an ImageNet folder
#                  (IMAGENET_ROOT; no ImageNet), checking that it writes a checkpoint and image grids
# The perceptual (LPIPS) loss is switched off (perceptual_weight=0) only where its weights are absent; the summary
# says so. Writes OUT_DIR/gpu_check.md and exits non-zero if a step failed; without a CUDA GPU it says so in one
# line and exits 1. PYTHON picks the interpreter (default: python).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
USAGE="usage: scripts/gpu_check.sh OUT_DIR [GPU_ID] | --dry-run OUT_DIR | --offline-data DIR"
TRAIN_IMAGES=192   # 12 batches of 16 per epoch: the 40 steps end within the config's 4 epochs
VAL_IMAGES=16
MAIN_STEPS=40

MODE=run
case "${1:-}" in
  --dry-run) MODE=dry; shift ;;
  --offline-data) MODE=data; shift ;;
  -h|--help) echo "$USAGE"; exit 0 ;;
esac
if [[ $# -lt 1 || $# -gt 2 || -z "$1" || "$1" == -* || ( $MODE != run && $# -ne 1 ) ]]; then
  echo "$USAGE" >&2
  exit 2
fi
OUT="$1"
GPU_ID="${2:-0}"
if [[ ! "$GPU_ID" =~ ^[0-9]+$ ]]; then
  echo "gpu_check.sh: GPU_ID must be a GPU index such as 0, got '$GPU_ID'" >&2
  exit 2
fi
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

make_offline_data() {  # DIR: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG from the photographs scikit-image ships
  "$PY" - "$1" "$TRAIN_IMAGES" "$VAL_IMAGES" <<'EOF'
import sys
from pathlib import Path

from PIL import Image, ImageOps

from adapters.evaluation.data import SKIMAGE_PHOTOS, load_photo

root, n_train, n_val = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
photos = [Image.fromarray(load_photo(name)) for name, _, _ in SKIMAGE_PHOTOS]
for split, n in (("train", n_train), ("val", n_val)):
    folder = root / split / "n00000000"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):  # the loaders crop at random (train) or in the centre (val); mirrored copies add variety
        img = photos[i % len(photos)]
        img = ImageOps.mirror(img) if (i // len(photos)) % 2 else img
        img.save(folder / f"photo_{i:04d}.JPEG", quality=90)
print(f"{root}: {n_train} train and {n_val} val images")
EOF
}

if [[ $MODE == data ]]; then
  make_offline_data "$OUT"
  exit 0
fi

# LPIPS weights: the Table 3 loss needs both files, the Table 4 loss torchvision's VGG16 only.
MISSING="$("$PY" -c 'from adapters.integrations.losses import lpips_weight_paths as p
print(" ".join(n for n, f in p().items() if not f.is_file()))' 2>/dev/null || echo "unknown")"
T3_LOSS=() T4_LOSS=() MAIN_LOSS=()
if [[ -n "$MISSING" ]]; then
  T3_LOSS=(-o model.params.lossconfig.params.perceptual_weight=0)
  MAIN_LOSS=(model.params.lossconfig.params.perceptual_weight=0)
  if [[ "$MISSING" == *vgg16* || "$MISSING" == unknown ]]; then
    T4_LOSS=(-o model.params.loss.params.perceptual_weight=0)
  fi
fi

DATA="$OUT/offline_imagenet"
LOGS="$OUT/ldm_logs"
declare -a STEPS=(cuda_tests bench_vq step_table3 step_table4 ldm_main)
declare -A TITLE=(
  [cuda_tests]="CUDA tests"
  [bench_vq]="VQ layer at the paper's shapes (bench_quantizer.py)"
  [step_table3]="Training step, Table 3 pair, batch 16 (bench_train_step.py)"
  [step_table4]="Training step, Table 4 pair, batch 32 (bench_train_step.py)"
  [ldm_main]="The user's command: latent-diffusion main.py, rot_vqgan_64, $MAIN_STEPS steps on offline data"
)
cmd_of() {  # the step's command as words
  case "$1" in
    cuda_tests) CMD=("$PY" -m pytest -q -p no:cacheprovider tests/test_quantizer_cuda.py
                     tests/test_quantizer_search.py) ;;
    bench_vq) CMD=("$PY" scripts/bench_quantizer.py --device cuda --repeats 20 --json "$OUT/bench_vq.json") ;;
    step_table3) CMD=("$PY" scripts/bench_train_step.py configs/vqgan_64.yaml configs/rot_vqgan_64.yaml --device cuda
                      --batch-size 16 --synthetic 256 --steps 20 --rounds 4 --warmup 5 ${T3_LOSS[@]+"${T3_LOSS[@]}"}) ;;
    step_table4) CMD=("$PY" scripts/bench_train_step.py configs/vitvqgan_small.yaml configs/rot_vitvqgan_small.yaml
                      --device cuda --batch-size 32 --synthetic 256 --steps 20 --rounds 4 --warmup 5
                      ${T4_LOSS[@]+"${T4_LOSS[@]}"}) ;;
    ldm_main) CMD=(env "IMAGENET_ROOT=$DATA" ROTATION_TRICK_OFFLINE=1
                   "$PY" third_party/latent-diffusion/main.py --base configs/rot_vqgan_64.yaml -t --gpus 0,
                   -l "$LOGS" "lightning.trainer.max_steps=$MAIN_STEPS" data.params.num_workers=4
                   lightning.callbacks.run_guard.params.every_n_train_steps=20 ${MAIN_LOSS[@]+"${MAIN_LOSS[@]}"}) ;;
  esac
}

show() {  # words as one shell line, quoted only where needed (so the user's `--gpus 0,` reads as typed)
  local w line=""
  for w in "$@"; do
    [[ "$w" =~ ^[A-Za-z0-9_./,=:+@%-]+$ ]] || w="$(printf '%q' "$w")"
    line+="${line:+ }$w"
  done
  echo "$line"
}

if [[ $MODE == dry ]]; then
  echo "offline data: scripts/gpu_check.sh --offline-data $DATA"
  for s in "${STEPS[@]}"; do
    cmd_of "$s"
    echo "$s: $(show "${CMD[@]}")"
  done
  exit 0
fi

export CUDA_VISIBLE_DEVICES="$GPU_ID"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check.sh: no CUDA GPU visible (GPU id $GPU_ID, torch.cuda.is_available() is False): run it on a machine with one" >&2
  exit 1
fi

mkdir -p "$OUT"
SUMMARY="$OUT/gpu_check.md"
DEVICE="$("$PY" -c 'import torch, triton
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, torch {torch.__version__}, "
      f"triton {triton.__version__}")' 2>/dev/null \
  || "$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "torch", torch.__version__)')"
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
[[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]] && COMMIT="$COMMIT + uncommitted changes"
{
  echo "# GPU check"
  echo
  echo "- command: \`scripts/gpu_check.sh $OUT $GPU_ID\`"
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); host: $(hostname)"
  echo "- device: $DEVICE"
  echo "- code: $COMMIT"
  if [[ -n "$MISSING" ]]; then
    echo "- perceptual loss: off where it needs absent weights ($MISSING): perceptual_weight=0 in step_table3," \
         "ldm_main${T4_LOSS[*]:+, step_table4}"
  else
    echo "- perceptual loss: on (LPIPS weights present)"
  fi
} > "$SUMMARY"

FAILED=()
if ! make_offline_data "$DATA" > "$OUT/offline_data.out" 2>&1; then
  echo "gpu_check.sh: could not write $DATA (see $OUT/offline_data.out)" >&2
  exit 1
fi
for s in "${STEPS[@]}"; do
  cmd_of "$s"
  echo "gpu_check.sh: $s ..." >&2
  t0=$SECONDS
  rc=0
  "${CMD[@]}" > "$OUT/$s.out" 2> "$OUT/$s.err" || rc=$?
  note=""
  if [[ $s == ldm_main && $rc -eq 0 ]]; then
    ckpts="$(find "$LOGS" -path '*/checkpoints/*.ckpt' 2>/dev/null | wc -l)"
    pngs="$(find "$LOGS" -path '*/images/train/*.png' 2>/dev/null | wc -l)"
    note="checkpoints: $ckpts, training image grids: $pngs (under $LOGS)"
    [[ $ckpts -gt 0 && $pngs -gt 0 ]] || rc=1
  fi
  [[ $rc -eq 0 ]] || FAILED+=("$s")
  {
    echo
    echo "## $s: ${TITLE[$s]}"
    echo
    echo "\`$(show "${CMD[@]}")\`"
    echo
    echo "exit $rc, $((SECONDS - t0)) s${note:+; $note}"
    echo
    case "$s" in
      bench_vq|step_table3|step_table4)  # their stdout is the Markdown table
        if [[ $rc -eq 0 ]]; then cat "$OUT/$s.out"; else echo '```'; tail -n 15 "$OUT/$s.err"; echo '```'; fi ;;
      *)
        echo '```'; tail -n 8 "$OUT/$s.out"; [[ $rc -eq 0 ]] || tail -n 15 "$OUT/$s.err"; echo '```' ;;
    esac
  } >> "$SUMMARY"
done

# The issue's GPU targets, read back from the step outputs.
"$PY" - "$OUT" >> "$SUMMARY" <<'EOF' || true
import json
import re
import sys
from pathlib import Path

out = Path(sys.argv[1])
print("\n## Targets\n")
try:
    rows = {(r["shape"], r["method"]): r for r in json.loads((out / "bench_vq.json").read_text()) if "error" not in r}
    for shape in ("table3_64x64x3", "table3_32x32x4"):
        f, u = rows[(shape, "fused")]["median_s"], rows[(shape, "upstream")]["median_s"]
        print(f"- {shape}: fused {f * 1e3:.2f} ms vs taming + released rotation {u * 1e3:.2f} ms = {u / f:.2f}x faster "
              f"(target at least 2x): {'met' if u / f >= 2 else 'missed'}")
except (OSError, KeyError, ValueError) as err:
    print(f"- quantizer benchmark: no figures ({type(err).__name__}: {err})")
row = re.compile(r"^\| (\S+) \| (\S+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$", re.M)
for step in ("step_table3", "step_table4"):
    try:
        table = row.findall((out / f"{step}.out").read_text())
        name, _, sec, ratio, paired = table[1]
        verdict = "met" if float(ratio) <= 1.01 else "missed"
        print(f"- {step}: {name} {float(sec):.4f} s/step, {float(ratio):.3f}x the straight-through step (median of "
              f"per-round ratios {float(paired):.3f}; target at most 1.01x): {verdict}")
    except (OSError, IndexError, ValueError) as err:
        print(f"- {step}: no figures ({type(err).__name__})")
EOF

if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "gpu_check.sh: failed steps: ${FAILED[*]} (see $SUMMARY and $OUT/<step>.err)" >&2
  exit 1
fi
echo "gpu_check.sh: all steps passed; summary in $SUMMARY" >&2
