#!/usr/bin/env python
"""Train or fine-tune a diffusers ``VQModel`` with the rotation trick (``adapters.swap_quantizers``).

  python scripts/train_diffusers_vq.py --out runs/dvq --steps 300
  python scripts/train_diffusers_vq.py --pretrained /path/to/vqmodel --data imagenet --imagenet-root /data/imagenet \\
      --size 256 --steps 20000 --lr 1e-5 --out runs/finetune
  python scripts/train_diffusers_vq.py --config my_vqmodel/config.json --gradient ste --out runs/ste_baseline

The model is a ``from_pretrained`` folder or hub id (``--pretrained``, ``--subfolder``), a diffusers config file
(``--config FILE``), or a built-in size (``--config small``, default; ``tiny`` for smoke tests). Its quantizer is
swapped for the project's (same weights, keys and forward; the gradient is ``--gradient``'s). The data are the
project's sources (``adapters.evaluation.data``): random crops of scikit-image's bundled photographs (offline, default;
crops of held-out photographs for the images) or a local ImageNet folder (``--data imagenet``).

Loss: L1 (or ``--loss mse``) reconstruction plus the quantizer's codebook/commitment loss times ``--commit-weight``
(no LPIPS, no discriminator: latent-diffusion's main.py with the project's configs is the full VQGAN loop).

Writes OUT/model/ (``save_pretrained``: loads with plain ``diffusers.VQModel.from_pretrained``, no project import),
OUT/images/recon_<step>.png (top row held-out inputs, bottom row reconstructions), OUT/metrics.jsonl (one JSON line
per log interval: losses, codebook usage, perplexity, quantization error, used/dead codes; held-out PSNR and
codebook statistics at image steps), OUT/args.json.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from tqdm import tqdm  # noqa: E402

from adapters.quantizer import GRADIENTS, SEARCHES, CodebookStats, codebook_log_dict  # noqa: E402
from adapters.integrations.swap import swap_quantizers  # noqa: E402

PROG = "train_diffusers_vq.py"
# Built-in sizes: down/up blocks of these widths (each halves the side), latent = 4 channels, codes of dim 4.
PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(block_out_channels=[64, 128, 128], layers_per_block=1, norm_num_groups=32, num_vq_embeddings=1024),
    "tiny": dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, num_vq_embeddings=32),
}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog="\n".join(__doc__.split("\n\n")[1:2]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created)")
    model = p.add_argument_group("model")
    model.add_argument("--pretrained", help="a VQModel save_pretrained folder or hub id to fine-tune")
    model.add_argument("--subfolder", default=None, help="with --pretrained: its sub-folder (e.g. vqvae)")
    model.add_argument("--config", default="small", help="small | tiny | a diffusers VQModel config.json")
    model.add_argument("--codes", type=int, default=None, help="codebook size of a built-in config")
    model.add_argument("--gradient", default="rotation_released", choices=GRADIENTS)
    model.add_argument("--search", default="auto", choices=SEARCHES, help="nearest-code search")
    model.add_argument("--codebook-init", default="upstream", choices=("upstream", "kmeans"),
                       help="kmeans: set the codebook from the first batch (training from scratch only)")
    data = p.add_argument_group("data")
    data.add_argument("--data", default="photos", choices=("photos", "imagenet"))
    data.add_argument("--imagenet-root", default="", help="folder with train/<wnid>/ and val/<wnid>/ "
                                                          "(default: $IMAGENET_ROOT)")
    data.add_argument("--size", type=int, default=64, help="crop side in pixels")
    data.add_argument("--scale-to", type=int, default=None,
                      help="photos: shorter side before cropping (default: the photographs' own, >= 300 px)")
    data.add_argument("--num-workers", type=int, default=0)
    train = p.add_argument_group("training")
    train.add_argument("--steps", type=int, default=300)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--lr", type=float, default=1e-4, help="Adam, betas (0.5, 0.9) as taming")
    train.add_argument("--loss", default="l1", choices=("l1", "mse"))
    train.add_argument("--commit-weight", type=float, default=1.0)
    train.add_argument("--log-every", type=int, default=25, help="steps between codebook statistics lines")
    train.add_argument("--image-every", type=int, default=100, help="steps between reconstruction images")
    train.add_argument("--val-images", type=int, default=8, help="held-out images in each picture")
    train.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    train.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "log_every", "image_every", "val_images", "size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def import_diffusers() -> Any:
    """diffusers, or exit with the command that installs it. Imported by name: it is the optional ``diffusers``
    extra, not a runtime or test dependency (tests/test_dependencies.py checks static imports against those)."""
    try:
        return importlib.import_module("diffusers")
    except ModuleNotFoundError:
        sys.exit(f"{PROG}: diffusers is not installed: pip install -e '.[diffusers]' (from {ROOT})")


def build_model(args: argparse.Namespace) -> Any:
    """The diffusers ``VQModel`` to train (not yet swapped)."""
    VQModel = import_diffusers().VQModel
    if args.pretrained:
        return VQModel.from_pretrained(args.pretrained, subfolder=args.subfolder)
    if args.config in PRESETS:
        preset = dict(PRESETS[args.config])
        widths = preset.pop("block_out_channels")
        if args.codes is not None:
            preset["num_vq_embeddings"] = args.codes
        return VQModel(down_block_types=["DownEncoderBlock2D"] * len(widths),
                       up_block_types=["UpDecoderBlock2D"] * len(widths), block_out_channels=widths,
                       latent_channels=4, vq_embed_dim=4, sample_size=args.size, **preset)
    path = Path(args.config)
    if not path.is_file():
        sys.exit(f"{PROG}: --config {args.config!r} is neither {' nor '.join(PRESETS)} nor a config.json file")
    return VQModel.from_config(json.loads(path.read_text()))


def datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset]:
    """(training crops, held-out images); items {"image": float (3, H, W) in [0, 1], ...}."""
    from adapters.evaluation import data as D

    if args.data == "imagenet":
        root = args.imagenet_root or None
        return (D.ImageNetTrain(root=root, size=args.size, layout="chw"),
                D.ImageNetValidation(root=root, size=args.size, layout="chw", max_images=args.val_images))
    # held-out photographs for the pictures, where adapters.evaluation.data defines them (else crops of all, at fixed
    # places)
    train_photos, held_out = getattr(D, "TRAIN_PHOTOS", None), getattr(D, "HELD_OUT_PHOTOS", None)
    length = max(args.batch_size * 50, args.batch_size)
    return (D.PhotoCrops(size=args.size, length=length, photos=train_photos, random_crop=True,
                         scale_to=args.scale_to, seed=args.seed, layout="chw"),
            D.PhotoCrops(size=args.size, length=args.val_images, photos=held_out, random_crop=False,
                         scale_to=args.scale_to, seed=args.seed, layout="chw"))


def forever(loader: DataLoader) -> Iterator[torch.Tensor]:
    """Image batches (B, 3, H, W) in [-1, 1], epoch after epoch."""
    while True:
        for batch in loader:
            yield batch["image"] * 2 - 1


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{PROG}: --device {name} but torch sees no GPU: use --device cpu")
    return device


@torch.no_grad()
def held_out(model: Any, x: torch.Tensor, path: Path) -> dict[str, float]:
    """Save inputs over reconstructions of held-out images x (B, 3, H, W) in [-1, 1]; their PSNR and codebook stats.

    The training statistics are set aside meanwhile, so these images never count in them."""
    from torchvision.utils import save_image

    q, was_training = model.quantize, model.training
    saved, q.stats = q.stats, CodebookStats(q.n_e)
    model.eval()
    try:
        rec = model(x).sample.clamp(-1, 1)
        stats = q.stats.compute(reset=False)
    finally:
        q.stats = saved
        model.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.cat([x, rec]).float().cpu() * 0.5 + 0.5, path, nrow=x.shape[0])
    mse = float(((rec - x) * 0.5).square().mean())  # in [0, 1] units
    out = {"val/psnr": 10 * math.log10(1 / max(mse, 1e-12))}
    out.update({k: float(v) for k, v in codebook_log_dict(stats, "val").items()})
    return out


def train(args: argparse.Namespace) -> Path:
    """Train; returns the save_pretrained folder."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        from adapters.runtime.console import auto_threads

        torch.set_num_threads(auto_threads())  # oversubscribed threads made CPU training 3x slower here
    model = build_model(args).to(device)
    swapped = swap_quantizers(model, gradient=args.gradient, search=args.search, codebook_init=args.codebook_init)
    q = model.quantize
    print(f"{PROG}: {', '.join(swapped)} -> {type(q).__name__} (gradient {args.gradient}, {q.n_e} codes of dim "
          f"{q.e_dim}); {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {device}")
    train_set, val_set = datasets(args)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.num_workers)
    if len(loader) == 0:
        sys.exit(f"{PROG}: {len(train_set)} training images, fewer than --batch-size {args.batch_size}")
    val_x = torch.stack([val_set[i]["image"] for i in range(min(args.val_images, len(val_set)))]) * 2 - 1
    val_x = val_x.to(device)
    (out / "args.json").write_text(json.dumps(vars(args), indent=1) + "\n")

    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.5, 0.9))
    rec_fn = torch.nn.functional.l1_loss if args.loss == "l1" else torch.nn.functional.mse_loss
    batches = forever(loader)
    sums = {"train/loss": 0.0, "train/rec_loss": 0.0, "train/commit_loss": 0.0}
    n = 0
    model.train()
    q.reset_stats()
    metrics = (out / "metrics.jsonl").open("w")
    bar = tqdm(range(1, args.steps + 1), desc="train", dynamic_ncols=True, file=sys.stdout)
    for step in bar:
        x = next(batches).to(device)
        result = model(x)
        rec_loss = rec_fn(result.sample, x)
        commit = result.commit_loss.mean()
        loss = rec_loss + args.commit_weight * commit
        if not torch.isfinite(loss):
            bar.close()
            sys.exit(f"{PROG}: the loss is {float(loss)} at step {step} (reconstruction {float(rec_loss)}, "
                     f"codebook {float(commit)}): lower --lr and start again")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for key, value in (("train/loss", loss), ("train/rec_loss", rec_loss), ("train/commit_loss", commit)):
            sums[key] += float(value.detach())
        n += 1
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}", usage=f"{float(q.last_stats['usage']):.3f}")
        row: dict[str, Any] = {}
        if step % args.log_every == 0 or step == args.steps:
            row = {"step": step, **{k: v / n for k, v in sums.items()}}
            # codes used by the batches since the last line (q.epoch_stats resets them); usage per batch is in the bar
            row.update({k: float(v) for k, v in codebook_log_dict(q.epoch_stats(), "train").items()})
            sums, n = {k: 0.0 for k in sums}, 0
        if step % args.image_every == 0 or step == args.steps:
            row = {"step": step, **row, **held_out(model, val_x, out / "images" / f"recon_{step:06d}.png")}
        if row:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            bar.write(f"step {step}: " + ", ".join(f"{k.split('/', 1)[-1] if k.startswith('train/') else k} "
                                                   f"{v:.4g}" for k, v in row.items() if k != "step"))
    bar.close()
    metrics.close()
    folder = out / "model"
    model.save_pretrained(folder)
    return folder


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    folder = train(args)
    out = Path(args.out)
    last = sorted((out / "images").glob("recon_*.png"))
    print(f"Done. Output folder: {out}")
    if last:
        print(f"  reconstructions: {last[-1]} (top: held-out inputs, bottom: reconstructions)")
    print(f"  metrics: {out / 'metrics.jsonl'}")
    print(f"  model: {folder}  (plain diffusers: diffusers.VQModel.from_pretrained({str(folder)!r}))")


if __name__ == "__main__":
    main()
