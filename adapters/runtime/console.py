"""What a training run prints: less of Lightning's noise, CPU threads that suit the machine, where to look at the end.

latent-diffusion's ``main.py`` (patch 0021) calls :func:`quiet_lightning` before building the Trainer and
:func:`print_run_summary` after training; the tiny configs add :class:`CpuThreads` as a callback.
enhancing-transformers' ``main.py`` (patch 11) does the same with ``print_run_summary(run_dir, layout="enhancing")``.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch
from pytorch_lightning import Callback

# Lightning's own messages that say nothing about this run (its pytree helper on recent torch; cloud-logging tips)
_NOISE = (r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",)
# Lightning info lines dropped from the console (the accelerator census, tips, the model table, a note on
# val_check_interval); the rest (resume, stop reason) still prints
_INFO_NOISE = (" available: ", "Tip: ", "| Name ", "was configured so validation will run")


class _DropInfoNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not any(p in record.getMessage() for p in _INFO_NOISE)


def quiet_lightning() -> None:
    """Drop Lightning's info lines that say nothing about the run (accelerators, tips, the model summary table),
    and its deprecation notice about its own internals; its warnings and other info lines still print."""
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for target in [logger, *logger.handlers]:  # handlers: records of child loggers pass only through them
            if not any(isinstance(f, _DropInfoNoise) for f in target.filters):
                target.addFilter(_DropInfoNoise())
    # torch says "No CUDA runtime is found, using CUDA_HOME=..." when something imports cpp_extension on a CPU
    # machine with CUDA_HOME set: nothing here compiles CUDA code
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)


def auto_threads(cores: Optional[int] = None, load: Optional[float] = None) -> int:
    """Threads for CPU training: the cores other jobs leave free (1-minute load average), at least 1.

    On a busy machine more threads than free cores mostly spin (a shared 2-core machine trained 3x faster with 1
    thread than with 2); on an idle one all cores help."""
    cores = cores if cores is not None else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                             else (os.cpu_count() or 1))
    load = load if load is not None else (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)
    return max(1, min(cores, cores - int(round(load))))


class CpuThreads(Callback):
    """Sets torch's CPU threads when training on the CPU: ``threads: auto`` (:func:`auto_threads`) or a number.
    ``OMP_NUM_THREADS`` set by the user wins. Prints the choice once."""

    def __init__(self, threads: Union[int, str] = "auto") -> None:
        super().__init__()
        if not (threads == "auto" or (isinstance(threads, int) and threads > 0)):
            raise ValueError(f"CpuThreads: threads must be 'auto' or a positive integer, got {threads!r}")
        self.threads = threads

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if trainer.strategy.root_device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
            return
        n = auto_threads() if self.threads == "auto" else int(self.threads)
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        if trainer.global_rank == 0:
            print(f"CPU threads: {n} ({self.threads}; OMP_NUM_THREADS=N overrides)")


def _latest(folder: Path, prefix: str) -> Optional[Path]:
    files = sorted(folder.glob(f"{prefix}_gs-*.png"))  # names carry the zero-padded global step
    return files[-1] if files else None


def _newest_checkpoint(folder: Path) -> Optional[Path]:
    """The most recently written checkpoint in ``folder``; never ``crash.ckpt`` (RunGuard's, not for resuming)."""
    ckpts = [p for p in folder.glob("*.ckpt") if p.name != "crash.ckpt"]
    return max(ckpts, key=lambda p: (p.stat().st_mtime, p.name == "last.ckpt")) if ckpts else None


# Where each codebase's runs keep their pictures (under the run folder) and what the first picture is called.
_IMAGES = {"ldm": (Path("images"), "inputs"), "enhancing": (Path("log") / "results", "originals")}


def run_summary(logdir: Union[str, os.PathLike], layout: str = "ldm", config: Optional[str] = None) -> list[str]:
    """A few lines saying where a finished run's pictures and checkpoint are, and how to go on.

    ``layout``: ``ldm`` (latent-diffusion: images/, checkpoints/last.ckpt, ``-r <run>``) or ``enhancing``
    (enhancing-transformers: log/results/, ckpt/, ``-c <config> -r <checkpoint>``)."""
    if layout not in _IMAGES:
        raise ValueError(f"unknown run layout {layout!r}: ldm or enhancing")
    run = Path(logdir)
    images, first = _IMAGES[layout]
    lines = [f"Done. Run folder: {run}"]
    for split in ("train", "val"):
        pics = [p for p in (_latest(run / images / split, k) for k in (first, "reconstructions", "codebook_usage"))
                if p]
        if pics:
            lines.append(f"  latest {split} images: " + ", ".join(str(p.relative_to(run)) for p in pics))
    if layout == "ldm":
        last = run / "checkpoints" / "last.ckpt"
        if last.is_file():
            lines.append(f"  checkpoint: {last}   (resume: -r {run})")
        lines.append(f"  curves: tensorboard --logdir {run}")
        return lines
    last = _newest_checkpoint(run / "ckpt")
    if last is not None:
        lines.append(f"  checkpoint: {last}   (resume: python third_party/enhancing-transformers/main.py -c "
                     f"{config or '<config>'} -r {last}, or scripts/train_vitvqgan.sh --resume {run})")
    csv_file, wandb_dir = run / "log" / "csv" / "metrics.csv", run / "log" / "wandb"
    lines.append(f"  curves: {csv_file}" if csv_file.is_file() else f"  curves: wandb, files in {wandb_dir}"
                 if wandb_dir.is_dir() else f"  curves: tensorboard --logdir {run / 'log'}")
    return lines


def print_run_summary(logdir: Union[str, os.PathLike], layout: str = "ldm", config: Optional[str] = None) -> None:
    """Print :func:`run_summary`."""
    print("\n".join(run_summary(logdir, layout, config)))
