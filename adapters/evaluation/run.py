"""One evaluation run end to end: load the config and checkpoint, evaluate, check and write the JSON record (and an
examples PNG beside it)."""
from __future__ import annotations

import datetime as _dt
import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.utils.data import Dataset

from adapters.evaluation.distributed import is_distributed, resolve_device
from adapters.evaluation.loop import EvalOptions, EvalResult, evaluate
from adapters.evaluation.model_loading import LoadedModel, load_config, load_model
from adapters.evaluation.records import dumps_record
from adapters.evaluation.schema import DEFINITIONS, SCHEMA, default_row, validate_record
from adapters.evaluation.tracker import quantizer_info


def _environment(device: torch.device) -> dict[str, Any]:
    import torch_fidelity

    return {"torch": torch.__version__, "torch_fidelity": torch_fidelity.__version__, "python": platform.python_version(),
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
            platform.processor() or platform.machine(), "world_size": dist.get_world_size() if is_distributed() else 1}


def make_record(loaded: LoadedModel, result: EvalResult, options: EvalOptions, data_info: Mapping[str, Any],
                config_path: Optional[str | Sequence[str]], device: torch.device,
                row: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The JSON record of one evaluation run (schema ``rotation-trick-eval/1``)."""
    model_info = quantizer_info(loaded.model)
    model_info.update(family=loaded.family, latent_shape=result.latent_shape)
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config_path": config_path if config_path is None or isinstance(config_path, str) else list(config_path),
        "config": OmegaConf.to_container(loaded.config, resolve=True),
        "checkpoint": dict(loaded.checkpoint),
        "model": model_info,
        "row": {**default_row(model_info), **{k: v for k, v in dict(row or {}).items() if v is not None}},
        "data": {**dict(data_info), "num_images": result.num_images, "batch_size": options.batch_size},
        "options": asdict(options),
        "metrics": result.metrics,
        "skipped": result.skipped,
        "definitions": DEFINITIONS,
        "code_counts": result.code_counts,
        "environment": {**_environment(device), "seconds": round(result.seconds, 2)},
    }


def save_examples(examples: Tensor, path: str | os.PathLike) -> None:
    """Originals (top row) above reconstructions (bottom row) as one PNG."""
    from torchvision.utils import save_image

    k = examples.shape[0] // 2
    save_image(examples, str(path), nrow=k, padding=2)


def run_evaluation(config: str | os.PathLike | Sequence[str | os.PathLike], checkpoint: Optional[str | os.PathLike],
                   dataset: Dataset | Callable[[LoadedModel], tuple[Dataset, dict[str, Any]]], options: EvalOptions, out_json: Optional[str | os.PathLike] = None,
                   data_info: Optional[Mapping[str, Any]] = None, row: Optional[Mapping[str, Any]] = None,
                   inception: Optional[nn.Module] = None, lpips_net: Optional[nn.Module] = None) -> dict[str, Any]:
    """Load, evaluate, and (on rank 0) write the JSON record (+ an examples PNG beside it). Returns the record.

    dataset: a Dataset in the model's batch format, or a callable ``loaded_model -> (dataset, data_info)``
    (e.g. ``lambda m: build_dataset(m, "photos")``) when the format depends on the model.
    """
    device = resolve_device(options.device)
    cfg_paths = [config] if isinstance(config, (str, os.PathLike)) else list(config)
    loaded = load_model(load_config(cfg_paths), checkpoint, device, trust_checkpoint=options.trust_checkpoint,
                        config_name=" + ".join(map(str, cfg_paths)))
    if callable(dataset) and not isinstance(dataset, Dataset):
        dataset, built_info = dataset(loaded)
        data_info = {**built_info, **dict(data_info or {})}
    result = evaluate(loaded.model, dataset, options, device, inception=inception, lpips_net=lpips_net)
    record = make_record(loaded, result, options, data_info or {}, [str(p) for p in cfg_paths], device, row)
    validate_record(record)
    if out_json is not None and (not is_distributed() or dist.get_rank() == 0):
        out = Path(out_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        if result.examples is not None:
            png = out.with_suffix(".png")
            save_examples(result.examples, png)
            record["examples_png"] = png.name
        out.write_text(dumps_record(record, default=_json_default))  # number lists on one line (issue 17)
    return record


def _json_default(o: Any) -> Any:
    if isinstance(o, Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
