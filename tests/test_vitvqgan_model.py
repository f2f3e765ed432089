"""adapters.integrations.vitvqgan: RotationViTVQ against upstream ViTVQ, its offline loss, data, the Table 4 configs."""
from __future__ import annotations

import copy
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, requires_enhancing

pytestmark = requires_enhancing
CONFIGS = ROOT / "configs"


def tiny_params(loss_target: str = "enhancing.losses.vqperceptual.DummyLoss", **loss_params) -> dict:
    """Model params of configs/tiny_rot_vitvqgan.yaml with another loss and no gradient key (upstream's signature)."""
    params = OmegaConf.to_container(OmegaConf.load(CONFIGS / "tiny_rot_vitvqgan.yaml").model.params)
    params.pop("gradient")
    params["loss"] = {"target": loss_target, "params": loss_params}
    return params


def upstream_and_ours(gradient: str, seed: int = 0):
    """An upstream ViTVQ and a RotationViTVQ holding the same weights."""
    from enhancing.modules.stage1.vitvqgan import ViTVQ

    from adapters.integrations.vitvqgan import RotationViTVQ

    torch.manual_seed(seed)
    up = ViTVQ(**OmegaConf.create(tiny_params()))
    ours = RotationViTVQ(**tiny_params(), gradient=gradient)
    ours.load_state_dict(up.state_dict(), strict=True)
    return up, ours


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_ste_equals_upstream_vitvq() -> None:
    """gradient: ste reproduces upstream's reconstruction, codebook loss, codes and every parameter gradient."""
    up, ours = upstream_and_ours("ste")
    x = torch.rand(3, 3, 16, 16)
    outs = []
    for model in (up, ours):
        dec, qloss = model(x)
        ((dec - x).square().mean() + qloss).backward()
        outs.append((dec.detach(), qloss.detach(), model.encode_codes(x), grads(model)))
    (d0, l0, c0, g0), (d1, l1, c1, g1) = outs
    assert torch.equal(c0, c1)
    torch.testing.assert_close(d1, d0, rtol=0, atol=1e-6)
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-7)
    assert g0.keys() == g1.keys() and "quantizer.embedding.weight" in g0 and "encoder.to_patch_embedding.0.weight" in g0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


def test_rotation_released_equals_the_authors_table4_estimator() -> None:
    """The authors' ROT_ViTVQ (their rot_vitvqgan.py, restated here from its math): upstream quantizes, then the raw
    pre_quant output e is normalised and rotated by the detached R that maps e/|e| onto q/|q|, times detached |q|."""
    up, ours = upstream_and_ours("rotation_released")
    x = torch.rand(3, 3, 16, 16)

    h = up.pre_quant(up.encoder(x))
    q, emb_loss, _ = up.quantizer(h)
    e, qf = h.reshape(-1, h.shape[-1]), q.reshape(-1, h.shape[-1])
    u = e / e.norm(dim=1, keepdim=True)
    q_hat = qf / qf.norm(dim=1, keepdim=True)
    w = (u + q_hat) / (u + q_hat).norm(dim=1, keepdim=True)
    eye = torch.eye(e.shape[1])
    rot = (eye - 2 * w[:, :, None] * w[:, None, :] + 2 * q_hat[:, :, None] * u[:, None, :]).detach()
    rotated = (rot @ u[:, :, None]).squeeze(-1) * qf.detach().norm(dim=1, keepdim=True)
    dec_ref = up.decode(rotated.view_as(h))
    ((dec_ref - x).square().mean() + emb_loss).backward()

    dec, qloss = ours(x)
    ((dec - x).square().mean() + qloss).backward()
    torch.testing.assert_close(dec, dec_ref, rtol=0, atol=1e-5)
    g_ref, g = grads(up), grads(ours)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_estimators_share_the_forward_pass_but_not_the_encoder_gradient() -> None:
    _, ste = upstream_and_ours("ste")
    _, rot = upstream_and_ours("rotation_released")
    x = torch.rand(2, 3, 16, 16)
    for m in (ste, rot):
        dec, qloss = m(x)
        (dec.square().mean() + qloss).backward()
    # Equal up to the rounding of upstream's e + (q - e), which the rotation output does not have.
    torch.testing.assert_close(rot(x)[0], ste(x)[0], rtol=0, atol=1e-5)
    g_ste = ste.encoder.to_patch_embedding[0].weight.grad
    g_rot = rot.encoder.to_patch_embedding[0].weight.grad
    assert not torch.allclose(g_ste, g_rot, atol=1e-6)
    # The decoder and codebook see the same values, so their gradients agree.
    torch.testing.assert_close(rot.quantizer.embedding.weight.grad, ste.quantizer.embedding.weight.grad,
                               rtol=1e-4, atol=1e-6)


def test_upstream_checkpoint_loads_with_no_missing_or_unexpected_keys(tmp_path: Path) -> None:
    from adapters.integrations.vitvqgan import RotationViTVQ

    up, _ = upstream_and_ours("ste", seed=1)
    ckpt = tmp_path / "upstream.ckpt"
    # A Lightning 1.x checkpoint also holds non-tensor state (hence weights_only=False in init_from_ckpt).
    torch.save({"state_dict": up.state_dict(), "epoch": 3, "callbacks": {"dirpath": tmp_path}}, ckpt)
    torch.manual_seed(2)
    model = RotationViTVQ(**tiny_params(), gradient="rotation_released")
    assert not torch.equal(model.quantizer.embedding.weight, up.quantizer.embedding.weight)
    missing, unexpected = model.init_from_ckpt(str(ckpt))
    assert missing == [] and unexpected == []
    for k, v in up.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    loaded = RotationViTVQ(**tiny_params(), path=str(ckpt), gradient="ste")
    assert torch.equal(loaded.quantizer.embedding.weight, up.quantizer.embedding.weight)


def test_table4_model_has_upstream_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/rot_vitvqgan_small.yaml builds exactly the state-dict keys of the authors' released Table 4 config
    (upstream ViTVQ with enhancing's VQLPIPSWithDiscriminator), so their checkpoint loads strictly."""
    import lpips.pretrained_networks as pn
    import torchvision
    from enhancing.utils.general import initialize_from_config

    # LPIPS's VGG16 with random weights: same keys, no download.
    vgg16 = torchvision.models.vgg16
    monkeypatch.setattr(pn.tv, "vgg16", lambda *a, **k: vgg16(weights=None))
    cfg = OmegaConf.load(CONFIGS / "rot_vitvqgan_small.yaml").model
    ours = initialize_from_config(cfg)
    released = copy.deepcopy(cfg)
    released.target = "enhancing.modules.stage1.vitvqgan.ViTVQ"
    released.params.loss.target = "enhancing.losses.vqperceptual.VQLPIPSWithDiscriminator"
    del released.params["gradient"]
    up = initialize_from_config(released)
    sd_up = up.state_dict()
    assert set(ours.state_dict()) == set(sd_up)
    ours.load_state_dict(sd_up, strict=True)
    assert type(ours.loss.discriminator).__name__ == "StyleDiscriminator"
    assert any(k.startswith("loss.perceptual_loss.") for k in sd_up)


def test_codebook_statistics_stay_out_of_the_state_dict_and_of_ddp_buffers() -> None:
    _, model = upstream_and_ours("rotation_released")
    assert not any("stats" in n for n, _ in model.named_buffers())
    assert not any("stats" in n for n in model.state_dict())
    params = tiny_params()
    size, tokens = params["image_size"], (params["image_size"] // params["patch_size"]) ** 2
    model(torch.rand(2, 3, size, size))
    assert int(model.code_stats.code_counts.sum()) == 2 * tokens  # 2 images x their tokens
    # not a module either: nothing DDP could broadcast (the tensors follow the device of the indices they count)
    assert not any("stats" in n for n, _ in model.named_modules())


def test_bad_gradient_names_are_rejected() -> None:
    from adapters.integrations.vitvqgan import RotationViTVQ

    with pytest.raises(ValueError, match="model.params.gradient"):
        RotationViTVQ(**tiny_params(), gradient="rotaton")
    params = tiny_params()
    params["quantizer"]["gradient"] = "ste"
    with pytest.raises(ValueError, match="model.params.gradient"):
        RotationViTVQ(**params)


def test_usage_picture() -> None:
    from adapters.evaluation.codebook_logging import usage_picture

    counts = torch.zeros(8192, dtype=torch.long)
    counts[[0, 5, 8191]] = torch.tensor([1, 100, 7])
    pic = usage_picture(counts)
    assert pic.shape == (1, 3, 64, 128)
    flat = pic[0, 0].flatten()
    assert flat[5] == 1.0 and 0 < flat[0] < flat[8191] < 1 and int((flat > 0).sum()) == 3
    assert usage_picture(torch.ones(64)).shape == (1, 3, 8, 8)


# --- loss -------------------------------------------------------------------------------------------------------
def test_offline_loss_builds_no_lpips_and_matches_upstream_terms() -> None:
    from adapters.integrations.vitvqgan import VQLPIPSWithDiscriminator

    loss = VQLPIPSWithDiscriminator(perceptual_weight=0.0, loggaussian_weight=1.0, loglaplace_weight=0.0,
                                    adversarial_weight=0.1, disc_params={"size": 8})
    assert not any(k.startswith("perceptual_loss") for k in loss.state_dict())
    x, xrec = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8, requires_grad=True)
    total, log = loss(torch.tensor(0.5), x, xrec, 0, 0, 1, split="train")
    expected = (xrec - x).pow(2).mean() + 0.1 * loss.disc_loss(loss.discriminator(xrec)) + 0.5
    torch.testing.assert_close(total, expected)
    assert float(log["train/perceptual_loss"]) == 0.0 and "train/g_loss" in log


def test_loss_discriminator_can_be_chosen() -> None:
    from adapters.integrations.vitvqgan import VQLPIPSWithDiscriminator

    spec = {"target": "enhancing.losses.layers.PatchDiscriminator", "params": {"input_nc": 3, "ndf": 8, "n_layers": 2}}
    loss = VQLPIPSWithDiscriminator(perceptual_weight=0.0, discriminator=spec)
    assert type(loss.discriminator).__name__ == "PatchDiscriminator"
    with pytest.raises(ValueError, match="not both"):
        VQLPIPSWithDiscriminator(perceptual_weight=0.0, discriminator=spec, disc_params={"size": 8})


def test_missing_vgg_weights_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from adapters.integrations.losses import MissingWeightsError
    from adapters.integrations.vitvqgan import VQLPIPSWithDiscriminator, vgg16_weights_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("ROTATION_TRICK_OFFLINE", "1")
    with pytest.raises(MissingWeightsError) as err:
        VQLPIPSWithDiscriminator(perceptual_weight=0.1, disc_params={"size": 8})
    assert str(vgg16_weights_path()) in str(err.value) and "vgg16-397923af.pth" in str(err.value)
    assert str(tmp_path) in str(vgg16_weights_path())

    # Online but unreachable: the download fails, and the error says the same.
    monkeypatch.delenv("ROTATION_TRICK_OFFLINE")

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", unreachable)
    with pytest.raises(MissingWeightsError, match="perceptual_weight: 0"):
        VQLPIPSWithDiscriminator(perceptual_weight=0.1, disc_params={"size": 8})
    # A mistake in the config is reported as itself, not as missing weights.
    with pytest.raises(TypeError, match="disc_strat"):
        VQLPIPSWithDiscriminator(perceptual_weight=0.1, disc_params={"size": 8}, disc_strat=0)


# --- data -------------------------------------------------------------------------------------------------------
def _fake_imagenet(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            (root / split / wnid).mkdir(parents=True)
            for i in range(2):
                arr = rng.integers(0, 256, size=(40 + 8 * i, 56, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / wnid / f"{wnid}_{i}.JPEG")


def test_imagenet_folders_with_upstream_transforms(tmp_path: Path) -> None:
    from PIL import Image
    from torchvision import transforms as T

    from adapters.evaluation.data import DataError
    from adapters.integrations.vitvqgan import ImageNetTrain, ImageNetValidation

    _fake_imagenet(tmp_path)
    train = ImageNetTrain(root=str(tmp_path), resolution=32)
    item = train[0]
    assert len(train) == 4 and item["image"].shape == (3, 32, 32) and item["class"].shape == (1,)
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    val = ImageNetValidation(root=str(tmp_path), resolution=32)
    item = val[3]
    with Image.open(item["file_path_"]) as img:
        want = T.Compose([T.Resize((32, 32)), T.CenterCrop((32, 32)), T.ToTensor()])(img.convert("RGB"))
    assert torch.equal(item["image"], want) and item["class_label"] == 1
    with pytest.raises(DataError, match="IMAGENET_ROOT"):
        ImageNetValidation(root=str(tmp_path / "missing"))


# --- configs ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,gradient", [("rot_vitvqgan_small", "rotation_released"), ("vitvqgan_small", "ste")])
def test_table4_configs_carry_the_papers_hyperparameters(name: str, gradient: str) -> None:
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    p = cfg.model.params
    assert cfg.model.target == "adapters.integrations.vitvqgan.RotationViTVQ" and p.gradient == gradient
    assert (p.image_size, p.patch_size) == (256, 8)
    for side in (p.encoder, p.decoder):
        assert (side.dim, side.depth, side.heads, side.mlp_dim) == (512, 8, 8, 2048)
    assert (p.quantizer.embed_dim, p.quantizer.n_embed) == (32, 8192)
    lp = p.loss.params
    assert (lp.codebook_weight, lp.loglaplace_weight, lp.loggaussian_weight, lp.perceptual_weight,
            lp.adversarial_weight) == (1.0, 0.0, 1.0, 0.1, 0.1)
    assert "discriminator" not in lp  # upstream's StyleGAN2 discriminator, as the authors trained
    assert cfg.dataset.params.batch_size == 32
    assert cfg.dataset.params.train.params.resolution == 256


def test_twin_configs_differ_only_in_the_estimator() -> None:
    for rot, ste in (("rot_vitvqgan_small", "vitvqgan_small"), ("tiny_rot_vitvqgan", "tiny_vitvqgan")):
        a = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{rot}.yaml"))
        b = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{ste}.yaml"))
        assert a["model"]["params"].pop("gradient") == "rotation_released"
        assert b["model"]["params"].pop("gradient") == "ste"
        assert a == b


def _codes_on_the_first_batch(name: str, codebook_init: str, seed: int = 0) -> int:
    """Codes one training forward of the config's first batch of its own training crops uses (of n_embed)."""
    from adapters.evaluation.data import PhotoCrops
    from adapters.integrations.vitvqgan import RotationViTVQ

    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    params = OmegaConf.to_container(cfg.model.params)
    params["loss"] = {"target": "enhancing.losses.vqperceptual.DummyLoss", "params": {}}
    params["quantizer"]["codebook_init"] = codebook_init
    torch.manual_seed(seed)
    model = RotationViTVQ(**params).train()
    data = PhotoCrops(**OmegaConf.to_container(cfg.dataset.params.train.params))
    model(torch.stack([data[i]["image"] for i in range(cfg.dataset.params.batch_size)]))
    return int((model.code_stats.code_counts > 0).sum())


@pytest.mark.parametrize("name", ["tiny_rot_vitvqgan", "tiny_vitvqgan"])
def test_tiny_configs_start_from_a_codebook_their_encoder_uses(name: str) -> None:
    """Issue 23 item 12: the smoke run drew the same noise for every input because the untrained encoder's
    l2-normalised outputs are nearly parallel, so upstream's N(0, 1) codebook served its first batch with ~10 of 64
    codes and collapsed to 1-3. The tiny configs set codebook_init: kmeans, fitted to that first batch (1,024 vectors
    at batch 16): it starts with (nearly) every code in use. The upstream draw is the witness that the cause is real."""
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    n_embed = cfg.model.params.quantizer.n_embed
    assert cfg.model.params.quantizer.codebook_init == "kmeans"
    assert _codes_on_the_first_batch(name, "kmeans") >= 0.9 * n_embed
    assert _codes_on_the_first_batch(name, "upstream") <= 0.4 * n_embed


def test_tiny_smoke_run_command_and_steps_match_the_docs() -> None:
    """docs/vitvqgan.md states PSNR, codebook usage and wall time for the command in the tiny configs' headers, at
    960 steps: they hold for these settings only, so a change to the data, batch or command must change both."""
    docs = (ROOT / "docs" / "vitvqgan.md").read_text()
    for name in ("tiny_rot_vitvqgan", "tiny_vitvqgan"):
        command = f"main.py -c {name} -lr 3e-4 -e 30 -ng 0 -l csv -m 8"
        assert command in (CONFIGS / f"{name}.yaml").read_text() and command in docs
        data = OmegaConf.load(CONFIGS / f"{name}.yaml").dataset.params
        assert 30 * (data.train.params.length // data.batch_size) == 960
    assert "960 steps" in docs
