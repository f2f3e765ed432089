"""Rotation-trick adapters over latent-diffusion and enhancing-transformers, grouped by concern:

- ``adapters.quantizer``: the shared quantizer (estimators, nearest-code search, k-means init, statistics);
- ``adapters.integrations``: how it gets into other codebases' models (latent-diffusion, enhancing, ``swap``);
- ``adapters.runtime``: what the patched upstream ``main.py`` files call around a run (preflight, run guard, ...);
- ``adapters.evaluation``: evaluating checkpoints as the paper's tables do, and the data runs read.

``adapters.swap_quantizers(model, gradient=...)`` swaps the quantizers of any VQ model. The export is lazy (PEP 562):
``import adapters.runtime.errors`` and the other light modules do not pull in torch and taming.

Every module used to sit flat in ``adapters/``. Saved run configs (``logs/<run>/configs/*.yaml``, read again by
``main.py -r`` and ``scripts/evaluate.py``) and committed evaluation records keep the ``target:`` paths they were
written with: :data:`LEGACY_MODULES` maps each old module to its new home (the one place they are listed),
:func:`canonical_target` / :func:`canonical_targets` map a target / a whole config across where configs are read.
No module is kept at an old path.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

__all__ = ["swap_quantizers", "LEGACY_MODULES", "canonical_target", "canonical_targets"]

# old module path of a config target -> (its new home, what still names the old path). Applied where configs are
# read: the patched latent-diffusion main.py (patch 0023: a run folder saved before the move, resumed with -r), the
# evaluation's target resolver (adapters.evaluation.model_loading), the preflight checks, scripts/seed_summary.py
# (records). Checkpoints name no adapters module (no hyper-parameters are saved, Lightning keys the RunGuard state
# by class name). The patches import the new paths; a tree patched with the older patch texts (which imported
# adapters.preflight, adapters.safe_load, ...) is exported again and re-patched: scripts/setup_submodules.sh says so.
LEGACY_MODULES: dict[str, tuple[str, str]] = {
    "adapters.ldm": ("adapters.integrations.ldm",
                     "saved configs and records: model target RotationVQModel, GumbelVQModel"),
    "adapters.vitvqgan": ("adapters.integrations.vitvqgan",
                          "saved configs and records: targets RotationViTVQ, VQLPIPSWithDiscriminator, "
                          "ImageNetTrain, ImageNetValidation"),
    "adapters.losses": ("adapters.integrations.losses",
                        "saved configs and records: lossconfig target VQLPIPSWithDiscriminator"),
    "adapters.data": ("adapters.evaluation.data",
                      "saved configs and records: data targets PhotoCrops, ImageNetTrain, ImageNetValidation"),
    "adapters.console": ("adapters.runtime.console", "saved tiny configs: callback target CpuThreads"),
    "adapters.run_guard": ("adapters.runtime.run_guard",
                           "saved lightning configs that name the callback target RunGuard"),
}


def canonical_target(target: str) -> str:
    """A dotted config target on an old module path (``adapters.ldm.RotationVQModel``) -> the same object's current
    path (``adapters.integrations.ldm.RotationVQModel``); any other target comes back unchanged."""
    module, _, name = target.rpartition(".")
    new = LEGACY_MODULES.get(module)
    return f"{new[0]}.{name}" if new is not None else target


def canonical_targets(config: Any) -> Any:
    """``config`` (a dict/list tree or an OmegaConf DictConfig/ListConfig) with every ``target:`` string mapped by
    :func:`canonical_target`, in place; returned for chaining. ``${...}`` interpolations are left unresolved."""
    if isinstance(config, Mapping):
        is_interpolation = _interpolation_test(config)
        for key in list(config.keys()):
            if is_interpolation(config, key):
                continue
            value = config[key]
            if key == "target" and isinstance(value, str):
                config[key] = canonical_target(value)
            else:
                canonical_targets(value)
    elif isinstance(config, Sequence) and not isinstance(config, (str, bytes)):
        is_interpolation = _interpolation_test(config)
        for i in range(len(config)):
            if not is_interpolation(config, i):
                canonical_targets(config[i])
    return config


def _interpolation_test(node: Any) -> Callable[[Any, Any], bool]:
    """``(node, key) -> bool``: whether ``node[key]`` is an OmegaConf ``${...}`` (never read: it may not resolve)."""
    if type(node).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.is_interpolation
    return lambda _node, _key: False


def __getattr__(name: str) -> Any:
    if name == "swap_quantizers":
        from adapters.integrations.swap import swap_quantizers

        return swap_quantizers
    raise AttributeError(f"module 'adapters' has no attribute {name!r}")
