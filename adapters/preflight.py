"""Checks a training run's merged config before anything heavy is built, reporting every problem at once.

latent-diffusion's ``main.py`` (patch 0018) calls :func:`exit_on_problems` right after merging the configs and the
command line. Without it, a run on a machine lacking a GPU, the data or the LPIPS weights built the model first and
then stopped at the first of these problems, often in a long traceback; here each is one line saying what to do.

Checked (cheaply: no model, no dataset scan, no download):

* GPUs asked for (``--gpus`` / ``lightning.trainer.gpus``) but torch sees none, or fewer than asked;
* a local-ImageNet dataset (``adapters.data.ImageNetFolder`` subclasses) whose root or split folder is missing;
* taming's LPIPS weights absent while ``perceptual_weight > 0`` and their host unreachable (or
  ``ROTATION_TRICK_OFFLINE=1``): the full configs would otherwise build the model before the download fails.
"""
from __future__ import annotations

import importlib
import os
import socket
import sys
from typing import Any, Mapping, Optional
from urllib.parse import urlparse

import torch

PERCEPTUAL_OVERRIDE = "model.params.lossconfig.params.perceptual_weight=0"
# loss classes that build taming's LPIPS when perceptual_weight > 0 (taming's default weight is 1.0)
LPIPS_LOSSES = ("adapters.losses.VQLPIPSWithDiscriminator", "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                "taming.modules.losses.VQLPIPSWithDiscriminator")


def _requested_gpus(gpus: Any) -> Optional[list[int] | int]:
    """Lightning 1.x ``gpus``: ``"0,"``/``"0,1"`` list ids, ``2`` counts devices; None/""/0 = CPU."""
    text = str(gpus).strip() if gpus is not None else ""
    if text in ("", "0", "None"):
        return None
    if "," in text:
        return [int(g) for g in text.split(",") if g.strip()]
    return int(text)


def gpu_problems(trainer_config: Mapping[str, Any]) -> list[str]:
    """One line when GPUs are asked for that torch cannot use."""
    try:
        wanted = _requested_gpus(trainer_config.get("gpus"))
    except ValueError:
        return [f"--gpus {trainer_config.get('gpus')!r} is not a GPU list (`0,` or `0,1`) or a count (`2`): fix it"]
    if wanted is None:
        return []
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    flag = f"--gpus {trainer_config.get('gpus')}"
    if have == 0:
        return [f"{flag} asks for a GPU but torch sees none (torch.cuda.is_available() is False): "
                "drop --gpus to train on the CPU, or run on a machine with a CUDA GPU"]
    ids = wanted if isinstance(wanted, list) else list(range(wanted))
    bad = [i for i in ids if i >= have]
    if bad:
        return [f"{flag} asks for GPU(s) {bad} but torch sees {have} (ids 0..{have - 1}): "
                "ask for fewer, or check CUDA_VISIBLE_DEVICES"]
    return []


def _dataset_configs(data_config: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    params = data_config.get("params") or {}
    return {split: params[split] for split in ("train", "validation", "test")
            if isinstance(params.get(split), Mapping) and "target" in params[split]}


def _import(target: str) -> Any:
    module, _, name = str(target).rpartition(".")
    return getattr(importlib.import_module(module), name)


def _imagenet_split(cls: type, params: Mapping[str, Any]) -> str:
    from adapters.data import ImageNetTrain, ImageNetValidation

    if issubclass(cls, ImageNetTrain):
        return "train"
    if issubclass(cls, ImageNetValidation):
        return "val"
    return {"validation": "val"}.get(str(params.get("split", "train")), str(params.get("split", "train")))


def data_problems(data_config: Mapping[str, Any]) -> list[str]:
    """One line per missing local-ImageNet root or split folder (``adapters.data``'s message; nothing is scanned)."""
    from adapters.data import DataError, ImageNetFolder, resolve_imagenet_root

    problems: list[str] = []
    for cfg in _dataset_configs(data_config).values():
        try:
            cls = _import(cfg["target"])
        except (ImportError, AttributeError, ValueError):
            continue  # instantiate_from_config reports it with its own message
        if not (isinstance(cls, type) and issubclass(cls, ImageNetFolder)):
            continue
        params = cfg.get("params") or {}
        try:
            folder = resolve_imagenet_root(params.get("root")) / _imagenet_split(cls, params)
        except DataError as err:
            line = str(err)
        else:
            if folder.is_dir():
                continue
            line = (f"{str(folder)!r} does not exist: an ImageNet root must hold {folder.name}/<wnid>/*.JPEG "
                    "(point root: or $IMAGENET_ROOT at the folder holding train/ and val/)")
        if line not in problems:  # train and validation usually share one root: say it once
            problems.append(line)
    return problems


def _can_download(url: str, timeout: float = 3.0) -> bool:
    """Whether the host of ``url`` accepts a connection (False at once under ``ROTATION_TRICK_OFFLINE=1``)."""
    from adapters.losses import OFFLINE_ENV

    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        return False
    host = urlparse(url).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def lpips_problems(model_config: Mapping[str, Any]) -> list[str]:
    """One line when the loss would build taming's LPIPS, its weight files are not on disk and their host cannot be
    reached (or ``ROTATION_TRICK_OFFLINE=1``)."""
    loss = (model_config.get("params") or {}).get("lossconfig") or {}
    if str(loss.get("target", "")) not in LPIPS_LOSSES:
        return []
    weight = float((loss.get("params") or {}).get("perceptual_weight", 1.0))
    if weight == 0:
        return []
    from adapters.losses import LPIPS_FILE, LPIPS_URL, VGG16_FILE, VGG16_URL, lpips_weight_paths

    urls = {VGG16_FILE: VGG16_URL, LPIPS_FILE: LPIPS_URL}
    missing = [f"{path} (from {urls[name]})" for name, path in lpips_weight_paths().items() if not path.is_file()]
    if not missing or _can_download(VGG16_URL):
        return []  # present, or taming downloads them when the loss is built
    return [f"perceptual_weight {weight:g} needs the LPIPS weights, missing: {'; '.join(missing)}: put them there, "
            f"or add {PERCEPTUAL_OVERRIDE} to train without LPIPS"]


def problems(config: Mapping[str, Any], trainer_config: Mapping[str, Any]) -> list[str]:
    """Every problem found in a merged latent-diffusion config (``model``, ``data``) and its trainer options."""
    found = gpu_problems(trainer_config)
    if "data" in config:
        found += data_problems(config["data"])
    if "model" in config:
        found += lpips_problems(config["model"])
    return found


def exit_on_problems(config: Mapping[str, Any], trainer_config: Mapping[str, Any], prog: str = "main.py") -> None:
    """Print each problem as ``<prog>: <problem>`` on stderr and exit 1; return when there is none."""
    found = problems(config, trainer_config)
    for line in found:
        print(f"{prog}: {line}", file=sys.stderr)
    if found:
        print(f"{prog}: {len(found)} problem(s) above; nothing was built", file=sys.stderr)
        sys.exit(1)


__all__ = ["PERCEPTUAL_OVERRIDE", "data_problems", "exit_on_problems", "gpu_problems", "lpips_problems", "problems"]
