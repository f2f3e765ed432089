"""adapters.integrations.losses: taming's VQ-GAN loss without LPIPS at weight 0; a clear error for missing weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters.integrations.losses import MissingWeightsError, VQLPIPSWithDiscriminator


def test_zero_perceptual_weight_builds_no_lpips_and_matches_taming_formula() -> None:
    torch.manual_seed(0)
    loss = VQLPIPSWithDiscriminator(disc_start=5, perceptual_weight=0.0, disc_num_layers=2, disc_ndf=8)
    assert not any(k.startswith("perceptual_loss.") for k in loss.state_dict())
    x = torch.rand(2, 3, 16, 16)
    w = torch.ones(1, requires_grad=True)  # stands in for the decoder's last layer
    xrec = torch.rand(2, 3, 16, 16) * w
    q = torch.tensor(0.5)
    total, log = loss(q, x, xrec, 0, global_step=0, last_layer=w, split="val", predicted_indices=None)
    # before disc_start the discriminator term is off: total = mean |x - xrec| + codebook_weight * q
    assert torch.allclose(total, (x - xrec).abs().mean() + q)
    assert {"val/rec_loss", "val/quant_loss", "val/g_loss", "val/p_loss"} <= set(log)
    d_loss, d_log = loss(q, x, xrec, 1, global_step=10, last_layer=w, split="train")
    assert d_loss.ndim == 0 and "train/disc_loss" in d_log


def test_missing_lpips_weights_name_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("ROTATION_TRICK_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingWeightsError) as err:
        VQLPIPSWithDiscriminator(disc_start=0, perceptual_weight=1.0)
    text = str(err.value)
    assert "vgg16-397923af.pth" in text and str(tmp_path / "torch_home" / "hub" / "checkpoints") in text
    assert "vgg.pth" in text and str(tmp_path / "taming" / "modules" / "autoencoder" / "lpips") in text
    assert "model.params.lossconfig.params.perceptual_weight=0" in text  # the override that works on main.py
