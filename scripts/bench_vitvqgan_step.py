#!/usr/bin/env python
"""Seconds per training step of enhancing-transformers ViT-VQGAN configs, measured in one process, configs interleaved.

Each round trains every config for warm-up + measured steps through a Lightning Trainer running the model's own
training_step (RotationViTVQ: autoencoder step, discriminator step, logging, as under main.py); a step is timed
between Lightning's batch-start and batch-end hooks. Rounds alternate the configs so that drift (other processes,
thermal) hits all of them alike. Prints the median per config and its ratio to the first config.

    python scripts/bench_vitvqgan_step.py configs/tiny_vitvqgan.yaml configs/tiny_rot_vitvqgan.yaml
    python scripts/bench_vitvqgan_step.py configs/vitvqgan_small.yaml configs/rot_vitvqgan_small.yaml \\
        --device cuda --synthetic 256 --steps 20 --rounds 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / "third_party" / "enhancing-transformers"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", type=Path, help="configs to compare (the first is the reference)")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per config and round")
    parser.add_argument("--warmup", type=int, default=3, help="steps not measured at the start of each run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=None, help="override dataset.params.batch_size")
    parser.add_argument("--synthetic", type=int, default=None,
                        help="random images of this side instead of the config's data (e.g. no ImageNet here)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("-o", "--override", action="append", default=[], help="config key=value (repeatable)")
    args = parser.parse_args()
    if not (TREE / "main.py").is_file():
        sys.exit(f"{TREE} is missing: run scripts/setup_submodules.sh first")
    for c in args.configs:
        if not c.is_file():
            sys.exit(f"config {c} not found")
    for path in (ROOT, TREE):  # a script run from anywhere: the project's adapters and upstream's enhancing package
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))

    import pytorch_lightning as pl
    import torch
    from enhancing.utils.general import initialize_from_config
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader, Dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    n_batches = args.warmup + args.steps

    class Synthetic(Dataset):
        """Uniform random images in enhancing's batch format: {"image": (3, side, side) in [0, 1]}."""

        def __init__(self, side: int, n: int) -> None:
            self.x = torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(0))

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> dict:
            return {"image": self.x[i]}

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t0 = 0.0
            self._seen = 0  # batches across epochs (a small dataset wraps around)

        def _sync(self) -> None:
            if args.device == "cuda":
                torch.cuda.synchronize()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._sync()
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._sync()
            if self._seen >= args.warmup:
                self.times.append(time.perf_counter() - self._t0)
            self._seen += 1

    def loader(cfg) -> DataLoader:
        bs = args.batch_size or int(cfg.dataset.params.batch_size)
        if args.synthetic:
            ds = Synthetic(args.synthetic, bs * n_batches)
        else:
            ds = initialize_from_config(cfg.dataset.params.train)
        return DataLoader(ds, batch_size=bs, shuffle=True, num_workers=0, drop_last=True)

    def one_run(path: Path) -> list[float]:
        cfg = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(args.override))
        pl.seed_everything(0, verbose=False)
        model = initialize_from_config(cfg.model)
        model.learning_rate = args.lr
        timer = StepTimer()
        # RotationViTVQ counts one global step per batch, so max_steps is a number of batches.
        trainer = pl.Trainer(max_steps=n_batches, accelerator=args.device,
                             devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                             callbacks=[timer])
        trainer.fit(model, train_dataloaders=loader(cfg))
        if len(timer.times) < args.steps:
            sys.exit(f"{path}: only {len(timer.times)} measured steps (the data has too few batches)")
        return timer.times

    times: dict[Path, list[float]] = {c: [] for c in args.configs}
    for r in range(args.rounds):
        for c in args.configs:
            times[c] += one_run(c)
            print(f"round {r + 1}/{args.rounds} {c}: median so far {statistics.median(times[c]):.4f} s/step",
                  file=sys.stderr)
    ref = statistics.median(times[args.configs[0]])
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {device}; {args.rounds} rounds x {args.steps} steps (+{args.warmup} warm-up) per config")
    print("| config | gradient | median s/step | ratio |")
    print("|---|---|---|---|")
    for c in args.configs:
        gradient = OmegaConf.load(c).model.params.get("gradient", "ste (upstream)")
        med = statistics.median(times[c])
        print(f"| {c.name} | {gradient} | {med:.4f} | {med / ref:.3f} |")


if __name__ == "__main__":
    main()
