#!/usr/bin/env python
"""Evaluate one VQGAN / ViT-VQGAN checkpoint as in the rotation-trick paper's Tables 3 and 4; write one JSON.

Examples (see docs/evaluation.md):

  # ImageNet validation, one GPU
  python scripts/evaluate.py --config configs/rot_vqgan_64.yaml --checkpoint logs/<run>/checkpoints/last.ckpt \\
      --data-root /data/ILSVRC2012 --split val --batch-size 16 --out results/rot_vqgan_64.json
  # several GPUs: each evaluates a shard, statistics are summed
  torchrun --nproc_per_node 4 scripts/evaluate.py ...same arguments...
  # offline smoke test on CPU (scikit-image's photographs; no Inception/LPIPS weights needed)
  python scripts/evaluate.py --config configs/tiny_rot_vqgan.yaml --checkpoint logs/<run>/checkpoints/last.ckpt \\
      --offline-photos --limit 64 --batch-size 4 --num-workers 0 --no-fid --no-lpips --offline --out results/tiny.json

The model comes from the config's ``model: {target, params}`` (latent-diffusion, taming or enhancing-transformers
classes, ours or upstream's) and the checkpoint's ``state_dict``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]


def _import_paths(extra: Sequence[str]) -> None:
    """Make the project and the upstream trees importable, as upstream main.py runs from its tree root."""
    for p in [str(ROOT), *extra]:
        if p not in sys.path:
            sys.path.insert(0, p)
    for tree in ("latent-diffusion", "enhancing-transformers"):
        t = ROOT / "third_party" / tree
        if t.is_dir() and str(t) not in sys.path:
            sys.path.append(str(t))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", nargs="+", required=True,
                   help="model config YAML(s) the checkpoint was trained with; later ones override earlier ones")
    p.add_argument("--checkpoint", required=True, help="Lightning .ckpt (or a plain state dict)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a checkpoint holding more than weights and Lightning's data types with "
                        "weights_only=False: its pickle can run code, so only for files you trust")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data-root", help="ImageNet root holding train/<wnid>/ and val/<wnid>/ (else $IMAGENET_ROOT "
                                         "with --imagenet)")
    src.add_argument("--imagenet", action="store_true", help="ImageNet at $IMAGENET_ROOT")
    src.add_argument("--offline-photos", action="store_true",
                     help="deterministic crops of scikit-image's bundled photographs (offline smoke tests)")
    p.add_argument("--split", default="val", help="ImageNet split (default: val)")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate at most this many images (ImageNet: spread evenly over classes); the paper uses all "
                        "50,000 validation images")
    p.add_argument("--size", type=int, default=None, help="image side (default: the config's training resolution)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="evaluation batch per device; also the batch of the per-batch codebook usage (paper: 16 for "
                        "Table 3, 32 for Table 4)")
    p.add_argument("--num-workers", type=int, default=4,
                   help="data-loader processes (default 4, for ImageNet JPEGs on a GPU machine); 0 on a small CPU "
                        "machine or for the offline photographs, which need no decoding workers")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--out", required=True, help="output JSON path (an examples PNG is written beside it)")
    p.add_argument("--inception-weights", default=None,
                   help="local copy of torch-fidelity's weights-inception-2015-12-05-6726825d.pth (air-gapped)")
    p.add_argument("--no-fid", action="store_true", help="skip r-FID and r-IS")
    p.add_argument("--no-lpips", action="store_true", help="skip the LPIPS metric")
    p.add_argument("--lpips-net", default="alex", choices=["alex", "vgg"])
    p.add_argument("--lpips-backbone", default=None,
                   help="local torchvision backbone state dict for LPIPS (alexnet-owt-7be5be79.pth / vgg16-397923af.pth)")
    p.add_argument("--no-valid-loss", action="store_true", help="skip the loss module's val/rec_loss")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights (latent-diffusion use_ema)")
    p.add_argument("--offline", action="store_true",
                   help="never download weights (also implied by ROTATION_TRICK_OFFLINE=1): missing ones are an error")
    p.add_argument("--examples", type=int, default=8, help="originals/reconstructions saved in the PNG (0: none)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--table", type=int, choices=[3, 4], default=None,
                   help="paper table this run belongs to (default: 3 for latent-diffusion/taming, 4 for ViT-VQGAN)")
    p.add_argument("--approach", choices=["ste", "gumbel", "rotation"], default=None,
                   help="paper row (default: from the quantizer)")
    p.add_argument("--setting", default=None,
                   help="paper latent shape to compare with, e.g. 64x64x3 (default: the model's own latent shape)")
    p.add_argument("--label", default=None, help="free-text name of the run in tables and plots")
    p.add_argument("--made-by", default=None, type=json.loads,
                   help="JSON of the settings that made the run (scripts/reproduce.sh: row.made_by in the record)")
    p.add_argument("--pythonpath", action="append", default=[], help="extra import path (e.g. another upstream tree)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    _import_paths(args.pythonpath)
    from adapters import evaluation as E

    rank, world = E.init_distributed()
    offline = args.offline or os.environ.get("ROTATION_TRICK_OFFLINE", "") not in ("", "0")
    opts = E.EvalOptions(batch_size=args.batch_size, num_workers=args.num_workers, limit=args.limit,
                         device=args.device, fid=not args.no_fid, inception_weights=args.inception_weights,
                         lpips=not args.no_lpips, lpips_net=args.lpips_net, lpips_backbone=args.lpips_backbone,
                         valid_loss=not args.no_valid_loss, ema=args.ema, allow_download=not offline,
                         progress=not args.no_progress, examples=args.examples,
                         trust_checkpoint=args.trust_checkpoint)
    if args.data_root or args.imagenet:
        source, root = "imagenet", args.data_root
    elif args.offline_photos:
        source, root = "photos", None
    else:
        source, root = "config", None

    def dataset(loaded: "E.LoadedModel"):
        return E.build_dataset(loaded, source, root=root, split=args.split, size=args.size, limit=args.limit)

    row = None
    if any(v is not None for v in (args.table, args.approach, args.setting, args.label, args.made_by)):
        row = {"table": args.table, "approach": args.approach, "setting": args.setting, "label": args.label,
               "made_by": args.made_by}
    record = E.run_evaluation(args.config, args.checkpoint, dataset, opts, args.out, row=row)
    if rank == 0:
        m = record["metrics"]
        fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
        print(f"{args.out}: {record['data']['num_images']} images, latent {record['model']['latent_shape']}, "
              f"usage/batch {fmt(m['codebook_usage_per_batch'])}, usage/set {fmt(m['codebook_usage_whole_set'])}, "
              f"quant_error {fmt(m['quant_error'])}, valid_loss {fmt(m['valid_loss'])}, r-FID {fmt(m['r_fid'])}, "
              f"r-IS {fmt(m['r_is'])}, PSNR {fmt(m['psnr'])}, SSIM {fmt(m['ssim'])}, LPIPS {fmt(m['lpips'])}")
    return record


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as err:
        # Bad input (paths, configs, missing weights, data roots): one line, not a traceback.
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as err:
        # its message says what to do: missing weights, untrusted checkpoint
        from adapters.runtime.errors import UserError
        if not isinstance(err, UserError):
            raise
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        sys.exit(2)
