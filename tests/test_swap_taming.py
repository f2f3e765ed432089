"""A taming ``VQModel`` built from a small config, swapped, trains through taming's own ``training_step``."""
from __future__ import annotations

import copy
import importlib
import sys
import types
import warnings
from typing import Any

import pytest
import pytorch_lightning.utilities
import torch
from omegaconf import OmegaConf

from adapters import swap_quantizers
from adapters.quantizer import RotationVectorQuantizer

CONFIG = """
model:
  target: taming.models.vqgan.VQModel
  params:
    n_embed: 32
    embed_dim: 4
    ddconfig: {double_z: false, z_channels: 4, resolution: 16, in_channels: 3, out_ch: 3, ch: 32, ch_mult: [1, 2],
               num_res_blocks: 1, attn_resolutions: [], dropout: 0.0}
    lossconfig:
      # taming's loss; perceptual_weight 0 builds no LPIPS (offline)
      target: adapters.integrations.losses.VQLPIPSWithDiscriminator
      params: {disc_start: 0, perceptual_weight: 0.0, disc_in_channels: 3, disc_num_layers: 1, disc_ndf: 8,
               codebook_weight: 1.0}
"""


SHIM = "pytorch_lightning.utilities.distributed"


@pytest.fixture(scope="module")
def vqmodel_class() -> type:
    """taming's ``VQModel``. ``taming.models.vqgan`` imports ``taming.main``, which imports ``rank_zero_only`` from
    ``pytorch_lightning.utilities.distributed``, gone in Lightning 2: a stand-in module gives it the same function
    for the import only. (Imported by name, not by an import statement: tests/test_dependencies.py imports every
    module a static import reaches, without this stand-in.)"""
    shim = types.ModuleType(SHIM)
    shim.rank_zero_only = pytorch_lightning.utilities.rank_zero_only  # type: ignore[attr-defined]
    added = SHIM not in sys.modules
    sys.modules.setdefault(SHIM, shim)
    try:
        return importlib.import_module("taming.models.vqgan").VQModel
    finally:
        if added:
            del sys.modules[SHIM]


def _model(vqmodel_class: type) -> Any:
    params = OmegaConf.to_container(OmegaConf.create(CONFIG).model.params)
    torch.manual_seed(0)
    model = vqmodel_class(**params)
    model.learning_rate = 1e-3
    with torch.no_grad():  # a codebook at the encoder's scale, so the step uses many codes
        model.quantize.embedding.weight.normal_()
    return model


def _train_step(model: Any, batch: dict, optimizers: list[torch.optim.Optimizer]) -> list[float]:
    """taming's two-optimizer step as Lightning 1.x ran it: autoencoder (optimizer 0), then discriminator (1)."""
    losses = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer attached: Lightning says so, logs nothing
        for idx, opt in enumerate(optimizers):
            opt.zero_grad()
            loss = model.training_step(batch, 0, idx)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return losses


def test_swapped_taming_vqmodel_trains_a_step(vqmodel_class: type) -> None:
    model = _model(vqmodel_class)
    reference = copy.deepcopy(model)
    optimizers, _ = model.configure_optimizers()  # before the swap: the codebook Parameter must stay the same object
    codebook = model.quantize.embedding.weight
    keys = list(model.state_dict())
    assert swap_quantizers(model, gradient="rotation_released", search="blocked") == ["quantize"]
    assert isinstance(model.quantize, RotationVectorQuantizer) and model.quantize.embedding.weight is codebook
    assert list(model.state_dict()) == keys

    batch = {"image": torch.rand(2, 16, 16, 3) * 2 - 1}  # taming's layout: (B, H, W, 3) in [-1, 1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = _train_step(model, batch, optimizers)
    assert all(torch.isfinite(torch.tensor(losses)))
    after = model.state_dict()
    for name in ("encoder.conv_in.weight", "decoder.conv_out.weight", "quantize.embedding.weight",
                 "loss.discriminator.main.0.weight"):
        assert not torch.equal(before[name], after[name]), f"{name} did not move"
    stats = model.quantize.last_stats
    assert 0 < float(stats["usage"]) <= 1 and float(stats["used_codes"]) >= 2

    # The same step on the upstream model: the same forward, a different encoder update (the rotation's gradient).
    ref_opts, _ = reference.configure_optimizers()
    ref_losses = _train_step(reference, batch, ref_opts)
    assert abs(ref_losses[0] - losses[0]) < 1e-5
    assert not torch.allclose(reference.state_dict()["encoder.conv_in.weight"], after["encoder.conv_in.weight"])
    # and the swapped model's checkpoint loads into a fresh upstream model, strictly
    fresh = _model(vqmodel_class)
    fresh.load_state_dict(model.state_dict(), strict=True)


def test_a_taming_checkpoint_keeps_its_codebook_and_is_swapped_once(vqmodel_class: type, tmp_path) -> None:
    """issue 23 items 1 and 2 on taming's own model: a VQModel built with ``ckpt_path`` brings a trained codebook,
    which codebook_init="kmeans" must not overwrite; and the swapped model is not swapped a second time."""
    from adapters.integrations.swap import AlreadySwappedError, TrainedCodebookError

    trained = _model(vqmodel_class)  # its codebook is N(0, 1), as a trained one leaves taming's +-1/n_e draw
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": trained.state_dict()}, ckpt)
    params = OmegaConf.to_container(OmegaConf.create(CONFIG).model.params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # taming's torch.load without weights_only
        model = vqmodel_class(**params, ckpt_path=str(ckpt))
    codebook = model.quantize.embedding.weight.detach().clone()
    assert torch.equal(codebook, trained.quantize.embedding.weight)
    with pytest.raises(TrainedCodebookError, match=r"quantize: its values lie outside a fresh draw's \+-1/n_e"):
        swap_quantizers(model, gradient="rotation_released", codebook_init="kmeans")
    assert swap_quantizers(model, gradient="rotation_released", search="blocked") == ["quantize"]
    assert not model.quantize.codebook_init_pending
    with pytest.raises(AlreadySwappedError, match=r"quantize \(RotationVectorQuantizer, gradient "
                                                  r"'rotation_released'\) is already the project's quantizer"):
        swap_quantizers(model, gradient="ste")
    assert model.quantize.gradient == "rotation_released"
    model.train()
    model(torch.rand(1, 3, 16, 16) * 2 - 1)  # a training forward: the codebook is not re-initialised
    assert torch.equal(model.quantize.embedding.weight, codebook)
