#!/usr/bin/env bash
# Item 3, codebook initialisation, rotation row (run beside the STE row of init.sh, which was started first).
set -euo pipefail
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
cfg=small_rot_vqgan
d=outputs/item3/init/$cfg
python third_party/latent-diffusion/main.py --base configs/$cfg.yaml -t --logdir $d --seed 0 \
  lightning.trainer.max_steps=192 model.params.ckpt_path=outputs/item3/codebook_init_std0.4.ckpt
