"""The remedy study's ViT-VQGAN configs (issue 24): each sets its remedy and nothing else over its base, and the two
arms of every pair differ only in the estimator (and, for the per-stage row, the rotation's scope)."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import ROOT

from adapters.evaluation.model_loading import load_config

REMEDIES = {"ema": {"codebook_update": "ema"},
            "ema08": {"codebook_update": "ema", "ema_decay": 0.8},
            "ema_dead": {"codebook_update": "ema", "dead_code_threshold": 0.03},
            "simvq": {"codebook_param": "simvq"},
            "residual": {"use_residual": True, "num_quantizers": 2}}


def _load(name: str):
    return load_config(ROOT / "configs" / f"{name}.yaml")


@pytest.mark.parametrize("remedy", sorted(REMEDIES))
def test_each_remedy_config_sets_its_keys_and_nothing_else(remedy: str) -> None:
    for arm in ("", "rot_"):
        cfg, ref = _load(f"small_kmeans_{remedy}_{arm}vitvqgan"), _load(f"small_kmeans_{arm}vitvqgan")
        q = cfg.model.params.quantizer
        for key, value in REMEDIES[remedy].items():
            assert q[key] == value
            del q[key]
        assert cfg == ref


@pytest.mark.parametrize("remedy", sorted(REMEDIES))
def test_both_arms_of_a_remedy_pair_differ_only_in_the_estimator(remedy: str) -> None:
    ste, rot = _load(f"small_kmeans_{remedy}_vitvqgan"), _load(f"small_kmeans_{remedy}_rot_vitvqgan")
    assert ste.model.params.get("gradient", "ste") != rot.model.params.gradient
    for cfg in (ste, rot):
        cfg.model.params.pop("gradient", None)
    assert OmegaConf.to_container(ste) == OmegaConf.to_container(rot)


def test_per_stage_row_differs_from_the_sum_only_in_scope() -> None:
    stage, total = _load("small_kmeans_residual_rot_stage_vitvqgan"), _load("small_kmeans_residual_rot_vitvqgan")
    assert stage.model.params.quantizer.rotation_scope == "stage"
    del stage.model.params.quantizer["rotation_scope"]
    assert stage == total
