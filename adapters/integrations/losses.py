"""taming's ``VQLPIPSWithDiscriminator`` with offline-friendly construction.

* ``perceptual_weight: 0`` builds no LPIPS network at all (taming builds it, downloading VGG16 and LPIPS weights, even
  when its weight is zero): the tiny configs train with no downloaded weights. The loss values are taming's.
* ``perceptual_weight > 0`` builds taming's LPIPS as upstream, with the same state-dict keys. When its weights are
  neither on disk nor downloadable, the error names both files and where they go.

Set ``ROTATION_TRICK_OFFLINE=1`` to fail at once instead of attempting a download.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional
from unittest import mock

import torch
from taming.modules.losses import vqperceptual
from torch import nn

from adapters.runtime.errors import MissingWeightsError

OFFLINE_ENV = "ROTATION_TRICK_OFFLINE"
VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 weights (models.vgg16(pretrained=True))
LPIPS_FILE = "vgg.pth"  # taming's LPIPS linear heads, read from <cwd>/taming/modules/autoencoder/lpips/
LPIPS_URL = "https://heibox.uni-heidelberg.de/f/607503859c864bc1b30b/?dl=1"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"




def lpips_weight_paths() -> dict[str, Path]:
    """Where taming's LPIPS looks for its two weight files (the LPIPS path is relative to the working directory)."""
    return {
        VGG16_FILE: Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE,
        LPIPS_FILE: Path.cwd() / "taming" / "modules" / "autoencoder" / "lpips" / LPIPS_FILE,
    }


def missing_weights_message(missing: list[str]) -> str:
    paths = lpips_weight_paths()
    urls = {VGG16_FILE: VGG16_URL, LPIPS_FILE: LPIPS_URL}
    lines = [f"{name}: put it at {paths[name]} (from {urls[name]})" for name in missing]
    return ("the perceptual (LPIPS) loss needs weights that are missing here and could not be downloaded:\n  "
            + "\n  ".join(lines)
            + "\nCopy them from a machine with network access (set TORCH_HOME to move the first; run from the "
              "folder holding taming/modules/autoencoder/lpips/ for the second), or "
              "add model.params.lossconfig.params.perceptual_weight=0 to the command to train without LPIPS.")


class _NoPerceptualLoss(nn.Module):
    """Stands in for LPIPS when perceptual_weight == 0; taming never calls it then."""

    def forward(self, *args: Any) -> torch.Tensor:  # pragma: no cover - guarded by perceptual_weight
        raise RuntimeError("LPIPS was not built because perceptual_weight is 0")


@contextmanager
def _lpips_class(replacement: Any) -> Iterator[None]:
    with mock.patch.object(vqperceptual, "LPIPS", replacement):
        yield


class VQLPIPSWithDiscriminator(vqperceptual.VQLPIPSWithDiscriminator):
    """taming's loss (same arguments, forward, log keys); see the module docstring for what differs at build time."""

    def __init__(self, disc_start: int, perceptual_weight: float = 1.0, **kwargs: Any) -> None:
        if perceptual_weight == 0:
            with _lpips_class(_NoPerceptualLoss):
                super().__init__(disc_start, perceptual_weight=perceptual_weight, **kwargs)
            # taming calls LPIPS().eval(); the weightless stand-in needs no eval mode, and Lightning warned about it
            self.perceptual_loss.train()
            return
        missing = [name for name, path in lpips_weight_paths().items() if not path.is_file()]
        if missing and os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
            raise MissingWeightsError(missing_weights_message(missing))
        try:
            super().__init__(disc_start, perceptual_weight=perceptual_weight, **kwargs)
        except (OSError, RuntimeError, AssertionError, ImportError) as err:
            still_missing = [name for name, path in lpips_weight_paths().items() if not path.is_file()]
            if not still_missing and not missing:
                raise
            raise MissingWeightsError(missing_weights_message(still_missing or missing)) from err
        except Exception as err:  # requests/urllib raise their own connection errors
            if "connect" in type(err).__name__.lower() or "url" in type(err).__name__.lower():
                raise MissingWeightsError(missing_weights_message(missing)) from err
            raise

    def forward(self, codebook_loss: torch.Tensor, inputs: torch.Tensor, reconstructions: torch.Tensor,
                optimizer_idx: int, global_step: int, last_layer: Optional[torch.Tensor] = None,
                cond: Optional[torch.Tensor] = None, split: str = "train",
                predicted_indices: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
        """taming's loss. inputs, reconstructions: (B, 3, H, W) in [-1, 1]. ``predicted_indices``, which
        latent-diffusion's VQModel passes, is accepted and unused (taming's loss has no use for it)."""
        return super().forward(codebook_loss, inputs, reconstructions, optimizer_idx, global_step,
                               last_layer=last_layer, cond=cond, split=split)
