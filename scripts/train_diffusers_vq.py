#!/usr/bin/env python
"""Train or fine-tune a diffusers ``VQModel`` with the rotation trick (``adapters.swap_quantizers``).

  python scripts/train_diffusers_vq.py --out runs/dvq
  python scripts/train_diffusers_vq.py --out runs/dvq --steps 2000 --resume      # go on from the last checkpoint
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
per log interval: losses, codebook usage, perplexity, quantization error, used/dead codes; held-out PSNR, a flat
mean-colour image's PSNR and codebook statistics at image steps), OUT/args.json, and OUT/checkpoints/last.ckpt every
``--checkpoint-every`` steps and at the end (model, optimizer, step, RNG and log state; written to a temporary file
and renamed, so the previous one stays whole until the new one is complete). ``--resume`` continues from it exactly
(the same batches, losses and weights as a run never stopped); a non-empty OUT is refused without ``--resume`` or
``--overwrite`` (which removes this script's outputs there, once the new run is ready to start).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from tqdm import tqdm  # noqa: E402

from adapters.evaluation.data import DataError  # noqa: E402
from adapters.integrations.diffusers_vq import TrainStream, build_vqmodel, held_out  # noqa: E402
from adapters.integrations.swap import swap_quantizers  # noqa: E402
from adapters.quantizer import GRADIENTS, SEARCHES, codebook_log_dict  # noqa: E402
from adapters.runtime.errors import UserError  # noqa: E402
from adapters.runtime.run_guard import LAST, AtomicCheckpointIO  # noqa: E402
from adapters.runtime.safe_load import load_checkpoint  # noqa: E402

PROG = "train_diffusers_vq.py"
CHECKPOINT = Path("checkpoints") / LAST
# What this script writes in --out: all that --overwrite removes (anything else there is left alone).
OUTPUTS = ("model", "images", "checkpoints", "metrics.jsonl", "args.json")
# Options a resumed run may change: none of them changes what is trained.
RESUMABLE = {"out", "steps", "resume", "overwrite", "checkpoint_every", "device", "num_workers"}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog="\n".join(__doc__.split("\n\n")[1:2]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created; refused if it holds files, see below)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                                                         "(same options; --steps may grow)")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out")
    model = p.add_argument_group("model")
    model.add_argument("--pretrained", help="a VQModel save_pretrained folder or hub id (org/name) to fine-tune")
    model.add_argument("--subfolder", default=None, help="with --pretrained: its sub-folder (e.g. vqvae)")
    model.add_argument("--config", default="small", help="small | tiny | a diffusers VQModel config.json")
    model.add_argument("--codes", type=int, default=None, help="codebook size of a built-in config")
    model.add_argument("--gradient", default="rotation_released", choices=GRADIENTS)
    model.add_argument("--search", default="auto", choices=SEARCHES, help="nearest-code search")
    model.add_argument("--codebook-init", default="auto", choices=("auto", "upstream", "kmeans"),
                       help="kmeans: set the codebook from the first batch (training from scratch only); upstream: "
                            "diffusers' draw (uniform in +-1/K: ~1%% of the codes get used); auto (default): kmeans "
                            "from scratch, the pretrained codebook with --pretrained")
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
    train.add_argument("--lr", type=float, default=4e-4, help="Adam, betas (0.5, 0.9) as taming")
    train.add_argument("--loss", default="l1", choices=("l1", "mse"))
    train.add_argument("--commit-weight", type=float, default=1.0)
    train.add_argument("--log-every", type=int, default=25, help="steps between codebook statistics lines")
    train.add_argument("--image-every", type=int, default=100, help="steps between reconstruction images")
    train.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    train.add_argument("--val-images", type=int, default=8, help="held-out images in each picture")
    train.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    train.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "log_every", "image_every", "checkpoint_every", "val_images", "size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --out, --overwrite replaces it: pass one of them")
    if args.pretrained and args.codebook_init == "kmeans":
        raise UserError("--codebook-init kmeans re-initialises the codebook, but --pretrained brings a trained one, "
                        "which is never re-initialised: drop --codebook-init kmeans to fine-tune it")
    return args


def check_out(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    """Refuse an --out that would lose or mix results; with --resume, its checkpoint (loaded weights-only)."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: name a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not args.resume:
        if entries and not args.overwrite:
            listed = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise UserError(f"--out {out} is not empty ({listed}): --resume continues the run in it, --overwrite "
                            "replaces its outputs, or name another --out")
        return None
    path = out / CHECKPOINT
    if not path.is_file():
        raise UserError(f"--resume: there is no {path}, so nothing to continue: start without --resume"
                        + (" (--overwrite to replace what is there)" if entries else ""))
    try:
        blob = load_checkpoint(path)
    except UserError:
        raise
    except Exception as err:  # written atomically, so only a foreign or damaged file lands here
        raise UserError(f"--resume: {path} cannot be read ({str(err).strip().splitlines()[0]})") from None
    missing = {"state_dict", "optimizer", "global_step", "model_config", "args", "rng", "log"} - set(blob)
    if missing:
        raise UserError(f"--resume: {path} is not a checkpoint of this script (no {', '.join(sorted(missing))})")
    saved = blob["args"]
    changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} (now {v!r})" for k, v in vars(args).items()
               if k not in RESUMABLE and saved.get(k) != v]
    if changed:
        free = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(RESUMABLE - {"out", "resume", "overwrite"}))
        raise UserError(f"--resume: {out} was trained with {'; '.join(changed)}: pass the run's own options (only "
                        f"{free} may change), or start a new run with another --out")
    if blob["global_step"] > args.steps:
        raise UserError(f"--resume: {path} is at step {blob['global_step']}, past --steps {args.steps}: pass "
                        f"--steps {blob['global_step']} or more")
    return blob


def build_model(args: argparse.Namespace, config: Optional[dict[str, Any]] = None) -> Any:
    """The diffusers ``VQModel`` to train (not yet swapped); from ``config`` (a checkpoint's) when given."""
    return build_vqmodel(args.config, pretrained=args.pretrained, subfolder=args.subfolder, codes=args.codes,
                         size=args.size, saved=config)


def datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset]:
    """(training crops, held-out images); items {"image": float (3, H, W) in [0, 1], ...}."""
    from adapters.evaluation import data as D

    if args.data == "imagenet":
        root = args.imagenet_root or None
        return (D.ImageNetTrain(root=root, size=args.size, layout="chw"),
                D.ImageNetValidation(root=root, size=args.size, layout="chw", max_images=args.val_images))
    length = max(args.batch_size * 50, args.batch_size)
    return (D.PhotoCrops(size=args.size, length=length, photos="train", random_crop=True,
                         scale_to=args.scale_to, seed=args.seed, layout="chw"),
            D.PhotoCrops(size=args.size, length=args.val_images, photos="held_out", random_crop=False,
                         scale_to=args.scale_to, seed=args.seed, layout="chw"))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} but torch sees no GPU: use --device cpu")
    return device


def resume_outputs(out: Path, step: int) -> None:
    """Drop what a stopped run wrote after its checkpoint at ``step`` (metrics lines, pictures), and its model/ (an
    older one would sit beside newer metrics): the resumed run writes them again."""
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        kept = []
        for line in metrics.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):  # a line cut short by the stop
                pass
        tmp = metrics.with_name(f".{metrics.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(kept))
        os.replace(tmp, metrics)
    for png in (out / "images").glob("recon_*.png"):
        if not png.stem[6:].isdigit() or int(png.stem[6:]) > step:
            png.unlink()
    shutil.rmtree(out / "model", ignore_errors=True)


def save_model(model: Any, out: Path) -> Path:
    """``save_pretrained`` into a temporary folder renamed to OUT/model: a stop leaves the old folder or the new."""
    folder, tmp, old = out / "model", out / f".model.tmp-{os.getpid()}", out / f".model.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def clear_outputs(out: Path) -> None:
    """--overwrite: remove what an earlier run of this script wrote in ``out`` (OUTPUTS), nothing else."""
    for name in OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def last_row(out: Path) -> dict[str, Any]:
    """The last line of OUT/metrics.jsonl with a held-out PSNR ({} if none)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val/psnr" in line] \
        if (out / "metrics.jsonl").is_file() else []
    return rows[-1] if rows else {}


def train(args: argparse.Namespace, blob: Optional[dict[str, Any]]) -> tuple[Path, Optional[Path], dict[str, Any]]:
    """Train (from ``blob``, a checkpoint, when resuming); returns (model folder, last picture, last metrics row)."""
    out = Path(args.out)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        from adapters.runtime.console import auto_threads

        torch.set_num_threads(auto_threads())  # oversubscribed threads made CPU training 3x slower here
    model = build_model(args, blob["model_config"] if blob else None).to(device)
    config = json.loads(json.dumps(dict(model.config)))  # plain types: the checkpoint loads weights-only
    init = args.codebook_init if args.codebook_init != "auto" else "upstream" if args.pretrained else "kmeans"
    swapped = swap_quantizers(model, gradient=args.gradient, search=args.search, codebook_init=init)
    q = model.quantize
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.5, 0.9))
    sums = {"train/loss": 0.0, "train/rec_loss": 0.0, "train/commit_loss": 0.0}
    n, start = 0, 0
    if blob:  # a codebook from a state dict is never re-initialised (the quantizer drops a pending k-means init)
        model.load_state_dict(blob["state_dict"])
        opt.load_state_dict(blob["optimizer"])
        start, log = blob["global_step"], blob["log"]
        sums, n = dict(log["sums"]), log["n"]
        for key in ("code_counts", "err_sum", "n_vectors"):
            setattr(q.stats, key, log[key].to(device))
    size = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{PROG}: {', '.join(swapped)} -> {type(q).__name__} (gradient {args.gradient}, {q.n_e} codes of dim "
          f"{q.e_dim}, codebook init {init}); {size:.2f} M parameters, {device}"
          + (f"; resuming at step {start}" if blob else ""))
    image = out / "images" / f"recon_{start:06d}.png"
    if blob and start == args.steps:  # finished: change nothing (but a model/ that a stop kept from being written)
        print(f"{PROG}: {out / CHECKPOINT} is at step {start} = --steps: nothing to train (raise --steps to go on)")
        folder = out / "model"
        return (folder if folder.is_dir() else save_model(model, out)), (image if image.is_file() else None), \
            last_row(out)
    train_set, val_set = datasets(args)
    if len(train_set) < args.batch_size:
        raise UserError(f"{len(train_set)} training images, fewer than --batch-size {args.batch_size}")
    loader = DataLoader(TrainStream(train_set, args.seed, args.batch_size), batch_size=args.batch_size,
                        sampler=range(start * args.batch_size, args.steps * args.batch_size),
                        num_workers=args.num_workers)
    val_x = torch.stack([val_set[i]["image"] for i in range(min(args.val_images, len(val_set)))]) * 2 - 1
    val_x = val_x.to(device)

    # Everything that can fail before training has been tried: only now is --out made, cleared or trimmed.
    if blob:
        resume_outputs(out, start)
    elif out.is_dir():
        clear_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(vars(args), indent=1) + "\n")
    if blob:
        torch.set_rng_state(blob["rng"]["cpu"])
        if device.type == "cuda" and blob["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
    io, ckpt_path = AtomicCheckpointIO(), out / CHECKPOINT

    def checkpoint(step: int) -> None:
        log = {"sums": sums, "n": n, **{k: getattr(q.stats, k).cpu() for k in ("code_counts", "err_sum", "n_vectors")}}
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}
        io.save_checkpoint({"state_dict": model.state_dict(), "optimizer": opt.state_dict(), "global_step": step,
                            "model_config": config, "args": vars(args), "rng": rng, "log": log}, ckpt_path)

    rec_fn = torch.nn.functional.l1_loss if args.loss == "l1" else torch.nn.functional.mse_loss
    model.train()
    row: dict[str, Any] = {}
    step = start
    with (out / "metrics.jsonl").open("a") as metrics, \
            tqdm(total=args.steps, initial=start, desc="train", dynamic_ncols=True, file=sys.stdout) as bar:
        try:
            for batch in loader:
                step += 1
                x = (batch["image"] * 2 - 1).to(device)
                result = model(x)
                rec_loss = rec_fn(result.sample, x)
                commit = result.commit_loss.mean()
                loss = rec_loss + args.commit_weight * commit
                if not torch.isfinite(loss):
                    values = [float(v.detach()) for v in (loss, rec_loss, commit)]
                    raise UserError(f"the loss is {values[0]} at step {step} (reconstruction {values[1]}, codebook "
                                    f"{values[2]}): lower --lr and start again with --overwrite "
                                    f"({io.describe(ckpt_path)}; no model/ was written)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for key, value in (("train/loss", loss), ("train/rec_loss", rec_loss), ("train/commit_loss", commit)):
                    sums[key] += float(value.detach())
                n += 1
                bar.update()
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", usage=f"{float(q.last_stats['usage']):.3f}")
                line: dict[str, Any] = {}
                if step % args.log_every == 0 or step == args.steps:
                    line = {"step": step, **{k: v / n for k, v in sums.items()}}
                    # codes used by the batches since the last line (q.epoch_stats resets them); per batch: the bar
                    line.update({k: float(v) for k, v in codebook_log_dict(q.epoch_stats(), "train").items()})
                    sums, n = {k: 0.0 for k in sums}, 0
                if step % args.image_every == 0 or step == args.steps:
                    image = out / "images" / f"recon_{step:06d}.png"
                    line = {"step": step, **line, **held_out(model, val_x, image)}
                if line:
                    metrics.write(json.dumps(line) + "\n")
                    metrics.flush()
                    row = line if "val/psnr" in line else row
                    bar.write(f"step {step}: " + ", ".join(f"{k.split('/', 1)[-1] if k.startswith('train/') else k} "
                                                           f"{v:.4g}" for k, v in line.items() if k != "step"))
                if step % args.checkpoint_every == 0 or step == args.steps:
                    checkpoint(step)
        except KeyboardInterrupt:
            bar.close()
            then = (f"{io.describe(ckpt_path)}: --resume continues from it" if ckpt_path.is_file() else
                    f"no checkpoint yet (every --checkpoint-every {args.checkpoint_every} steps): start again with "
                    "--overwrite")
            print(f"{PROG}: interrupted at step {step}; {then}", file=sys.stderr)
            sys.exit(130)
    return save_model(model, out), image, row


def main(argv: Optional[list[str]] = None) -> None:
    try:
        args = parse_args(argv)
        folder, image, row = train(args, check_out(args))
    except (UserError, DataError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        sys.exit(1)
    out = Path(args.out)
    print(f"Done. Output folder: {out}")
    if image is not None:
        print(f"  reconstructions: {image} (top: held-out inputs, bottom: reconstructions)")
    if "val/psnr" in row:
        print(f"  held-out PSNR {row['val/psnr']:.2f} dB at step {row['step']} (a flat mean-colour image: "
              f"{row['val/psnr_mean_colour']:.2f} dB)")
    print(f"  metrics: {out / 'metrics.jsonl'}")
    print(f"  checkpoint: {out / CHECKPOINT}   (more steps: the same command with --steps N --resume)")
    print(f"  model: {folder}  (plain diffusers: diffusers.VQModel.from_pretrained({str(folder)!r}))")


if __name__ == "__main__":
    main()
