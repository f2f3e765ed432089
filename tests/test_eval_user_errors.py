"""Issue 16, item 10: what a user gets wrong in an evaluation is one line saying what to do, never a traceback.

- ``--device cuda`` where torch sees no GPU (and ``--device cuda:7`` on a one-GPU machine, ``--device gpu``);
- a config whose ``model`` (or ``data.params.validation``) lacks a key: the constructor's KeyError / TypeError, an
  unresolvable ``${...}``;
- a loss module that logs no ``val/rec_loss`` (it raised a KeyError).

Each is an ``adapters.runtime.errors.UserError`` (``one_line``), which ``scripts/evaluate.py`` prints as
``evaluate.py: error: ...`` with exit status 2.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from adapters import evaluation as E
from adapters.runtime.errors import UserError
from conftest import ROOT

EVALUATE = ROOT / "scripts" / "evaluate.py"


# --------------------------------------------------------------------------------------------------------------
# Models whose configs can lack a key (importable as test_eval_user_errors.<Name>)
# --------------------------------------------------------------------------------------------------------------
def _tiny_vq(**kwargs: Any) -> nn.Module:
    from test_eval_pipeline import TinyVQ

    return TinyVQ(**kwargs)


def needs_ddconfig(ddconfig: dict, n_embed: int = 16) -> nn.Module:
    """Reads ``ddconfig["resolution"]`` as latent-diffusion's Encoder does: a missing key is a KeyError."""
    _ = ddconfig["resolution"]
    return _tiny_vq(n_embed=n_embed)


class OtherLogLoss(nn.Module):
    """A loss module with taming's signature that logs no val/rec_loss."""

    def forward(self, qloss, x, xrec, optimizer_idx, global_step, last_layer=None, cond=None, split="train"):
        rec = (x - xrec).abs().mean()
        return rec + qloss, {f"{split}/total_loss": rec.detach(), f"{split}/quant_loss": qloss.detach()}


def tiny_without_rec_loss(n_embed: int = 16) -> nn.Module:
    model = _tiny_vq(n_embed=n_embed)
    model.loss = OtherLogLoss()
    return model


def _config(tmp_path: Path, model: dict, **extra: Any) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"model": model, **extra}))
    return path


def _evaluate(args: list[str], tmp_path: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), **(env or {})}
    return subprocess.run([sys.executable, str(EVALUATE), *args, "--offline-photos", "--limit", "2", "--size", "16",
                           "--batch-size", "2", "--num-workers", "0", "--no-fid", "--no-lpips", "--offline",
                           "--no-progress", "--examples", "0", "--out", str(tmp_path / "r.json")],
                          env=env, capture_output=True, text=True, timeout=300)


def _one_line_error(res: subprocess.CompletedProcess) -> str:
    """The script's error line, after checking it is the whole story (status 2, no traceback)."""
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("evaluate.py: error: ")
    return line


def assert_one_line(err: BaseException) -> str:
    assert isinstance(err, UserError) and err.one_line and "\n" not in str(err)
    return str(err)


# --------------------------------------------------------------------------------------------------------------
# --device
# --------------------------------------------------------------------------------------------------------------
def test_cuda_where_torch_sees_no_gpu_says_use_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError) as info:
        E.resolve_device("cuda")
    message = assert_one_line(info.value)
    assert message.startswith("--device cuda: CUDA is not available on this machine (")
    assert "use --device cpu" in message
    assert E.resolve_device("auto") == torch.device("cpu") and E.resolve_device("cpu") == torch.device("cpu")


def test_a_gpu_the_machine_lacks_and_a_device_torch_does_not_know(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError) as info:
        E.resolve_device("cuda:7")
    assert assert_one_line(info.value) == ("--device cuda:7: this machine has 1 CUDA device(s), cuda:0 to cuda:0; "
                                           "pick one of those")
    assert E.resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(UserError) as info:
        E.resolve_device("gpu")
    assert assert_one_line(info.value).startswith("--device gpu: not a device name; use auto")


def test_evaluate_with_cuda_on_a_machine_without_one_is_one_line(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"target": "test_eval_pipeline.TinyVQ", "params": {"n_embed": 16}})
    # No GPU visible to torch, whatever the machine has.
    res = _evaluate(["--config", str(cfg), "--checkpoint", "none.ckpt", "--device", "cuda"], tmp_path,
                    env={"CUDA_VISIBLE_DEVICES": ""})
    line = _one_line_error(res)
    assert line.startswith("evaluate.py: error: --device cuda: CUDA is not available on this machine")
    assert "use --device cpu" in line and not (tmp_path / "r.json").exists()


# --------------------------------------------------------------------------------------------------------------
# A config missing a key
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params, raised", [
    ({"ddconfig": {"ch": 8}}, "ConfigKeyError: Missing key resolution"),                # looked up, absent
    ({"n_embed": 16}, "TypeError: "),                                                   # a required argument absent
    ({"ddconfig": {"resolution": "${model.params.size}"}}, "InterpolationKeyError: "),  # ${...} to an absent key
])
def test_a_model_config_missing_a_key_is_one_line(tmp_path: Path, params: dict, raised: str) -> None:
    cfg = _config(tmp_path, {"target": "test_eval_user_errors.needs_ddconfig", "params": params})
    with pytest.raises(UserError) as info:
        E.load_model(cfg, None)
    message = assert_one_line(info.value)
    assert message.startswith(f"config {cfg}: model cannot be built ({raised}")
    assert "a key is missing or misspelt: check model against the config the run was trained with" in message


def test_evaluate_with_a_config_missing_a_key_is_one_line(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"target": "test_eval_user_errors.needs_ddconfig", "params": {"ddconfig": {}}})
    line = _one_line_error(_evaluate(["--config", str(cfg), "--checkpoint", "none.ckpt", "--device", "cpu"],
                                     tmp_path))
    assert line.startswith(f"evaluate.py: error: config {cfg}: model cannot be built (ConfigKeyError: Missing key "
                           f"resolution); a key is missing or misspelt: check model against")


def test_a_validation_dataset_config_missing_a_key_is_one_line(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"target": "test_eval_pipeline.TinyVQ", "params": {"n_embed": 16}},
                  data={"params": {"validation": {"target": "adapters.evaluation.data.PhotoCrops",
                                                  "params": {"sizes": 16}}}})
    loaded = E.load_model(cfg, None)
    with pytest.raises(UserError) as info:
        E.build_dataset(loaded, "config")
    assert assert_one_line(info.value).startswith("the config: data.params.validation cannot be built (TypeError: ")


def test_a_loss_module_without_val_rec_loss_is_one_line(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"target": "test_eval_user_errors.tiny_without_rec_loss", "params": {"n_embed": 16}})
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": tiny_without_rec_loss().state_dict()}, ckpt)
    line = _one_line_error(_evaluate(["--config", str(cfg), "--checkpoint", str(ckpt), "--device", "cpu"], tmp_path))
    assert line == ("evaluate.py: error: the loss module OtherLogLoss logs no val/rec_loss (it logs val/quant_loss, "
                    "val/total_loss): pass --no-valid-loss (valid_loss=False) for this model")
    assert not (tmp_path / "r.json").exists()
