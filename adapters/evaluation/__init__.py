"""Evaluating a VQ autoencoder checkpoint the way the paper's Tables 3 and 4 report it, and the data runs read.

- ``run``: one evaluation end to end (``run_evaluation``): load, evaluate, write the JSON record;
- ``loop``: one pass over a dataset (``evaluate``, ``EvalOptions``) and what the record's metrics mean;
- ``tracker``: codebook statistics during the pass (the quantizer's own, or a forward hook's);
- ``sources``: which images (local ImageNet, offline photographs, the config's validation set);
- ``distributed``: the device, and this rank's share under torchrun;
- ``schema``: what a record holds, its checks, reading records back; ``records``: their compact JSON text;
- ``metrics``: r-FID, IS, PSNR, SSIM, LPIPS; ``model_loading``: configs and checkpoints to a model;
- ``data``: local ImageNet folders and the offline photographs, the datasets of training configs too;
- ``codebook_logging``: when the training wrappers count, reset and log codebook statistics; the usage figure.

``from adapters.evaluation import X`` works for every name the former single module ``adapters/evaluation.py``
exported; the names are looked up lazily (PEP 562), so ``import adapters.evaluation.data`` (training configs) and
``adapters.evaluation.records`` stay light.
"""
from __future__ import annotations

import importlib
from typing import Any

# name -> the module of this package that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("SCHEMA", "DEFINITIONS", "METRIC_KEYS", "RECORD_KEYS", "default_row", "validate_record",
                     "load_records"), "schema"),
    **dict.fromkeys(("EvalOptions", "EvalResult", "evaluate", "to_unit", "valid_rec_loss"), "loop"),
    **dict.fromkeys(("quantizer_info", "CodebookTracker"), "tracker"),
    **dict.fromkeys(("init_distributed", "resolve_device"), "distributed"),
    **dict.fromkeys(("model_image_size", "config_validation_dataset", "build_dataset"), "sources"),
    **dict.fromkeys(("make_record", "save_examples", "run_evaluation"), "run"),
    **dict.fromkeys(("LoadedModel", "build_from_config", "get_obj_from_str", "get_quantizer", "instantiate",
                     "load_config", "load_model", "model_family", "sha256_file"), "model_loading"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
