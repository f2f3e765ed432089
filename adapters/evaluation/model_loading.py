"""Config + checkpoint -> model, for evaluation: one clear error when they do not belong together.

The config's ``model: {target, params}`` names a latent-diffusion, taming or enhancing-transformers class (ours or
upstream's); the checkpoint's ``state_dict`` is loaded into it through ``adapters.runtime.safe_load`` (no code from the
file runs unless the caller trusts it). A checkpoint of the other codebase, or of another shape, is refused before
``load_state_dict`` with one line naming both files, what differs and which config to use (``CheckpointMismatchError``).
"""
from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor, nn

from adapters import canonical_target, canonical_targets
from adapters.runtime.errors import CheckpointMismatchError, UpstreamMissingError, UserError
from adapters.integrations.released import is_released_config, translate_released_model_config
from adapters.runtime.safe_load import load_checkpoint
from adapters.integrations.upstream import UPSTREAM_TREES, upstream_imports

# Which config to evaluate a run with, per codebase (where each upstream main.py keeps a run's config).
TRAINING_CONFIG_HINT = ("the config the run was trained with (latent-diffusion runs: "
                        "logs/<run>/configs/*-project.yaml; enhancing-transformers runs: the configs/<name>.yaml "
                        "given to main.py -c)")
FAMILY_NAMES = {"taming": "a latent-diffusion/taming VQGAN", "enhancing": "an enhancing-transformers ViT-VQGAN"}


def get_obj_from_str(target: str) -> Any:
    """'package.module.Name' -> the object; one clear error when the package is not importable. A saved config's
    old module path (``adapters.ldm.RotationVQModel``) resolves to its current one (:func:`adapters.canonical_target`)."""
    module, _, name = canonical_target(target).rpartition(".")
    if not module:
        raise ValueError(f"target {target!r} must be a dotted path 'package.module.Name'")
    top = module.partition(".")[0]
    try:
        if top in UPSTREAM_TREES:
            with upstream_imports(top):
                mod = importlib.import_module(module)
        else:
            mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if isinstance(exc, UpstreamMissingError):  # already says which tree and what to do
            raise
        raise ModuleNotFoundError(f"cannot import {module!r} for target {target!r}: {exc}") from exc
    if not hasattr(mod, name):
        raise ValueError(f"target {target!r}: module {module!r} has no attribute {name!r}")
    return getattr(mod, name)


def instantiate(cfg: Mapping[str, Any]) -> Any:
    """Build ``target(**params)`` as both upstreams do (params stay DictConfigs: enhancing reads ``encoder.dim``)."""
    if "target" not in cfg:
        raise ValueError("expected a config node with a `target:` key (and optional `params:`)")
    params = cfg.get("params", None)
    return get_obj_from_str(str(cfg["target"]))(**(params if params is not None else {}))


# What a config node that does not fit its class raises while the object is built: a missing or misspelt key
# reaches the constructor as a missing argument (TypeError) or a failed lookup (KeyError, upstream's
# instantiate_from_config, OmegaConf's own errors, unresolvable ${...}).
CONFIG_ERRORS: tuple[type[BaseException], ...] = (TypeError, KeyError, OmegaConfBaseException)


def _first_line(err: BaseException) -> str:
    """An exception's message on one line (a KeyError's without the quotes str() adds)."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return (text.strip().splitlines() or [""])[0][:200]


def config_error(where: str, err: BaseException, config_name: Optional[str] = None) -> UserError:
    """One line for a config node ``where`` (e.g. ``model``) that could not be resolved or built: what failed, and
    what to check."""
    name = f"config {config_name}" if config_name else "the config"
    return UserError(f"{name}: {where} cannot be built ({type(err).__name__}: {_first_line(err)}); a key is "
                     f"missing or misspelt: check {where} against {TRAINING_CONFIG_HINT}")


def build_from_config(cfg: Mapping[str, Any], where: str, config_name: Optional[str] = None) -> Any:
    """:func:`instantiate` for a node of a user's config: what a missing key raises while the object is built
    becomes one ``UserError`` naming the node (``where``) and the config."""
    try:
        return instantiate(cfg)
    except UserError:
        raise  # already one line saying what to do (an upstream tree missing, an untrusted checkpoint, ...)
    except CONFIG_ERRORS as err:
        raise config_error(where, err, config_name) from err


def _load_with_base(path: Path, _seen: tuple[Path, ...] = ()) -> DictConfig:
    """One YAML config; a ``base_config: <path>.yaml`` key (enhancing-transformers' inheritance) is merged under it.
    The base path is read as enhancing's main.py reads it, from the working directory, else beside the config's
    folder (``configs/x.yaml`` names ``configs/base.yaml``), so evaluation works from any directory."""
    cfg = OmegaConf.load(path)
    base = cfg.get("base_config", None) if isinstance(cfg, DictConfig) else None
    if base is None:
        return cfg  # type: ignore[return-value]
    candidates = [Path(str(base)), path.resolve().parent.parent / str(base), path.resolve().parent / Path(str(base)).name]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None or found.resolve() in _seen:
        raise ValueError(f"config {path}: base_config {base!r} " + ("is circular" if found is not None else
                         "not found (it is read from the working directory: run from the project's root)"))
    rest = OmegaConf.create({k: v for k, v in cfg.items() if k != "base_config"})
    return OmegaConf.merge(_load_with_base(found, _seen + (path.resolve(),)), rest)  # type: ignore[return-value]


def load_config(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> DictConfig:
    """Load and merge one or more YAML configs (later ones override, like upstream main.py's --base)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    configs = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"config {p}: no such file")
        configs.append(_load_with_base(Path(p)))
    cfg = OmegaConf.merge(*configs)
    if "model" not in cfg or "target" not in cfg.model:
        raise ValueError(f"config {list(map(str, paths))} has no `model: {{target: ..., params: ...}}` section; "
                         f"give a latent-diffusion or enhancing-transformers model config")
    return cfg  # type: ignore[return-value]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def model_family(model: nn.Module) -> str:
    """'taming' (latent-diffusion / taming VQModel) or 'enhancing' (enhancing-transformers ViTVQ)."""
    if hasattr(model, "quantizer") and hasattr(model, "pre_quant"):
        return "enhancing"
    if hasattr(model, "quantize") and hasattr(model, "quant_conv"):
        return "taming"
    raise ValueError(f"{type(model).__name__} is neither a latent-diffusion/taming VQModel (quantize, quant_conv) nor "
                     f"an enhancing-transformers ViTVQ (quantizer, pre_quant): cannot evaluate it")


def state_dict_family(sd: Mapping[str, Any]) -> Optional[str]:
    """The codebase a state dict comes from, by its keys ('taming', 'enhancing'), or None when neither shows."""
    if any(k.startswith(("quantizer.", "pre_quant.")) for k in sd):
        return "enhancing"
    if any(k.startswith(("quantize.", "quant_conv.")) for k in sd):
        return "taming"
    return None


def get_quantizer(model: nn.Module) -> nn.Module:
    return model.quantizer if model_family(model) == "enhancing" else model.quantize


def check_fits(model: nn.Module, sd: Mapping[str, Tensor], checkpoint: str, config: str) -> None:
    """Raise ``CheckpointMismatchError`` (one line) unless every model key (``loss.*`` may be absent) is in ``sd``
    with the model's shape."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.startswith("loss.")]
    shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if not missing and not shapes:
        return
    found, built = state_dict_family(sd), model_family(model)
    what = [f"the checkpoint holds {FAMILY_NAMES[found]} but the config builds {FAMILY_NAMES[built]} "
            f"({type(model).__module__}.{type(model).__name__})"] if found and found != built else []
    if shapes:
        what.append(f"{len(shapes)} shapes differ, e.g. " + ", ".join(
            f"{k}: checkpoint {list(sd[k].shape)} vs model {list(own[k].shape)}" for k in shapes[:3]))
    if missing:
        what.append(f"{len(missing)} model keys missing, e.g. {', '.join(missing[:3])}")
    raise CheckpointMismatchError(f"checkpoint {checkpoint} does not fit the model of this config ({config}): "
                                  f"{'; '.join(what)}. Evaluate it with {TRAINING_CONFIG_HINT}")


@dataclass
class LoadedModel:
    model: nn.Module
    config: DictConfig
    family: str
    checkpoint: dict[str, Any]


def load_model(config: DictConfig | str | os.PathLike, checkpoint: Optional[str | os.PathLike],
               device: str | torch.device = "cpu", hash_checkpoint: bool = True, trust_checkpoint: bool = False,
               config_name: Optional[str] = None) -> LoadedModel:
    """Instantiate ``config.model`` and load a Lightning checkpoint's ``state_dict`` into it.

    Keys under ``loss.`` may be absent (valid loss then uses a freshly built loss module: its LPIPS comes from
    pretrained weights, its discriminator does not enter ``rec_loss``); any other missing key or differing shape is
    a ``CheckpointMismatchError``. The checkpoint loads with ``weights_only=True`` plus ``adapters.runtime.safe_load``'s
    allowlist; ``trust_checkpoint`` (evaluate.py ``--trust-checkpoint``) lets a file needing more load unsafely.
    ``config_name`` names the config in messages when ``config`` is not a path.
    """
    if isinstance(config, (str, os.PathLike)):
        config_name = config_name or str(config)
        cfg = load_config(config)
    else:
        cfg = config
    try:  # targets the model builds itself (lossconfig) on their current module paths, as get_obj_from_str's
        raw = canonical_targets(OmegaConf.to_container(cfg.model, resolve=True))
    except OmegaConfBaseException as err:  # an unresolvable ${...}
        raise config_error("model", err, config_name) from err
    if is_released_config(raw):
        raw = translate_released_model_config(raw)
        print(f"config: the authors' released Table 3 form, evaluated as {raw['target']} with "
              f"gradient: {raw['params']['gradient']}")
    model_cfg = OmegaConf.create(raw)
    params = model_cfg.get("params", None)
    if params is not None:
        # Both upstreams would load a checkpoint in __init__ from these keys; we load explicitly below.
        for key in ("ckpt_path", "path"):
            if key in params:
                params.pop(key)
    model = build_from_config(model_cfg, "model", config_name)
    family = model_family(model)
    info: dict[str, Any] = {"path": None, "sha256": None, "global_step": None, "epoch": None,
                            "missing_keys": [], "unexpected_keys": []}
    if checkpoint is not None:
        ckpt_path = Path(checkpoint)
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"checkpoint {ckpt_path}: no such file")
        blob = load_checkpoint(ckpt_path, trust=trust_checkpoint,
                               opt_in="pass --trust-checkpoint (trust_checkpoint=True in Python)")
        sd = blob.get("state_dict", blob) if isinstance(blob, dict) else None
        if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
            raise ValueError(f"checkpoint {ckpt_path} holds no state dict (expected a Lightning .ckpt with "
                             f"'state_dict', or a plain state dict)")
        check_fits(model, sd, str(ckpt_path), config_name or "the config given")
        missing, unexpected = model.load_state_dict(sd, strict=False)
        info.update(path=str(ckpt_path.resolve()), sha256=sha256_file(ckpt_path) if hash_checkpoint else None,
                    global_step=blob.get("global_step") if isinstance(blob, dict) else None,
                    epoch=blob.get("epoch") if isinstance(blob, dict) else None,
                    missing_keys=list(missing), unexpected_keys=list(unexpected))
    model.to(device).eval()
    return LoadedModel(model=model, config=cfg, family=family, checkpoint=info)
