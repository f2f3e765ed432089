"""Old module paths (from before adapters/ was grouped by concern) are kept nowhere as modules: saved run configs and
committed evaluation records keep their old ``target:`` paths, and those are mapped where configs are read
(``adapters.LEGACY_MODULES``, ``canonical_target``/``canonical_targets``): evaluation, ``main.py -r`` (patch 0023),
the preflight checks. The patches import the new paths; checkpoints name no adapters module."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from omegaconf import OmegaConf

import adapters
from adapters import LEGACY_MODULES, canonical_target, canonical_targets
from conftest import HAS_ENHANCING, HAS_LDM, LDM_TREE, ROOT, requires_enhancing, requires_ldm

OLD_CONFIGS = ROOT / "tests" / "fixtures" / "old_layout"
# modules that import an upstream tree when imported
NEEDS_TREE = {"adapters.integrations.ldm": HAS_LDM, "adapters.integrations.vitvqgan": HAS_ENHANCING}


def _importable(module: str) -> bool:
    new = LEGACY_MODULES.get(module, (module,))[0]
    return NEEDS_TREE.get(new, True)


def test_no_module_is_kept_at_an_old_path() -> None:
    assert sorted(p.name for p in (ROOT / "adapters").glob("*.py")) == ["__init__.py"]
    for old, (new, why) in LEGACY_MODULES.items():
        assert why and importlib.util.find_spec(new) is not None, new
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(old)


def test_canonical_target_maps_old_paths_to_the_same_objects() -> None:
    assert canonical_target("adapters.ldm.RotationVQModel") == "adapters.integrations.ldm.RotationVQModel"
    assert canonical_target("adapters.data.PhotoCrops") == "adapters.evaluation.data.PhotoCrops"
    for target in ("adapters.integrations.ldm.RotationVQModel", "main.DataModuleFromConfig",
                   "adapters.quantizer.modules.RotationVectorQuantizer", "PhotoCrops"):
        assert canonical_target(target) == target
    from adapters.evaluation.model_loading import get_obj_from_str

    for target in ("adapters.data.PhotoCrops", "adapters.console.CpuThreads", "adapters.run_guard.RunGuard"):
        assert get_obj_from_str(target) is get_obj_from_str(canonical_target(target))  # the evaluation's resolver


def test_canonical_targets_maps_a_whole_config_in_place_leaving_interpolations() -> None:
    cfg = OmegaConf.load(OLD_CONFIGS / "vqgan_rot.yaml")
    cfg.lightning = {"callbacks": {"cpu_threads": {"target": "adapters.console.CpuThreads"}}, "x": [{"t": "${oops}"}]}
    cfg.model.params.note = "${model.target}"  # an interpolation: never resolved (it may not resolve)
    assert canonical_targets(cfg) is cfg
    assert cfg.model.target == "adapters.integrations.ldm.RotationVQModel"
    assert cfg.model.params.lossconfig.target == "adapters.integrations.losses.VQLPIPSWithDiscriminator"
    assert cfg.data.params.train.target == cfg.data.params.validation.target == "adapters.evaluation.data.PhotoCrops"
    assert cfg.lightning.callbacks.cpu_threads.target == "adapters.runtime.console.CpuThreads"
    assert cfg.data.target == "main.DataModuleFromConfig" and OmegaConf.is_interpolation(cfg.model.params, "note")
    plain = {"a": [{"target": "adapters.vitvqgan.RotationViTVQ"}], "target": "adapters.quantizer.modules.X"}
    assert canonical_targets(plain) == {"a": [{"target": "adapters.integrations.vitvqgan.RotationViTVQ"}],
                                        "target": "adapters.quantizer.modules.X"}


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


def test_the_patches_name_only_current_paths_and_they_resolve() -> None:
    refs = list(_patch_references())
    assert {m for _, m, _ in refs} >= {"adapters.runtime.run_guard", "adapters.runtime.preflight",
                                       "adapters.runtime.console", "adapters.runtime.safe_load"}
    for patch, module, name in refs:
        assert module not in LEGACY_MODULES, f"{patch} names the old path {module}"
        assert hasattr(importlib.import_module(module), name), f"{patch}: {module}.{name}"
    for patch in sorted((ROOT / "patches").glob("*/*.patch")):
        if "old-module-paths" in patch.name:
            continue  # the patch that maps saved configs' old targets names some in its header and comment
        for old in LEGACY_MODULES:  # headers and comments too
            assert not re.search(re.escape(old) + r"\b", patch.read_text()), f"{patch.name} names {old}"


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


def _main(args: list[str], logs: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env.pop("LDM_MAIN_RUN_TIME", None)
    return subprocess.run([sys.executable, str(LDM_TREE / "main.py"), "-l", str(logs), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@requires_ldm
@pytest.mark.ldm
@pytest.mark.slow
def test_a_run_folder_saved_before_the_move_trains_and_resumes(tmp_path: Path) -> None:
    """main.py reads a saved config of the old layout (--base), and -r resumes a run folder whose configs/*.yaml name
    the old paths (adapters.ldm..., adapters.losses..., adapters.data..., adapters.console.CpuThreads): patch 0023."""
    old = OmegaConf.load(OLD_CONFIGS / "vqgan_rot.yaml")
    old.lightning = {"callbacks": {"cpu_threads": {"target": "adapters.console.CpuThreads", "params": {"threads": 1}}}}
    OmegaConf.save(old, tmp_path / "old.yaml")
    fast = ["data.params.batch_size=2", "data.params.train.params.length=4", "data.params.validation.params.length=2"]
    logs = tmp_path / "logs"
    first = _main(["--base", str(tmp_path / "old.yaml"), "-t", "lightning.trainer.max_steps=1", *fast], logs)
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = logs.iterdir()
    saved = sorted((run / "configs").glob("*.yaml"))
    text = "\n".join(p.read_text() for p in saved)
    assert "adapters.integrations.ldm.RotationVQModel" in text and "adapters.runtime.console.CpuThreads" in text
    for path in saved:  # as a run of the old layout saved them
        old_text = path.read_text()
        for old_module, (new_module, _) in LEGACY_MODULES.items():
            old_text = old_text.replace(new_module + ".", old_module + ".")
        path.write_text(old_text)
    assert "adapters.ldm.RotationVQModel" in "\n".join(p.read_text() for p in saved)
    second = _main(["-r", str(run), "-t", "lightning.trainer.max_steps=2", *fast], logs)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Restored all states from the checkpoint" in second.stdout + second.stderr
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 2


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
    assert "LEGACY_MODULES" in adapters.__doc__
    assert set(adapters.__all__) >= {"LEGACY_MODULES", "canonical_target", "canonical_targets"}
