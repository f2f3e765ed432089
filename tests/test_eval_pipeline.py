"""End to end: config + checkpoint -> scripts/evaluate.py -> JSON record, on tiny models, with no downloads.

Inception weights are a randomly initialised torch-fidelity InceptionV3 saved to a temporary file (right shapes,
meaningless features): the pipeline and the record are tested, not the FID of real images.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from adapters import evaluation as E
from adapters.evaluation import distributed
from adapters.evaluation import metrics as M
from adapters.quantizer import RotationVectorQuantizer
from conftest import ROOT, requires_enhancing, requires_ldm


# --------------------------------------------------------------------------------------------------------------
# A tiny model with latent-diffusion VQModel's interface (importable as test_eval_pipeline.TinyVQ)
# --------------------------------------------------------------------------------------------------------------
class L1RecLoss(nn.Module):
    """A loss module with taming's call signature whose val/rec_loss is mean |x - xrec|."""

    def forward(self, qloss, x, xrec, optimizer_idx, global_step, last_layer=None, cond=None, split="train"):
        rec = (x - xrec).abs().mean()
        return rec + qloss, {f"{split}/rec_loss": rec.detach(), f"{split}/quant_loss": qloss.detach()}


class TinyVQ(nn.Module):
    """encoder (stride 4) -> quant_conv -> quantize -> post_quant_conv -> decoder; batches HWC in [-1, 1]."""

    def __init__(self, n_embed: int = 16, embed_dim: int = 3, quantizer: str = "rotation", seed: int = 0,
                 image_key: str = "image") -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.image_key = image_key
        self.global_step = 0
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 4, stride=2, padding=1), nn.ReLU(),
                                     nn.Conv2d(8, 8, 4, stride=2, padding=1))
        self.quant_conv = nn.Conv2d(8, embed_dim, 1)
        if quantizer == "taming":
            from taming.modules.vqvae.quantize import VectorQuantizer2
            self.quantize = VectorQuantizer2(n_embed, embed_dim, beta=0.25)
        elif quantizer == "gumbel":
            from taming.modules.vqvae.quantize import GumbelQuantize
            self.quantize = GumbelQuantize(embed_dim, embed_dim, n_embed=n_embed)
        else:
            self.quantize = RotationVectorQuantizer(n_embed, embed_dim, gradient=quantizer)
        if hasattr(self.quantize, "embedding"):  # codes spread like encoder outputs, so several get used
            self.quantize.embedding.weight.data.normal_()
        self.post_quant_conv = nn.Conv2d(embed_dim, 8, 1)
        self.decoder = nn.Sequential(nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1), nn.ReLU(),
                                     nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1), nn.Tanh())
        self.loss = L1RecLoss()

    def get_input(self, batch, k):
        return batch[k].permute(0, 3, 1, 2).float()

    def encode(self, x):
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, quant):
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, x):
        quant, diff, _ = self.encode(x)
        return self.decode(quant), diff

    def get_last_layer(self):
        return self.decoder[-2].weight


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i]}


class TensorImages(torch.utils.data.Dataset):
    """uint8 (N, 3, H, W) -> one image per item, as torch-fidelity's inputs want."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def _images(n: int = 6, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, size, size, 3, generator=g) * 2 - 1


# --------------------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    """A randomly initialised torch-fidelity InceptionV3 state dict (made offline: no weights are fetched)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    torch.manual_seed(0)
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    # He initialisation keeps activations alive through ~90 layers, so features differ between images.
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


def _write_run(tmp_path: Path, params: dict, name: str = "tiny") -> tuple[Path, Path]:
    cfg = {"model": {"target": "test_eval_pipeline.TinyVQ", "params": params}}
    cfg_path = tmp_path / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    model = TinyVQ(**params)
    ckpt_path = tmp_path / f"{name}.ckpt"
    torch.save({"state_dict": model.state_dict(), "global_step": 7, "epoch": 1}, ckpt_path)
    return cfg_path, ckpt_path


def _evaluate_script():
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "scripts" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _reference(model: TinyVQ, images: torch.Tensor, batch: int) -> dict:
    """Independent computation of the codebook and loss numbers the record must hold."""
    model.eval()
    usages, losses, all_idx = [], [], []
    n = model.quantize.n_e
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images[i:i + batch].permute(0, 3, 1, 2)
            h = model.quant_conv(model.encoder(x))
            e = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
            idx = torch.cdist(e, model.quantize.embedding.weight).argmin(1)
            usages.append(idx.unique().numel() / n)
            all_idx.append(idx)
            xrec, _ = model(x)
            losses.append((x - xrec).abs().mean().item() * x.shape[0])
    idx = torch.cat(all_idx)
    return {"usage_batch": float(np.mean(usages)), "usage_set": idx.unique().numel() / n,
            "valid_loss": sum(losses) / len(images), "counts": torch.bincount(idx, minlength=n).tolist()}


# --------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------
def test_evaluate_script_end_to_end(tmp_path, inception_weights) -> None:
    cfg_path, ckpt_path = _write_run(tmp_path, {"n_embed": 16, "embed_dim": 3, "quantizer": "rotation"})
    out = tmp_path / "results" / "tiny.json"
    record = _evaluate_script().main([
        "--config", str(cfg_path), "--checkpoint", str(ckpt_path), "--offline-photos", "--limit", "3",
        "--size", "16", "--batch-size", "2", "--num-workers", "0", "--device", "cpu", "--out", str(out),
        "--inception-weights", str(inception_weights), "--no-lpips", "--offline", "--no-progress",
        "--setting", "64x64x3", "--label", "tiny rotation"])
    on_disk = json.loads(out.read_text())
    E.validate_record(on_disk)
    assert on_disk["metrics"] == record["metrics"]
    assert on_disk["checkpoint"]["sha256"] == hashlib.sha256(ckpt_path.read_bytes()).hexdigest()
    assert on_disk["checkpoint"]["global_step"] == 7
    assert on_disk["data"]["num_images"] == 3 and on_disk["data"]["source"] == "offline-photos"
    assert on_disk["data"]["batch_size"] == 2
    assert on_disk["row"] == {"table": 3, "approach": "rotation", "gradient": "rotation", "setting": "64x64x3",
                              "label": "tiny rotation"}
    assert on_disk["model"]["latent_shape"] == "4x4x3"
    assert on_disk["config"]["model"]["params"]["n_embed"] == 16
    assert set(on_disk["definitions"]) >= {"codebook_usage_per_batch", "codebook_usage_whole_set"}
    assert (out.parent / on_disk["examples_png"]).is_file()
    m = on_disk["metrics"]
    for key in ("r_fid", "r_is", "is_originals", "psnr", "ssim", "valid_loss", "quant_error"):
        assert m[key] is not None and np.isfinite(m[key]), key
    assert m["lpips"] is None and "lpips" in on_disk["skipped"]
    assert m["r_fid"] >= -1e-6 and m["r_is"] >= 1.0 - 1e-6

    # The same numbers computed independently from the model and the same crops.
    from adapters.evaluation.data import PhotoCrops

    crops = PhotoCrops(size=16, length=3, random_crop=False, seed=0)
    images = torch.stack([torch.from_numpy(crops[i]["image"]) for i in range(3)])
    ref = _reference(TinyVQ(n_embed=16, embed_dim=3), images, batch=2)
    assert m["codebook_usage_per_batch"] == pytest.approx(ref["usage_batch"])
    assert m["codebook_usage_whole_set"] == pytest.approx(ref["usage_set"])
    assert on_disk["code_counts"] == ref["counts"]
    assert m["valid_loss"] == pytest.approx(ref["valid_loss"], rel=1e-5)


def test_quantizer_statistics_equal_the_hook_fallback() -> None:
    """Our quantizer's own statistics and the forward-hook path for upstream's quantizer give the same numbers."""
    images = _images(7)
    own = TinyVQ(n_embed=8, quantizer="ste")
    upstream = TinyVQ(n_embed=8, quantizer="taming")
    upstream.load_state_dict(own.state_dict())
    opts = E.EvalOptions(batch_size=3, fid=False, lpips=False, progress=False, device="cpu", examples=0)
    a = E.evaluate(own, ListDataset(images), opts)
    b = E.evaluate(upstream, ListDataset(images), opts)
    assert a.code_counts == b.code_counts and sum(a.code_counts) == 7 * 16
    for key in ("codebook_usage_per_batch", "codebook_usage_whole_set", "used_codes_whole_set", "quant_error",
                "valid_loss", "psnr"):
        assert a.metrics[key] == pytest.approx(b.metrics[key], rel=1e-5), key
    ref = _reference(own, images, batch=3)
    assert a.metrics["codebook_usage_per_batch"] == pytest.approx(ref["usage_batch"])


def test_gumbel_reports_usage_without_quantization_error() -> None:
    model = TinyVQ(n_embed=8, quantizer="gumbel")
    opts = E.EvalOptions(batch_size=4, fid=False, lpips=False, progress=False, device="cpu", examples=0)
    res = E.evaluate(model, ListDataset(_images(5)), opts)
    assert res.metrics["quant_error"] is None and "quant_error" in res.skipped
    assert 0 < res.metrics["codebook_usage_whole_set"] <= 1 and sum(res.code_counts) == 5 * 16
    assert E.default_row({"family": "taming", "gradient": E.quantizer_info(model)["gradient"]})["approach"] == "gumbel"


def test_injected_lpips_and_inception_match_torch_fidelity(inception_weights) -> None:
    """r-FID/r-IS from the streamed moments equal torch-fidelity's own calculate_metrics on the same images."""
    import lpips
    import torch_fidelity

    net = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)  # random backbone, heads from the wheel
    inc = M.load_inception(inception_weights, allow_download=False)
    opts = E.EvalOptions(batch_size=2, progress=False, device="cpu", examples=2)
    model, images = TinyVQ(), _images(2, size=32)
    res = E.evaluate(model, ListDataset(images), opts, inception=inc, lpips_net=net)
    assert res.metrics["lpips"] is not None and res.metrics["lpips"] > 0
    assert res.examples is not None and res.examples.shape == (4, 3, 32, 32)
    with torch.no_grad():
        x = images.permute(0, 3, 1, 2)
        xrec, _ = model.eval()(x)
    originals, recons = M.to_uint8((x + 1) / 2), M.to_uint8((xrec + 1) / 2)
    ref = torch_fidelity.calculate_metrics(
        input1=TensorImages(recons), input2=TensorImages(originals),
        fid=True, isc=True, isc_splits=2, cuda=False, batch_size=2, verbose=False, cache=False,
        feature_extractor_weights_path=str(inception_weights))
    assert res.metrics["r_fid"] > 0
    assert res.metrics["r_fid"] == pytest.approx(ref["frechet_inception_distance"], rel=1e-4)
    assert res.metrics["r_is"] == pytest.approx(ref["inception_score_mean"], rel=1e-4)


def test_checkpoint_that_does_not_fit_the_config_is_one_clear_error(tmp_path) -> None:
    cfg_path, _ = _write_run(tmp_path, {"n_embed": 16}, name="a")
    _, other_ckpt = _write_run(tmp_path, {"n_embed": 16, "quantizer": "gumbel"}, name="b")
    with pytest.raises(ValueError, match="does not fit the model of this config"):
        E.load_model(cfg_path, other_ckpt)
    with pytest.raises(FileNotFoundError, match="no such file"):
        E.load_model(cfg_path, tmp_path / "missing.ckpt")
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("data: {}\n")
    with pytest.raises(ValueError, match="no `model:"):
        E.load_config(bad_cfg)


def test_missing_inception_weights_stop_the_run_before_evaluating(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    opts = E.EvalOptions(batch_size=2, lpips=False, progress=False, device="cpu", allow_download=False)
    with pytest.raises(M.MissingWeightsError, match="--inception-weights"):
        E.evaluate(TinyVQ(), ListDataset(_images(2)), opts)


def test_validate_record_rejects_bad_records(tmp_path) -> None:
    good = json.loads((ROOT / "tests" / "fixtures" / "eval" / "t3_rot_64.json").read_text())
    E.validate_record(good)
    for mutate, message in [
        (lambda r: r.update(schema="other"), "schema"),
        (lambda r: r.pop("checkpoint"), "lacks keys"),
        (lambda r: r["metrics"].pop("r_fid"), "metrics lack"),
        (lambda r: r["metrics"].update(r_fid="low"), "number or null"),
        (lambda r: r["metrics"].update(codebook_usage_whole_set=86.0), "fraction"),
        (lambda r: r["metrics"].update(used_codes_whole_set=1), "code_counts"),
        (lambda r: r["row"].update(table=5), "row.table"),
    ]:
        bad = json.loads(json.dumps(good))
        mutate(bad)
        with pytest.raises(ValueError, match=message):
            E.validate_record(bad)


def test_options_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        E.EvalOptions(batch_size=0)
    with pytest.raises(ValueError, match="limit"):
        E.EvalOptions(limit=0)


@requires_ldm
def test_upstream_latent_diffusion_vqmodel_checkpoint(tmp_path) -> None:
    """A plain latent-diffusion VQModel (upstream quantizer) loads and evaluates through the hook path."""
    cfg = {"model": {"target": "ldm.models.autoencoder.VQModel", "params": {
        "embed_dim": 3, "n_embed": 16,
        "ddconfig": {"double_z": False, "z_channels": 3, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
                     "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
        "lossconfig": {"target": "adapters.integrations.losses.VQLPIPSWithDiscriminator",
                       "params": {"disc_start": 0, "perceptual_weight": 0.0, "disc_num_layers": 1, "disc_ndf": 8}}}}}
    cfg_path = tmp_path / "ldm.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    loaded = E.load_model(cfg_path, None)
    ckpt = tmp_path / "ldm.ckpt"
    torch.save({"state_dict": loaded.model.state_dict()}, ckpt)
    opts = E.EvalOptions(batch_size=2, limit=3, fid=False, lpips=False, progress=False, device="cpu")
    rec = E.run_evaluation(cfg_path, ckpt, lambda m: E.build_dataset(m, "photos", limit=3), opts,
                           tmp_path / "r.json")
    assert rec["model"]["quantizer"].endswith("VectorQuantizer2") and rec["model"]["latent_shape"] == "8x8x3"
    m = rec["metrics"]
    assert m["quant_error"] is not None and m["valid_loss"] is not None and rec["data"]["num_images"] == 3
    # taming's loss with perceptual_weight 0: val/rec_loss is mean |x - xrec| (+ 0 * LPIPS)
    model = loaded.model.eval()
    ds, _ = E.build_dataset(loaded, "photos", limit=3)
    with torch.no_grad():
        x = torch.stack([torch.from_numpy(ds[i]["image"]) for i in range(3)]).permute(0, 3, 1, 2)
        xrec, _ = model(x)
    assert m["valid_loss"] == pytest.approx((x - xrec).abs().mean().item(), rel=1e-5)


@requires_ldm
def test_rotation_vqgan_tiny_config(tmp_path) -> None:
    """The project's tiny Table 3 config (RotationVQModel) evaluates with its own quantizer statistics."""
    cfg_path = ROOT / "configs" / "tiny_rot_vqgan.yaml"
    loaded = E.load_model(cfg_path, None)
    ckpt = tmp_path / "rot.ckpt"
    torch.save({"state_dict": loaded.model.state_dict()}, ckpt)
    opts = E.EvalOptions(batch_size=2, limit=2, fid=False, lpips=False, progress=False, device="cpu", examples=0)
    rec = E.run_evaluation(cfg_path, ckpt, lambda m: E.build_dataset(m, "photos"), opts)
    p = loaded.config.model.params
    side = p.ddconfig.resolution // 2 ** (len(p.ddconfig.ch_mult) - 1)
    assert rec["model"]["gradient"] == p.gradient and rec["row"]["approach"] == "rotation"
    assert rec["model"]["latent_shape"] == f"{side}x{side}x{p.embed_dim}" and rec["metrics"]["quant_error"] is not None
    assert rec["metrics"]["quant_error_per_dim"] == pytest.approx(rec["metrics"]["quant_error"] / p.embed_dim)


@requires_enhancing
def test_vitvqgan_tiny_config(tmp_path) -> None:
    """The project's tiny Table 4 config (RotationViTVQ, CHW batches in [0, 1]) evaluates end to end."""
    cfg_path = ROOT / "configs" / "tiny_rot_vitvqgan.yaml"
    loaded = E.load_model(cfg_path, None)
    assert loaded.family == "enhancing"
    ckpt = tmp_path / "vit.ckpt"
    torch.save({"state_dict": loaded.model.state_dict()}, ckpt)
    opts = E.EvalOptions(batch_size=2, limit=3, fid=False, lpips=False, progress=False, device="cpu", examples=0)
    rec = E.run_evaluation(cfg_path, ckpt, lambda m: E.build_dataset(m, "photos"), opts)
    assert rec["row"]["table"] == 4 and rec["data"]["layout"] == "chw"
    p = loaded.config.model.params
    side = p.image_size // p.patch_size
    assert rec["model"]["latent_shape"] == f"{side}x{side}x{p.quantizer.embed_dim}"
    m = rec["metrics"]
    assert m["valid_loss"] is not None and m["quant_error"] is not None and 0 < m["codebook_usage_whole_set"] <= 1


def test_evaluate_command_reports_bad_input_in_one_line(tmp_path) -> None:
    import subprocess
    import sys

    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--config", str(tmp_path / "no.yaml"),
                          "--checkpoint", "x.ckpt", "--out", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == f"evaluate.py: error: config {tmp_path / 'no.yaml'}: no such file"
    assert "Traceback" not in res.stderr


def test_shard_spreads_a_limit_and_gives_each_rank_a_contiguous_slice(monkeypatch) -> None:
    data = list(range(100))
    assert list(distributed.rank_shard(data, 5)) == [0, 25, 50, 74, 99]
    assert list(distributed.rank_shard(data, None)) == data
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 4)
    parts = []
    for rank in range(4):
        monkeypatch.setattr(distributed.dist, "get_rank", lambda rank=rank: rank)
        parts.append(list(distributed.rank_shard(data, None)))
    assert parts[1] == list(range(25, 50)) and sum(parts, []) == data
