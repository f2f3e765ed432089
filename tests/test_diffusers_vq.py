"""A tiny random diffusers ``VQModel`` (no downloads) swapped by ``adapters.swap_quantizers``, and the training script."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters import swap_quantizers
from adapters.integrations.swap import DiffusersRotationQuantizer
from conftest import ROOT

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is not installed (an optional extra): pip install -e '.[diffusers]' to run these")
SCRIPT = ROOT / "scripts" / "train_diffusers_vq.py"


def tiny_vqmodel() -> Any:
    """A random diffusers VQModel: 16 px in, 8 px latents of 4 channels, 32 codes of dim 4."""
    torch.manual_seed(0)
    model = diffusers.VQModel(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                              block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, latent_channels=4,
                              vq_embed_dim=4, num_vq_embeddings=32, sample_size=16)
    with torch.no_grad():  # codes at the encoder's scale: many used, so the estimators' gradients differ visibly
        model.quantize.embedding.weight.normal_(std=0.5)
    return model


def _step(model: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(reconstruction, commit loss, encoder conv_in weight gradient) of one forward/backward."""
    model.zero_grad()
    out = model(x)
    (out.sample.square().mean() + out.commit_loss).backward()
    return out.sample.detach(), out.commit_loss.detach(), model.encoder.conv_in.weight.grad.clone()


def test_ste_is_diffusers_bit_for_bit_and_rotation_changes_the_encoder_gradient() -> None:
    original = tiny_vqmodel()
    ste, rotated = copy.deepcopy(original), copy.deepcopy(original)
    keys = list(original.state_dict())
    assert swap_quantizers(ste, gradient="ste", search="blocked") == ["quantize"]
    assert swap_quantizers(rotated, gradient="rotation_released", search="blocked") == ["quantize"]
    for model in (ste, rotated):
        q = model.quantize
        assert type(q) is DiffusersRotationQuantizer and list(model.state_dict()) == keys
        assert (q.n_e, q.vq_embed_dim, q.e_dim, q.beta, q.legacy) == (32, 4, 4, 0.25, True)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    ref = _step(original, x)
    got = _step(ste, x)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-7)
    rot = _step(rotated, x)
    torch.testing.assert_close(rot[0], ref[0], rtol=1e-4, atol=1e-5)  # q up to the rotation's float rounding
    torch.testing.assert_close(rot[1], ref[1])
    assert not torch.allclose(rot[2], ref[2], rtol=1e-3, atol=1e-6)
    # diffusers' other entry points still work on the swapped quantizer
    latents = ste.encode(x).latents
    torch.testing.assert_close(ste.decode(latents).sample, got[0])
    _, _, (_, _, idx) = ste.quantize(latents)
    entry = ste.quantize.get_codebook_entry(idx, (2, 8, 8, 4))
    torch.testing.assert_close(entry, original.quantize.get_codebook_entry(idx, (2, 8, 8, 4)))


def test_save_pretrained_loads_back_with_plain_diffusers(tmp_path: Path) -> None:
    model = tiny_vqmodel()
    swap_quantizers(model, gradient="rotation_released", search="blocked")
    with torch.no_grad():
        model.quantize.embedding.weight.add_(0.1)  # trained weights must be what is saved
    model.save_pretrained(tmp_path / "model")
    loaded = diffusers.VQModel.from_pretrained(tmp_path / "model")
    assert type(loaded.quantize).__module__ == "diffusers.models.autoencoders.vae"
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x).sample, model.eval()(x).sample)
    # a process that never imports the project loads it as well
    code = ("import sys, diffusers; m = diffusers.VQModel.from_pretrained(sys.argv[1]); "
            "assert not any(n == 'adapters' or n.startswith('adapters.') for n in sys.modules); print(m.config.num_vq_embeddings)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model")], capture_output=True, text=True,
                       cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "32", r.stderr[-2000:]


def test_training_script_trains_logs_saves_images_and_a_loadable_model(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--config", "tiny", "--steps", "4",
                        "--batch-size", "2", "--size", "16", "--log-every", "2", "--image-every", "4",
                        "--val-images", "2", "--search", "blocked"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "quantize -> DiffusersRotationQuantizer (gradient rotation_released" in r.stdout
    assert "Traceback" not in r.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4]
    for row in rows:
        assert {"train/loss", "train/codebook_usage", "train/perplexity", "train/quant_error",
                "train/dead_codes"} <= set(row)
    assert "val/psnr" in rows[-1] and "val/codebook_usage" in rows[-1]
    assert (out / "images" / "recon_000004.png").is_file()
    assert f"model: {out / 'model'}" in r.stdout and "step 2: loss " in r.stdout
    loaded = diffusers.VQModel.from_pretrained(out / "model")
    assert loaded.config.num_vq_embeddings == 32


def test_training_script_refuses_a_missing_config_in_one_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--config", "nope.json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "train_diffusers_vq.py: --config 'nope.json' is neither small nor tiny nor a config.json file"
