"""Where an evaluation runs: the device, and under torchrun (``WORLD_SIZE > 1``) this rank's share of the images and
the sums and gathers over ranks. Without torch.distributed every helper is the single-process identity."""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset, Subset

from adapters.runtime.errors import UserError


def is_distributed() -> bool:
    """True inside a torch.distributed group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_cpu(t: Tensor) -> Tensor:
    """``t`` summed over ranks (through the GPU under NCCL), back on the CPU; ``t`` itself in one process."""
    if not is_distributed():
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = t.to(device)
    dist.all_reduce(t)
    return t.cpu()


def gather_cat(chunks: list[Tensor]) -> Tensor:
    """This rank's Inception-logit chunks concatenated, then every rank's, in rank order (N, 1008)."""
    local = torch.cat(chunks) if chunks else torch.zeros(0, 1008)
    if not is_distributed():
        return local
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return torch.cat(gathered)


def init_distributed() -> tuple[int, int]:
    """Start torch.distributed when launched by torchrun (WORLD_SIZE > 1). Returns (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def resolve_device(device: str) -> torch.device:
    """``--device`` -> a torch device this machine has; anything else is a ``UserError`` (one line, what to use)."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:  # torch's message lists every device type it knows, over several lines
        raise UserError(f"--device {device}: not a device name; use auto (CUDA when present), cpu, cuda or "
                        f"cuda:N") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None else
                   "torch sees no CUDA GPU")
            raise UserError(f"--device {device}: CUDA is not available on this machine ({why}); use --device cpu, "
                            f"or --device auto to take a GPU only where there is one")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}; pick one of those")
    return dev


def rank_shard(dataset: Dataset, limit: Optional[int]) -> Dataset:
    """This rank's part of the evaluated images: ``limit`` spread evenly over the set (class-sorted sets keep all
    their classes), then one contiguous slice per rank, so that batches hold the same neighbouring images (and the
    per-batch usage the same meaning) whatever the number of processes."""
    n = len(dataset)  # type: ignore[arg-type]
    chosen = list(range(n))
    if limit is not None and limit < n:
        chosen = sorted({round(i * (n - 1) / max(limit - 1, 1)) for i in range(limit)}) if limit > 1 else [0]
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
    m = len(chosen)
    return Subset(dataset, chosen[rank * m // world:(rank + 1) * m // world])
