"""Evaluating a VQ autoencoder checkpoint the way the paper's Tables 3 and 4 report it, and the data runs read.

``from adapters.evaluation import X`` works for every name the former single module ``adapters/evaluation.py``
exported; the names are looked up lazily (PEP 562), so ``import adapters.evaluation.data`` (training configs) and
``adapters.evaluation.records`` stay light.
"""
from __future__ import annotations

import importlib
from typing import Any

# name -> the module of this package that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("SCHEMA", "DEFINITIONS", "METRIC_KEYS", "RECORD_KEYS", "EvalOptions", "quantizer_info",
                     "CodebookTracker", "init_distributed", "resolve_device", "to_unit", "valid_rec_loss",
                     "EvalResult", "evaluate", "make_record", "default_row", "validate_record", "save_examples",
                     "model_image_size", "config_validation_dataset", "build_dataset", "run_evaluation",
                     "load_records"), "loop"),
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
