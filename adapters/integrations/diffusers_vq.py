"""A diffusers ``VQModel`` to train with the rotation trick: building it, a resumable training stream, held-out pictures.

Used by ``scripts/train_diffusers_vq.py``; kept here so that a diffusers user's own loop can take the same pieces.

================  ==========================================================================================
``build_vqmodel``   a ``VQModel`` from a saved config, a ``from_pretrained`` folder or hub id, a config file, or a
                    built-in size (``PRESETS``); every wrong name ends in one line (``UserError``)
``TrainStream``     sample g of the training stream as a pure function of g: a resumed run sees the same batches
``held_out``        inputs over reconstructions saved as one picture; PSNR, a mean-colour image's PSNR, codebook stats
================  ==========================================================================================

diffusers is the optional ``diffusers`` extra: imported by name (``import_diffusers``), never at module import.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import Dataset

from adapters.quantizer import CodebookStats, codebook_log_dict
from adapters.runtime.errors import UserError

# Built-in sizes: down/up blocks of these widths (all but the last halve the side), latent = 4 channels, codes of
# dim 4. small: 64 px -> 16x16 latents, as configs/tiny_rot_vqgan.yaml (the README's diffusers section has what its
# default run reaches: twice these widths, lr 1e-4, learnt less in 300 steps and took longer).
PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(block_out_channels=[32, 64, 64], layers_per_block=1, norm_num_groups=32, num_vq_embeddings=1024),
    "tiny": dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, num_vq_embeddings=32),
}


def import_diffusers() -> Any:
    """diffusers, or one line with the command that installs it. Imported by name: it is the optional ``diffusers``
    extra, not a runtime or test dependency (tests/test_dependencies.py checks static imports against those)."""
    try:
        return importlib.import_module("diffusers")
    except ModuleNotFoundError:
        raise UserError("diffusers is not installed: pip install -e '.[diffusers]' (from this project's folder)") \
            from None


def load_pretrained(VQModel: Any, name: str, subfolder: Optional[str] = None) -> Any:
    """``VQModel.from_pretrained(name)``; what is wrong with the name in one line, before any download for anything
    that cannot be a hub id (org/name whose org is not a local folder)."""
    path = Path(name).expanduser()
    local = path.is_dir() or not re.fullmatch(r"[\w.-]+/[\w.-]+", name) or path.parent.is_dir()
    if local:
        folder = path / subfolder if subfolder else path
        if not path.is_dir():
            what = "is a file, not a save_pretrained folder" if path.exists() else "no such folder"
            raise UserError(f"--pretrained {name}: {what} (a hub id reads org/name)")
        if not (folder / "config.json").is_file():
            raise UserError(f"--pretrained {name}: no config.json in {folder}: name a save_pretrained folder"
                            + ("" if subfolder else " (or pass --subfolder, e.g. vqvae, for one inside it)"))
    try:  # without accelerate, diffusers warns at every load that it falls back to low_cpu_mem_usage=False
        return VQModel.from_pretrained(str(path) if local else name, subfolder=subfolder,
                                       low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
    except (OSError, ValueError) as err:
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        where = "" if local else "not a folder here, and the Hugging Face hub did not give it: "
        raise UserError(f"--pretrained {name}: {where}{detail}") from None


def build_vqmodel(config: str = "small", *, pretrained: Optional[str] = None, subfolder: Optional[str] = None,
                  codes: Optional[int] = None, size: int = 64, saved: Optional[dict[str, Any]] = None) -> Any:
    """The diffusers ``VQModel`` to train (not yet swapped): from ``saved`` (a checkpoint's config) when given, else
    ``pretrained``, else ``config`` (a ``PRESETS`` name, with ``codes`` codes and ``size`` px, or a config.json)."""
    VQModel = import_diffusers().VQModel
    if saved is not None:
        return VQModel.from_config(saved)
    if pretrained:
        return load_pretrained(VQModel, pretrained, subfolder)
    if config in PRESETS:
        preset = dict(PRESETS[config])
        widths = preset.pop("block_out_channels")
        if codes is not None:
            preset["num_vq_embeddings"] = codes
        return VQModel(down_block_types=["DownEncoderBlock2D"] * len(widths),
                       up_block_types=["UpDecoderBlock2D"] * len(widths), block_out_channels=widths,
                       latent_channels=4, vq_embed_dim=4, sample_size=size, **preset)
    path = Path(config)
    if not path.is_file():
        raise UserError(f"--config {config!r} is neither {' nor '.join(PRESETS)} nor a config.json file")
    return VQModel.from_config(json.loads(path.read_text()))


def _seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (a hash: nearby steps and epochs get unrelated streams)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


class TrainStream(Dataset):
    """Sample g of the training stream (batch g // batch_size): each epoch a permutation of ``base`` seeded from
    (seed, epoch), whole batches only, and torch's RNG (the random crops draw from it) seeded from (seed, g).

    A pure function of g, unlike a shuffling DataLoader, whose order and crops follow the global RNG and the worker
    seeds: so a resumed run, whatever its number of workers, sees exactly the batches of a run never stopped. Read
    it with ``sampler=range(first_step * batch_size, last_step * batch_size)``."""

    def __init__(self, base: Dataset, seed: int, batch_size: int) -> None:
        self.base, self.seed = base, seed
        self.per_epoch = len(base) // batch_size * batch_size  # type: ignore[arg-type]
        self._perm: tuple[int, Optional[torch.Tensor]] = (-1, None)

    def __getitem__(self, g: int) -> dict[str, Any]:
        epoch, pos = divmod(g, self.per_epoch)
        if self._perm[0] != epoch:
            order = torch.randperm(len(self.base), generator=torch.Generator().manual_seed(_seed(self.seed, epoch)))
            self._perm = (epoch, order)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(self.seed, "sample", g))
            return self.base[int(self._perm[1][pos])]  # type: ignore[index]


def psnr(mse: float) -> float:
    """PSNR (dB) of a mean squared error in [0, 1] units (guarded: a perfect match reads 120 dB, not inf)."""
    return 10 * math.log10(1 / max(mse, 1e-12))


@torch.no_grad()
def held_out(model: Any, x: torch.Tensor, path: Path) -> dict[str, float]:
    """Save inputs over reconstructions of held-out images x (B, 3, H, W) in [-1, 1]; their PSNR, a flat mean-colour
    image's (each image's own mean colour: what a model that learnt nothing but colour reaches), codebook stats.

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
    flat = x.mean(dim=(2, 3), keepdim=True)
    out = {"val/psnr": psnr(float(((rec - x) * 0.5).square().mean())),  # in [0, 1] units
           "val/psnr_mean_colour": psnr(float(((flat - x) * 0.5).square().mean()))}
    out.update({k: float(v) for k, v in codebook_log_dict(stats, "val").items()})
    return out


__all__ = ["PRESETS", "TrainStream", "build_vqmodel", "held_out", "import_diffusers", "load_pretrained", "psnr"]
