"""Rotation-trick adapters over latent-diffusion and enhancing-transformers, grouped by concern:

- ``adapters.quantizer``: the shared quantizer (estimators, nearest-code search, k-means init, statistics);
- ``adapters.integrations``: how it gets into other codebases' models (latent-diffusion, enhancing, ``swap``);
- ``adapters.runtime``: what the patched upstream ``main.py`` files call around a run (preflight, run guard, ...);
- ``adapters.evaluation``: evaluating checkpoints as the paper's tables do, and the data runs read.

``adapters.swap_quantizers(model, gradient=...)`` swaps the quantizers of any VQ model. The export is lazy (PEP 562):
``import adapters.runtime.errors`` and the other light modules do not pull in torch and taming.

Every module used to sit flat in ``adapters/``. An old path is kept, as a module that re-exports its new home, only
where something this code cannot change still names it: :data:`LEGACY_MODULES` lists each one with why (the one
place they are listed); :func:`canonical_target` maps a config ``target:`` across. The project's own code, configs
and docs use the new paths.
"""
from __future__ import annotations

from typing import Any

__all__ = ["swap_quantizers", "LEGACY_MODULES", "canonical_target"]

# old module path -> (its new home, what still names the old path). A saved run config (logs/<run>/configs/*.yaml,
# read again by `-r` and by scripts/evaluate.py) and the `config` section of an evaluation record keep the targets
# they were written with; patched upstream trees keep the imports the patches put there (patches/*/*.patch are never
# edited: changed patch text would no longer apply over a tree patched before). Checkpoints name no adapters module
# (no hyper-parameters are saved, Lightning keys the RunGuard state by class name), so none is kept for them.
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
    "adapters.console": ("adapters.runtime.console",
                         "latent-diffusion patch 0021 and enhancing patch 11 import quiet_lightning and "
                         "print_run_summary; saved tiny configs name the callback CpuThreads"),
    "adapters.preflight": ("adapters.runtime.preflight",
                           "latent-diffusion patch 0018 imports exit_on_problems; enhancing patch 11 "
                           "exit_on_enhancing_problems and exit_on_missing_config"),
    "adapters.run_guard": ("adapters.runtime.run_guard",
                           "latent-diffusion patch 0011 adds the callback target adapters.run_guard.RunGuard; "
                           "enhancing patch 09 imports RunGuard"),
    "adapters.safe_load": ("adapters.runtime.safe_load",
                           "latent-diffusion patch 0010 imports load_checkpoint"),
}


def canonical_target(target: str) -> str:
    """A dotted config target on an old module path (``adapters.ldm.RotationVQModel``) -> the same object's current
    path (``adapters.integrations.ldm.RotationVQModel``); any other target comes back unchanged."""
    module, _, name = target.rpartition(".")
    new = LEGACY_MODULES.get(module)
    return f"{new[0]}.{name}" if new is not None else target


def __getattr__(name: str) -> Any:
    if name == "swap_quantizers":
        from adapters.integrations.swap import swap_quantizers

        return swap_quantizers
    raise AttributeError(f"module 'adapters' has no attribute {name!r}")
