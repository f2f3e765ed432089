"""adapters.integrations.ldm against latent-diffusion's VQModel: ste equivalence, checkpoints, training loop, errors."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from conftest import requires_ldm

pytestmark = [requires_ldm, pytest.mark.ldm]

DDCONFIG = dict(double_z=False, z_channels=3, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)
LOSS = {"target": "adapters.integrations.losses.VQLPIPSWithDiscriminator",
        "params": {"disc_start": 0, "disc_in_channels": 3, "disc_num_layers": 2, "disc_ndf": 8,
                   "perceptual_weight": 0.0, "disc_weight": 0.75, "codebook_weight": 1.0}}


def _kwargs(**extra: object) -> dict:
    return dict(ddconfig=copy.deepcopy(DDCONFIG), lossconfig=copy.deepcopy(LOSS), n_embed=64, embed_dim=3, **extra)


def _upstream(**extra: object):
    from ldm.models.autoencoder import VQModel
    torch.manual_seed(0)
    return VQModel(**_kwargs(**extra))


def _ours(**extra: object):
    from adapters.integrations.ldm import RotationVQModel
    torch.manual_seed(0)
    return RotationVQModel(**_kwargs(**extra))


def test_ste_equals_upstream_vqmodel_forward_and_gradients() -> None:
    up, ours = _upstream(), _ours(gradient="ste")
    # Same seed -> same initial weights (the codebook is copied from upstream's draw), and same keys both ways.
    for (k1, v1), (k2, v2) in zip(up.state_dict().items(), ours.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    outs = []
    for model in (up, ours):
        model.train()
        dec, diff = model(x)
        loss, _ = model.loss(diff, x, dec, 0, 0, last_layer=model.get_last_layer(), split="train")
        model.zero_grad()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        outs.append((dec.detach(), diff.detach(), loss.detach(), grads))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert torch.equal(outs[0][2], outs[1][2])
    assert outs[0][3].keys() == outs[1][3].keys()
    # Same forward values, same gradient math; what may differ is the order in which a float32 reduction adds its
    # terms (e.g. the thread count, or a gradient with other strides, picks another kernel: OMP_NUM_THREADS=1 moved
    # quant_conv.bias by one rounding step, 3e-8 of 0.22). Reordering a sum of n float32 terms of size <= s moves it
    # by at most about n * eps * s; every entry here sums over at most n = B*H*W = 2048 positions (batch x image
    # pixels). So each tensor may differ by n * eps * max|g| (2.4e-4 of its largest entry) and no more: a real
    # difference (another estimator, a lost loss term, a 1e-3 relative change) is far above that.
    n = x.numel() // x.shape[1]
    eps = torch.finfo(torch.float32).eps

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool(((a - b).abs() <= n * eps * a.abs().max()).all())

    for name in outs[0][3]:
        a, b = outs[0][3][name], outs[1][3][name]
        assert close(a, b), (name, (a - b).abs().max().item(), a.abs().max().item())
    # the bound is not vacuous: a 1e-3 relative change of one entry (the largest) would fail it
    g = outs[0][3]["quant_conv.bias"]
    assert not close(g, g + 1e-3 * g.abs().max() * (g.abs() == g.abs().max()))


def test_rotation_changes_encoder_gradient_not_forward() -> None:
    ste, rot = _ours(gradient="ste"), _ours(gradient="rotation_released")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    res = []
    for model in (ste, rot):
        dec, diff = model(x)
        model.zero_grad()
        (dec ** 2).mean().backward()
        res.append((dec.detach(), model.encoder.conv_in.weight.grad.clone()))
    assert torch.allclose(res[0][0], res[1][0], atol=1e-5)
    assert not torch.allclose(res[0][1], res[1][1])


def test_upstream_checkpoint_loads_without_missing_or_unexpected_keys(tmp_path: Path) -> None:
    up = _upstream(use_ema=True)
    ckpt = tmp_path / "upstream.ckpt"
    torch.save({"state_dict": up.state_dict()}, ckpt)
    ours = _ours(use_ema=True, gradient="rotation", ckpt_path=str(ckpt))
    missing, unexpected = ours.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"], strict=False)
    assert not missing and not unexpected
    assert torch.equal(ours.quantize.embedding.weight, up.quantize.embedding.weight)
    assert torch.equal(ours.encoder.conv_in.weight, up.encoder.conv_in.weight)
    # and back: our checkpoints are upstream VQModel checkpoints
    fresh = _upstream(use_ema=True)
    fresh.load_state_dict(ours.state_dict(), strict=True)


def test_gumbel_baseline_forward_and_keys() -> None:
    from adapters.integrations.ldm import GumbelVQModel
    torch.manual_seed(0)
    model = GumbelVQModel(**_kwargs(temperature_scheduler_config={
        "target": "ldm.lr_scheduler.LambdaWarmUpCosineScheduler",
        "params": {"warm_up_steps": 0, "max_decay_steps": 100, "lr_start": 0.9, "lr_max": 0.9, "lr_min": 1e-6}}))
    keys = set(model.state_dict())
    assert {"quantize.proj.weight", "quantize.embed.weight"} <= keys and "quantize.embedding.weight" not in keys
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    dec, kl = model(x)
    assert dec.shape == x.shape and kl.ndim == 0
    stats = model.code_stats.last
    assert 0 < float(stats["usage"]) <= 1 and float(stats["used_codes"]) >= 1
    assert abs(model.temperature_scheduler(0) - 0.9) < 1e-6


@pytest.mark.parametrize("kwargs, message", [
    ({"gradient": "sideways"}, "unknown gradient"),
    ({"quantizer_config": {"bta": 0.5}}, "unknown option"),
    ({"rot_trick": True}, "rot_trick: true is gradient: rotation_released"),
    ({"n_emebd": 3}, r"unknown option\(s\) \['n_emebd'\] in model.params"),
])
def test_unknown_options_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _ours(**kwargs)


def test_loss_without_predicted_indices_is_rejected() -> None:
    from adapters.integrations.ldm import RotationVQModel
    kw = _kwargs()
    kw["lossconfig"] = {"target": "taming.modules.losses.vqperceptual.DummyLoss"}
    with pytest.raises(ValueError, match="predicted_indices"):
        RotationVQModel(**kw)


def test_gumbel_rejects_a_gradient_choice() -> None:
    from adapters.integrations.ldm import GumbelVQModel
    with pytest.raises(ValueError, match="GumbelVQModel"):
        GumbelVQModel(**_kwargs(gradient="rotation"))


def test_manual_optimisation_counts_batches_and_updates_both_nets(tmp_path: Path) -> None:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from adapters.evaluation.data import PhotoCrops

    model = _ours(gradient="rotation_released", use_ema=True, scheduler_config={
        "target": "ldm.lr_scheduler.LambdaLinearScheduler",
        "params": {"warm_up_steps": [2], "cycle_lengths": [10], "f_start": [0.1], "f_max": [1.0],
                   "f_min": [1.0]}})
    model.learning_rate = 1e-3
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train = DataLoader(PhotoCrops(size=32, length=6, photos=["astronaut", "coffee"], scale_to=64), batch_size=2)
    val = DataLoader(PhotoCrops(size=32, length=2, photos=["chelsea"], random_crop=False, scale_to=64),
                     batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=str(tmp_path))
    trainer.fit(model, train, val)
    assert trainer.global_step == 3  # one step per batch, as upstream, though two optimizers stepped
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert any(n.startswith("loss.discriminator.") for n in changed)
    assert any(n.startswith("encoder.") for n in changed) and "quantize.embedding.weight" in changed
    metrics = trainer.callback_metrics
    for key in ("train/codebook_usage", "train/quant_error", "train/perplexity", "train/disc_loss",
                "train/codebook_usage_total", "val/codebook_usage", "val/codebook_usage_total", "val/rec_loss"):
        assert key in metrics, key
    assert 0 < float(metrics["val/codebook_usage_total"]) <= 1
    # the lr followed the step schedule (warm-up from 0.1x): both optimizers stepped their schedulers 3 times
    for sched in model.lr_schedulers():
        assert sched.last_epoch == 3
    assert model.model_ema.num_updates.item() == 3


def test_gumbel_baseline_trains_with_annealed_temperature(tmp_path: Path) -> None:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from adapters.evaluation.data import PhotoCrops
    from adapters.integrations.ldm import GumbelVQModel

    torch.manual_seed(0)
    model = GumbelVQModel(**_kwargs(temperature_scheduler_config={
        "target": "ldm.lr_scheduler.LambdaWarmUpCosineScheduler",
        "params": {"warm_up_steps": 0, "max_decay_steps": 4, "lr_start": 0.9, "lr_max": 0.9, "lr_min": 0.1}}))
    model.learning_rate = 1e-3
    train = DataLoader(PhotoCrops(size=32, length=4, photos=["rocket"], scale_to=64), batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    before = model.quantize.proj.weight.detach().clone()
    trainer.fit(model, train)
    assert trainer.global_step == 2
    assert not torch.equal(before, model.quantize.proj.weight)
    assert model.quantize.temperature < 0.9  # annealed along the cosine schedule
    metrics = trainer.callback_metrics
    assert "train/codebook_usage" in metrics and "train/quant_error" not in metrics


@requires_ldm
def test_resume_with_an_lr_scheduler(tmp_path) -> None:
    """Upstream's schedules put numpy floats into checkpoints; resuming (weights_only loading) must still work."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from adapters.evaluation.data import PhotoCrops

    def make():
        m = _ours(gradient="rotation_released", scheduler_config={
            "target": "ldm.lr_scheduler.LambdaLinearScheduler",
            "params": {"warm_up_steps": [2], "cycle_lengths": [10], "f_start": [0.1], "f_max": [1.0],
                       "f_min": [1.0]}})
        m.learning_rate = 1e-3
        return m

    data = DataLoader(PhotoCrops(size=32, length=8, photos=["astronaut"], scale_to=64), batch_size=2)
    kw = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    first = pl.Trainer(max_steps=3, **kw)
    first.fit(make(), data)
    first.save_checkpoint(tmp_path / "a.ckpt")
    second = pl.Trainer(max_steps=5, **kw)
    second.fit(make(), data, ckpt_path=str(tmp_path / "a.ckpt"))
    assert second.global_step == 5


def test_building_ours_leaves_the_rng_stream_where_upstream_leaves_it() -> None:
    """Same seed, same model, same data order afterwards: the quantizer swap draws from a forked generator."""
    _upstream()
    after_upstream = torch.rand(4)
    _ours(gradient="rotation")
    assert torch.equal(torch.rand(4), after_upstream)
