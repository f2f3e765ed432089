#!/usr/bin/env python
"""Seconds per training step of VQGAN configs of either codebase, measured in one process, configs interleaved.

The codebase comes from the configs' layout: latent-diffusion configs (VQGAN, Table 3) have top-level `model:` and
`data:`, enhancing-transformers configs (ViT-VQGAN, Table 4) have `model:` and `dataset:`; all configs of one run
must be of one codebase. Each round trains every config for warm-up + measured steps through a Lightning Trainer
running the model's own training_step (autoencoder step, discriminator step, logging, as under upstream main.py);
a step is timed between Lightning's batch-start and batch-end hooks. Rounds alternate the configs in ABBA order so
drift (other processes, thermal) hits all of them alike. Prints a table: the median per config, its ratio to the
first config, and the median of the per-round ratios (runs next to each other in time).

    python scripts/bench_train_step.py configs/tiny_vqgan.yaml configs/tiny_rot_vqgan.yaml --steps 20 --rounds 3
    python scripts/bench_train_step.py configs/vqgan_64.yaml configs/rot_vqgan_64.yaml --device cuda \\
        --batch-size 16 --synthetic 256 -o model.params.lossconfig.params.perceptual_weight=0
    python scripts/bench_train_step.py configs/vitvqgan_small.yaml configs/rot_vitvqgan_small.yaml \\
        --device cuda --synthetic 256 --steps 20 --rounds 2

A config may carry overrides of its own after an ``@`` (comma-separated ``key=value``), so one run compares the
collapse remedies (issue 24) against plain STE on one config, each remedy beside its reference in the same rounds:

    python scripts/bench_train_step.py configs/small_vqgan.yaml \\
        configs/small_vqgan.yaml@model.params.quantizer_config.codebook_update=ema \\
        configs/small_rot_vqgan.yaml@model.params.quantizer_config.codebook_param=simvq --steps 20 --rounds 4
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Codebase:
    """What differs between the two upstream trees for this benchmark."""

    name: str
    tree: Path
    data_key: str  # top-level config key of the data section
    channels_last: bool  # synthetic image layout: latent-diffusion (H, W, 3) in [-1, 1]; enhancing (3, H, W) in [0, 1]
    instantiate_module: str  # upstream's target/params instantiation helper
    instantiate_name: str


CODEBASES = {
    "data": Codebase("latent-diffusion", ROOT / "third_party" / "latent-diffusion", "data", True,
                     "ldm.util", "instantiate_from_config"),
    "dataset": Codebase("enhancing-transformers", ROOT / "third_party" / "enhancing-transformers", "dataset", False,
                        "enhancing.utils.general", "initialize_from_config"),
}


def detect_codebase(cfgs: dict[Path, Any]) -> Codebase:
    """The one codebase all configs belong to; exits with one clear message otherwise."""
    found: dict[Path, Codebase] = {}
    for path, cfg in cfgs.items():
        keys = [k for k in CODEBASES if k in cfg]
        if "model" not in cfg or len(keys) != 1:
            sys.exit(f"{path}: not a training config of either codebase (expected top-level model: with data: "
                     f"for latent-diffusion or dataset: for enhancing-transformers; found {sorted(cfg.keys())})")
        found[path] = CODEBASES[keys[0]]
    kinds = {cb.name for cb in found.values()}
    if len(kinds) > 1:
        listing = ", ".join(f"{p} ({cb.name})" for p, cb in found.items())
        sys.exit(f"configs of one codebase only, to compare like with like; got {listing}")
    return next(iter(found.values()))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="configs to compare (the first is the reference); "
                        "PATH@key=value,key=value adds overrides for that entry only")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per config and round")
    parser.add_argument("--warmup", type=int, default=3, help="steps not measured at the start of each run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=None,
                        help="override data.params.batch_size (latent-diffusion) or dataset.params.batch_size")
    parser.add_argument("--synthetic", type=int, default=None,
                        help="use random images of this side instead of the config's data (e.g. no ImageNet here)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default: enhancing-transformers 1e-4, main.py's default; "
                             "latent-diffusion batch size x model.base_learning_rate, as main.py on one GPU)")
    parser.add_argument("-o", "--override", action="append", default=[], help="config key=value (repeatable)")
    args = parser.parse_args()
    for name in ("steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    return args


def split_entry(entry: str) -> tuple[Path, list[str]]:
    """``PATH[@k=v,k=v]`` -> (PATH, ["k=v", ...])."""
    path, _, extra = entry.partition("@")
    return Path(path), [kv for kv in extra.split(",") if kv]


def main() -> None:
    args = parse_args()
    entries = [split_entry(c) for c in args.configs]
    for c, extra in entries:
        if not c.is_file():
            sys.exit(f"config {c} not found")
        bad = [kv for kv in extra if "=" not in kv]
        if bad:
            sys.exit(f"{c}: overrides after '@' are key=value, got {bad}")

    from omegaconf import OmegaConf

    from adapters.evaluation.model_loading import load_config  # resolves enhancing's base_config

    # One entry per config given (the same file twice is an A/A check of the noise).
    cfgs = [OmegaConf.merge(load_config(c), OmegaConf.from_dotlist(args.override), OmegaConf.from_dotlist(extra))
            for c, extra in entries]
    names = [c.name + ("@" + ",".join(kv.split("=", 1)[0].rsplit(".", 1)[-1] + "=" + kv.split("=", 1)[1]
                                      for kv in extra) if extra else "")
             for c, extra in entries]
    codebase = detect_codebase(dict(zip(names, cfgs)))
    if args.batch_size:
        for cfg in cfgs:
            cfg[codebase.data_key].params.batch_size = args.batch_size
    if not (codebase.tree / "main.py").is_file():
        sys.exit(f"{codebase.tree} is missing: run scripts/setup_submodules.sh first")
    for path in (ROOT, codebase.tree):  # a script run from anywhere: the project's adapters and upstream's package
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))

    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, Dataset

    instantiate: Callable[[Any], Any] = getattr(importlib.import_module(codebase.instantiate_module),
                                                codebase.instantiate_name)
    # logger=False on purpose (no files); the models' self.log calls would warn about it once per key and run
    warnings.filterwarnings("ignore", message=".*but have no logger configured")
    if args.threads:
        torch.set_num_threads(args.threads)
    n_batches = args.warmup + args.steps

    class Synthetic(Dataset):
        """Uniform random images in the codebase's batch format: {"image": (side, side, 3) or (3, side, side)}."""

        def __init__(self, side: int, n: int) -> None:
            x = torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(0))
            # latent-diffusion's datasets give HWC in [-1, 1] (VQModel.get_input permutes); enhancing's CHW in [0, 1]
            self.x = (x * 2 - 1).permute(0, 2, 3, 1).contiguous() if codebase.channels_last else x

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

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            self._sync()
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            self._sync()
            if self._seen >= args.warmup:
                self.times.append(time.perf_counter() - self._t0)
            self._seen += 1

    def one_run(path: Path, cfg: Any) -> list[float]:
        """Measured seconds of each step after the warm-up, from a fresh model and Trainer."""
        data_cfg = cfg[codebase.data_key]
        bs = int(data_cfg.params.batch_size)
        pl.seed_everything(0, verbose=False)
        model = instantiate(cfg.model)
        if args.lr is not None:
            model.learning_rate = args.lr
        elif codebase.data_key == "data":
            model.learning_rate = bs * float(cfg.model.base_learning_rate)
        else:
            model.learning_rate = 1e-4
        data = Synthetic(args.synthetic, bs * n_batches) if args.synthetic else instantiate(data_cfg.params.train)
        loader = DataLoader(data, batch_size=bs, shuffle=True, num_workers=0, drop_last=True)
        timer = StepTimer()
        # Both wrappers count one global step per batch (two optimizers, manual optimisation), so max_steps is a
        # number of batches.
        trainer = pl.Trainer(max_steps=n_batches, accelerator=args.device, devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer])
        trainer.fit(model, train_dataloaders=loader)
        if len(timer.times) < args.steps:
            sys.exit(f"{path}: only {len(timer.times)} measured steps (the data has too few batches)")
        return timer.times

    # times[i][r]: the measured steps of config i in round r
    times: list[list[list[float]]] = [[] for _ in entries]
    runs = list(enumerate(zip(names, cfgs)))
    for r in range(args.rounds):
        # ABBA order: whatever favours the first or second run of a round cancels out over pairs of rounds
        for i, (path, cfg) in runs if r % 2 == 0 else runs[::-1]:
            with contextlib.redirect_stdout(sys.stderr):  # upstream's prints; stdout is for the table only
                times[i].append(one_run(path, cfg))
            print(f"round {r + 1}/{args.rounds} {path}: median {statistics.median(times[i][-1]):.4f} s/step "
                  f"over {len(times[i][-1])} steps", file=sys.stderr, flush=True)

    def flat(i: int) -> list[float]:
        return [t for rnd in times[i] for t in rnd]

    ref = statistics.median(flat(0))
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{codebase.name}; device: {device}; {args.rounds} rounds x {args.steps} steps "
          f"(+{args.warmup} warm-up) per config")
    print("| config | gradient | median s/step | ratio | median of per-round ratios |")
    print("|---|---|---|---|---|")
    for i, (path, cfg) in runs:
        gradient = cfg.model.params.get("gradient", "ste (upstream)")
        med = statistics.median(flat(i))
        paired = statistics.median(statistics.median(times[i][r]) / statistics.median(times[0][r])
                                   for r in range(args.rounds))
        print(f"| {path} | {gradient} | {med:.4f} | {med / ref:.3f} | {paired:.3f} |")


if __name__ == "__main__":
    main()
