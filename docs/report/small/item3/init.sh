#!/usr/bin/env bash
# Item 3, codebook initialisation: the small VQGAN with its codebook drawn at the encoder outputs' scale
# (N(0, 0.4^2) per element, ||c|| ~ 0.7 = median ||e|| at init) instead of taming's uniform(-1/8192, 1/8192).
# The codebook-only checkpoint was written first with
#   python -c "import torch; g=torch.Generator().manual_seed(0); torch.save({'state_dict': {'quantize.embedding.weight':
#              torch.randn(8192, 3, generator=g) * 0.4}}, 'outputs/item3/codebook_init_std0.4.ckpt')"
# (this script's loop was stopped after its STE row; the rotation row ran beside it, init_rot.sh.)
set -euo pipefail
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for cfg in small_vqgan small_rot_vqgan; do
  d=outputs/item3/init/$cfg
  python third_party/latent-diffusion/main.py --base configs/$cfg.yaml -t --logdir $d --seed 0 \
    lightning.trainer.max_steps=192 model.params.ckpt_path=outputs/item3/codebook_init_std0.4.ckpt
  run=$(ls -d $d/*/ | tail -1)
  python scripts/evaluate.py --config $(ls ${run}configs/*-project.yaml | tail -1) --checkpoint ${run}checkpoints/last.ckpt \
    --out outputs/item3/init/results/$cfg.json --label "$cfg codebook init N(0,0.4^2) (seed 0)" --setting 64x64x3 \
    --offline-photos --limit 128 --batch-size 16 --device cpu --num-workers 0 --offline --no-fid --no-lpips
done
