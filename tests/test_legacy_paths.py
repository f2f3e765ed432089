"""Old module paths (from before adapters/ was grouped by concern) resolve wherever something this code cannot change
names them: saved run configs and committed evaluation records (``target:`` paths), the upstream patches (imports),
checkpoints. The aliases are listed once, in ``adapters.LEGACY_MODULES``; the project's own code uses the new paths."""
from __future__ import annotations

import ast
import importlib
import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from omegaconf import OmegaConf

import adapters
from adapters import LEGACY_MODULES, canonical_target
from conftest import HAS_ENHANCING, HAS_LDM, ROOT, requires_enhancing, requires_ldm

OLD_CONFIGS = ROOT / "tests" / "fixtures" / "old_layout"
# modules that import an upstream tree when imported (new paths; their aliases too)
NEEDS_TREE = {"adapters.integrations.ldm": HAS_LDM, "adapters.integrations.vitvqgan": HAS_ENHANCING}


def _importable(module: str) -> bool:
    new = LEGACY_MODULES.get(module, (module,))[0]
    return NEEDS_TREE.get(new, True)


def _exported(module: Any) -> dict[str, Any]:
    """What ``from module import *`` gives: ``__all__``, else every name without a leading underscore."""
    names = getattr(module, "__all__", None) or [k for k in vars(module) if not k.startswith("_")]
    return {k: getattr(module, k) for k in names}


def test_every_flat_module_is_a_listed_alias_of_its_new_home() -> None:
    flat = {f"adapters.{p.stem}" for p in (ROOT / "adapters").glob("*.py") if p.stem != "__init__"}
    assert flat == set(LEGACY_MODULES), "a module at adapters/*.py is an alias, listed in adapters.LEGACY_MODULES"
    for old, (new, why) in LEGACY_MODULES.items():
        path = ROOT / Path(*old.split(".")).with_suffix(".py")
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree) and len(path.read_text().splitlines()) <= 3, f"{path}: a tiny alias"
        imports = [n for n in tree.body if isinstance(n, ast.ImportFrom)]
        assert [n.module for n in imports] == [new] and why
        if _importable(old):
            old_mod, new_mod = importlib.import_module(old), importlib.import_module(new)
            assert all(getattr(old_mod, k, None) is v for k, v in _exported(new_mod).items()), old


def test_canonical_target_maps_old_paths_to_the_same_objects() -> None:
    assert canonical_target("adapters.ldm.RotationVQModel") == "adapters.integrations.ldm.RotationVQModel"
    assert canonical_target("adapters.data.PhotoCrops") == "adapters.evaluation.data.PhotoCrops"
    for target in ("adapters.integrations.ldm.RotationVQModel", "main.DataModuleFromConfig",
                   "adapters.quantizer.modules.RotationVectorQuantizer", "PhotoCrops"):
        assert canonical_target(target) == target
    from adapters.evaluation.model_loading import get_obj_from_str

    for target in ("adapters.data.PhotoCrops", "adapters.console.CpuThreads", "adapters.run_guard.RunGuard"):
        assert get_obj_from_str(target) is get_obj_from_str(canonical_target(target))


def _patch_references() -> Iterator[tuple[str, str, str]]:
    """(patch file, module, name) for every adapters import and target string the patches add to upstream code."""
    for patch in sorted((ROOT / "patches").glob("*/*.patch")):
        for line in patch.read_text().splitlines():
            if not line.startswith("+") or line.startswith("+++") or line.lstrip("+ ").startswith("#"):
                continue
            for module, names in re.findall(r"from (adapters[\w.]*) import ([\w, ]+)", line):
                for name in names.replace(" ", "").split(","):
                    yield patch.name, module, name
            for target in re.findall(r"[\"'](adapters\.[\w.]+)[\"']", line):
                module, _, name = target.rpartition(".")
                yield patch.name, module, name


def test_what_the_patches_import_resolves() -> None:
    refs = list(_patch_references())
    assert {m for _, m, _ in refs} >= {"adapters.run_guard", "adapters.preflight", "adapters.console",
                                       "adapters.safe_load"}
    for patch, module, name in refs:
        assert module in LEGACY_MODULES or module.split(".")[1] in ("quantizer", "integrations", "runtime",
                                                                    "evaluation"), (patch, module)
        assert hasattr(importlib.import_module(module), name), f"{patch}: {module}.{name}"


def _targets(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("target"), str):
            yield node["target"]
        for value in node.values():
            yield from _targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from _targets(value)


def test_targets_in_committed_records_resolve() -> None:
    from adapters.evaluation.model_loading import get_obj_from_str

    records = [json.loads(f.read_text()) for f in (ROOT / "docs").rglob("*.json")]
    targets = {t for r in records if isinstance(r, dict) for t in _targets(r.get("config"))
               if t.startswith("adapters.")}
    for target in sorted(targets):
        if _importable(target.rpartition(".")[0]):
            assert get_obj_from_str(target) is get_obj_from_str(canonical_target(target)), target


@pytest.mark.parametrize("name,model_cls,data_key", [
    pytest.param("vqgan_rot", "adapters.integrations.ldm.RotationVQModel", "data", marks=requires_ldm),
    pytest.param("vit_rot", "adapters.integrations.vitvqgan.RotationViTVQ", "dataset", marks=requires_enhancing)])
def test_old_saved_config_builds_and_loads_its_checkpoint_through_the_old_targets(
        name: str, model_cls: str, data_key: str, tmp_path: Path) -> None:
    from adapters.evaluation import load_model, quantizer_info
    from adapters.evaluation.data import PhotoCrops
    from adapters.evaluation.model_loading import build_from_config, get_obj_from_str

    cfg = OmegaConf.load(OLD_CONFIGS / f"{name}.yaml")
    assert cfg.model.target.split(".")[1] in ("ldm", "vitvqgan")  # the old path, not the new one
    torch.manual_seed(0)
    loaded = load_model(cfg, None)
    assert type(loaded.model) is get_obj_from_str(model_cls)
    assert quantizer_info(loaded.model)["gradient"] == "rotation_released"
    loss = loaded.model.loss
    assert type(loss).__module__ in ("adapters.integrations.losses", "adapters.integrations.vitvqgan")
    ckpt = tmp_path / "last.ckpt"  # a checkpoint as a run of the old layout wrote it: global step and weights
    state = {k: v + 0.5 if v.is_floating_point() else v for k, v in loaded.model.state_dict().items()}
    torch.save({"state_dict": state, "global_step": 7, "epoch": 0}, ckpt)
    again = load_model(cfg, ckpt)
    assert again.checkpoint["global_step"] == 7
    assert all(torch.equal(v, state[k]) for k, v in again.model.state_dict().items())
    data = build_from_config(cfg[data_key].params.validation, f"{data_key}.params.validation")
    assert isinstance(data, PhotoCrops) and len(data) == cfg[data_key].params.validation.params.length


def test_checkpoints_name_no_adapters_module() -> None:
    """Checkpoints hold weights and Lightning's data types: no class of this project (the allowlist names none, no
    hyper-parameters are saved, RunGuard keeps no state and its state key is its class name), so moving a module
    needs no alias for them."""
    from adapters.runtime.run_guard import RunGuard
    from adapters.runtime.safe_load import safe_globals

    assert not [name for _, name in safe_globals() if name.startswith("adapters")]
    guard = RunGuard()
    assert guard.state_dict() == {} and "adapters" not in guard.state_key


def test_preflight_reads_an_old_loss_target_as_the_new_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from adapters.runtime import preflight

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("ROTATION_TRICK_OFFLINE", "1")
    model = OmegaConf.load(ROOT / "configs" / "rot_vqgan_64.yaml").model
    (new,) = preflight.lpips_problems(model)
    model.params.lossconfig.target = "adapters.losses.VQLPIPSWithDiscriminator"
    assert preflight.lpips_problems(model) == [new]
    vit = OmegaConf.create({"params": {"loss": {"target": "adapters.vitvqgan.VQLPIPSWithDiscriminator",
                                                "params": {"perceptual_weight": 1.0}}}})
    assert len(preflight.enhancing_lpips_problems(vit)) == 1
    vit.params.loss.params.perceptual_weight = 0.0
    assert preflight.enhancing_lpips_problems(vit) == []  # the project's class: weight 0 builds no LPIPS


def test_the_package_lists_its_aliases() -> None:
    assert "LEGACY_MODULES" in adapters.__doc__ and set(adapters.__all__) >= {"LEGACY_MODULES", "canonical_target"}
