"""The authors' released Table 3 configs (cfifty/rotation_trick, ``exp_weights_and_configs/table_3``) on our classes.

Those configs target latent-diffusion's ``ldm.models.autoencoder.VQModel`` with extra flags that only the authors'
modified copy of that class understands (``rot_trick``, ``ref_trick``, ``no_grad_scale``), and taming's loss, which
rejects the ``predicted_indices`` latent-diffusion passes. Their checkpoints have upstream ``VQModel``'s keys, so the
same model is ``adapters.integrations.ldm.RotationVQModel`` with the matching ``gradient``. (The released Table 4
config targets plain enhancing ``ViTVQ`` and needs no translation: the rotation changes gradients, not forward values.)
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

# The released class checks the flags in this order (if rot_trick / elif ref_trick / elif no_grad_scale).
RELEASED_FLAGS: dict[str, str] = {"rot_trick": "rotation_released", "ref_trick": "reflection",
                                  "no_grad_scale": "rotation_unscaled"}
UPSTREAM_VQMODEL = "ldm.models.autoencoder.VQModel"
TAMING_LOSS = "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"


def is_released_config(model: Mapping[str, Any]) -> bool:
    """True for a ``model:`` node in the authors' released Table 3 form."""
    params = model.get("params") or {}
    return model.get("target") == UPSTREAM_VQMODEL and any(flag in params for flag in RELEASED_FLAGS)


def translate_released_model_config(model: Mapping[str, Any]) -> dict[str, Any]:
    """A ``model:`` node (plain dict) -> the same model on this project's classes; other configs come back as copies.

    ``rot_trick: true`` becomes ``gradient: rotation_released`` (``ref_trick`` -> ``reflection``, ``no_grad_scale``
    -> ``rotation_unscaled``, none set -> ``ste``), the target ``adapters.integrations.ldm.RotationVQModel``, and
    taming's loss ``adapters.integrations.losses.VQLPIPSWithDiscriminator`` (taming's loss, accepting latent-diffusion's
    arguments).
    """
    out = copy.deepcopy(dict(model))
    if not is_released_config(out):
        return out
    params = dict(out.get("params") or {})
    gradient = "ste"
    for flag, name in RELEASED_FLAGS.items():
        if params.pop(flag, False) and gradient == "ste":
            gradient = name
    params["gradient"] = gradient
    loss = dict(params.get("lossconfig") or {})
    if loss.get("target") == TAMING_LOSS:
        loss["target"] = "adapters.integrations.losses.VQLPIPSWithDiscriminator"
        params["lossconfig"] = loss
    out["target"] = "adapters.integrations.ldm.RotationVQModel"
    out["params"] = params
    return out
