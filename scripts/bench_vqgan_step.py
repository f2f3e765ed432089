#!/usr/bin/env python
"""Seconds per training step of latent-diffusion VQGAN configs, measured in one process, configs interleaved.

Each round trains every config for warm-up + measured steps through a Lightning Trainer (the same manual
optimisation as main.py: autoencoder step, discriminator step, logging); the time of each training batch is taken
between Lightning's batch-start and batch-end hooks. Rounds alternate the configs so drift (other processes, thermal)
hits all of them alike, in ABBA order. Prints the median per config and the ratio to the first config.

    python scripts/bench_vqgan_step.py configs/tiny_vqgan.yaml configs/tiny_rot_vqgan.yaml --steps 20 --rounds 3
    python scripts/bench_vqgan_step.py configs/vqgan_64.yaml configs/rot_vqgan_64.yaml --device cuda \\
        --batch-size 16 --synthetic 256 -o model.params.lossconfig.params.perceptual_weight=0
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LDM_TREE = ROOT / "third_party" / "latent-diffusion"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", type=Path, help="configs to compare (the first is the reference)")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per config and round")
    parser.add_argument("--warmup", type=int, default=3, help="steps not measured at the start of each run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=None, help="override data.params.batch_size")
    parser.add_argument("--synthetic", type=int, default=None,
                        help="use random images of this side instead of the config's data (e.g. no ImageNet here)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    parser.add_argument("-o", "--override", action="append", default=[], help="config key=value (repeatable)")
    args = parser.parse_args()
    if not (LDM_TREE / "main.py").is_file():
        sys.exit(f"{LDM_TREE} is missing: run scripts/setup_submodules.sh first")
    for path in (ROOT, LDM_TREE):  # a script, run from anywhere: the project and upstream's ldm package
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))

    import numpy as np
    import pytorch_lightning as pl
    import torch
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader, Dataset

    if args.threads:
        torch.set_num_threads(args.threads)

    class Synthetic(Dataset):
        def __init__(self, side: int, n: int) -> None:
            g = np.random.default_rng(0)
            self.x = g.uniform(-1, 1, (n, side, side, 3)).astype(np.float32)

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> dict:
            return {"image": self.x[i]}

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t0 = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            if args.device == "cuda":
                torch.cuda.synchronize()
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t0)

    cfgs = {}
    for path in args.configs:
        cfg = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(args.override))
        if args.batch_size:
            cfg.data.params.batch_size = args.batch_size
        cfgs[path.stem] = cfg
    total = args.warmup + args.steps
    results: dict[str, list[float]] = {name: [] for name in cfgs}
    for r in range(args.rounds):
        # ABBA order: whatever favours the first or second run of a round cancels out over pairs of rounds
        order = list(cfgs.items()) if r % 2 == 0 else list(cfgs.items())[::-1]
        for name, cfg in order:
            pl.seed_everything(0, verbose=False)
            model = instantiate_from_config(cfg.model)
            bs = int(cfg.data.params.batch_size)
            model.learning_rate = bs * float(cfg.model.base_learning_rate)
            if args.synthetic:
                data = Synthetic(args.synthetic, bs * total)
            else:
                data = instantiate_from_config(cfg.data.params.train)
            loader = DataLoader(data, batch_size=bs, shuffle=True, num_workers=0, drop_last=True)
            timer = StepTimer()
            trainer = pl.Trainer(accelerator=args.device, devices=1, max_steps=total, logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                 limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer])
            trainer.fit(model, loader)
            measured = timer.times[args.warmup:]
            results[name].extend(measured)
            print(f"round {r + 1}/{args.rounds} {name}: median {statistics.median(measured):.4f} s/step "
                  f"over {len(measured)} steps", flush=True)
    ref = args.configs[0].stem
    ref_median = statistics.median(results[ref])
    print(f"\ndevice={args.device} threads={torch.get_num_threads()} steps/config={len(results[ref])}")
    for name, times in results.items():
        med = statistics.median(times)
        # Paired by round (runs next to each other in time), which cancels slow phases of a shared machine.
        paired = [statistics.median(times[i * args.steps:(i + 1) * args.steps])
                  / statistics.median(results[ref][i * args.steps:(i + 1) * args.steps]) for i in range(args.rounds)]
        print(f"{name:>20s}: median {med:.4f} s/step  (x{med / ref_median:.3f} of {ref}; "
              f"median of per-round ratios x{statistics.median(paired):.3f})")


if __name__ == "__main__":
    main()
