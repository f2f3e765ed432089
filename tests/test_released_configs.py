"""The authors' released Table 3 config form maps onto RotationVQModel with the matching gradient."""
from __future__ import annotations

import pytest
import torch

from adapters.integrations.released import is_released_config, translate_released_model_config
from conftest import requires_ldm


def released_model(flags: dict, ch: int = 128, resolution: int = 256) -> dict:
    """A ``model:`` node in the shape of the authors' exp_weights_and_configs/table_3/64_64_3/config.yaml."""
    return {
        "base_learning_rate": 4.5e-6,
        "target": "ldm.models.autoencoder.VQModel",
        "params": {
            **flags, "embed_dim": 3, "n_embed": 8192, "monitor": "val/rec_loss",
            "ddconfig": {"double_z": False, "z_channels": 3, "resolution": resolution, "in_channels": 3,
                         "out_ch": 3, "ch": ch, "ch_mult": [1, 2, 4], "num_res_blocks": 2,
                         "attn_resolutions": [], "dropout": 0.0},
            "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                           "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 0,
                                      "disc_weight": 0.75, "codebook_weight": 1.0}},
        },
    }


@pytest.mark.parametrize("flags, gradient", [
    ({"rot_trick": True}, "rotation_released"),
    ({"rot_trick": False, "ref_trick": True}, "reflection"),
    ({"no_grad_scale": True}, "rotation_unscaled"),
    ({"rot_trick": True, "ref_trick": True}, "rotation_released"),  # the released class checks rot_trick first
    ({"rot_trick": False}, "ste"),
])
def test_flags_map_to_gradients(flags: dict, gradient: str) -> None:
    src = released_model(flags)
    assert is_released_config(src)
    out = translate_released_model_config(src)
    assert out["target"] == "adapters.integrations.ldm.RotationVQModel"
    assert out["params"]["gradient"] == gradient
    assert not set(out["params"]) & {"rot_trick", "ref_trick", "no_grad_scale"}
    assert out["params"]["lossconfig"]["target"] == "adapters.integrations.losses.VQLPIPSWithDiscriminator"
    assert out["params"]["ddconfig"] == src["params"]["ddconfig"]
    assert src["params"].get("gradient") is None, "the input is not modified"


def test_other_configs_pass_through() -> None:
    ours = {"target": "adapters.integrations.ldm.RotationVQModel", "params": {"gradient": "rotation"}}
    assert not is_released_config(ours)
    assert translate_released_model_config(ours) == ours
    plain = released_model({})
    assert not is_released_config(plain) and translate_released_model_config(plain) == plain


@requires_ldm
def test_released_config_loads_an_upstream_vqmodel_state_dict_strictly() -> None:
    from ldm.models.autoencoder import VQModel
    from ldm.util import instantiate_from_config

    small = released_model({"rot_trick": True}, ch=32, resolution=32)
    small["params"]["lossconfig"]["params"]["perceptual_weight"] = 0.0
    ours = instantiate_from_config(translate_released_model_config(small))
    assert ours.quantize.gradient == "rotation_released"
    up_params = {k: v for k, v in small["params"].items() if k not in ("rot_trick", "lossconfig")}
    upstream = VQModel(**up_params, lossconfig={"target": "torch.nn.Identity"})
    sd = {k: v for k, v in upstream.state_dict().items() if not k.startswith("loss.")}
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("loss.") for k in missing)
    # blocked is upstream's search expression bit for bit; the fused one may take the other code of a near-tie
    ours.quantize.search = "blocked"
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(ours(x)[0], upstream(x)[0], rtol=1e-5, atol=1e-5)


@requires_ldm
def test_evaluation_loads_a_released_config_and_checkpoint(tmp_path) -> None:
    from ldm.models.autoencoder import VQModel
    from omegaconf import OmegaConf

    from adapters.evaluation import load_model

    small = released_model({"rot_trick": True}, ch=32, resolution=32)
    small["params"]["lossconfig"]["params"]["perceptual_weight"] = 0.0
    cfg_path = tmp_path / "config.yaml"
    OmegaConf.save(OmegaConf.create({"model": small}), cfg_path)
    up_params = {k: v for k, v in small["params"].items() if k not in ("rot_trick", "lossconfig")}
    upstream = VQModel(**up_params, lossconfig={"target": "torch.nn.Identity"})
    ckpt = tmp_path / "released.ckpt"
    torch.save({"state_dict": upstream.state_dict(), "global_step": 7}, ckpt)
    loaded = load_model(cfg_path, ckpt)
    assert type(loaded.model).__name__ == "RotationVQModel"
    assert loaded.model.quantize.gradient == "rotation_released"
    assert loaded.checkpoint["global_step"] == 7 and not loaded.checkpoint["unexpected_keys"]
