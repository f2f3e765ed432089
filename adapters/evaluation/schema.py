"""What an evaluation record holds (schema ``rotation-trick-eval/1``), which paper row it belongs to, and reading
records back with their checks. Writing one is :mod:`adapters.evaluation.run`'s; the compact JSON text,
:mod:`adapters.evaluation.records`'.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

SCHEMA = "rotation-trick-eval/1"

# What each metric in a record means; copied into every record so a JSON explains itself.
DEFINITIONS: dict[str, str] = {
    "codebook_usage_per_batch": "the paper's definition: fraction of codebook vectors used by one evaluation batch "
                                "(of data.batch_size images on one device), averaged over batches",
    "codebook_usage_per_batch_std": "standard deviation of the per-batch usage over batches",
    "codebook_usage_whole_set": "fraction of codebook vectors used at least once over the whole evaluated set",
    "used_codes_whole_set": "number of codebook vectors used at least once over the whole set",
    "perplexity_whole_set": "exp(entropy) of the code histogram over the whole set",
    "quant_error": "mean over latent vectors of ||e - q||^2, e the encoder output and q its codebook vector, in the "
                   "space the code is looked up in (l2-normalised for ViT-VQGAN); null for Gumbel quantizers",
    "quant_error_per_dim": "quant_error divided by the latent dimension d: the per-element mean squared error, the "
                           "form of upstream's codebook loss (the paper does not say which of the two it reports)",
    "valid_loss": "the model's loss module's val/rec_loss (as upstream's validation_step logs it), mean over images",
    "r_fid": "FID of the reconstructions against the originals (torch-fidelity Inception-v3, pool3 2048-d)",
    "r_is": "Inception Score of the reconstructions (torch-fidelity, 10 splits); r_is_std its std over splits",
    "is_originals": "Inception Score of the originals, for reference",
    "psnr": "mean per-image PSNR (dB) between uint8-rounded original and reconstruction in [0, 1]",
    "ssim": "mean per-image SSIM (Gaussian 11x11, sigma 1.5), uint8-rounded images in [0, 1]",
    "lpips": "mean LPIPS (lpips package v0.1, options.lpips_net backbone) between original and reconstruction",
}
METRIC_KEYS: tuple[str, ...] = (
    "codebook_usage_per_batch", "codebook_usage_per_batch_std", "codebook_usage_whole_set", "used_codes_whole_set",
    "perplexity_whole_set", "quant_error", "valid_loss", "r_fid", "r_is", "r_is_std", "is_originals", "psnr",
    "ssim", "lpips",
)
RECORD_KEYS: tuple[str, ...] = ("schema", "created", "config_path", "config", "checkpoint", "model", "data",
                                "options", "metrics", "skipped", "definitions", "code_counts", "environment")


def default_row(model_info: Mapping[str, Any]) -> dict[str, Any]:
    """Which paper row a run belongs to: Table 3 for latent-diffusion/taming models, Table 4 for ViT-VQGAN."""
    table = 4 if model_info.get("family") == "enhancing" else 3
    g = model_info.get("gradient")
    approach = "gumbel" if g == "gumbel" else ("ste" if g == "ste" else "rotation")
    return {"table": table, "approach": approach, "gradient": g, "setting": model_info.get("latent_shape")}


def validate_record(record: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first problem if ``record`` is not a schema-1 evaluation record."""
    if record.get("schema") != SCHEMA:
        raise ValueError(f"not an evaluation record of schema {SCHEMA!r} (schema: {record.get('schema')!r})")
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise ValueError(f"evaluation record lacks keys {missing}")
    m = record["metrics"]
    lacking = [k for k in METRIC_KEYS if k not in m]
    if lacking:
        raise ValueError(f"evaluation record's metrics lack {lacking}")
    for k in METRIC_KEYS:
        v = m[k]
        if v is not None and not isinstance(v, (int, float)):
            raise ValueError(f"metric {k} must be a number or null, got {type(v).__name__}")
    for k in ("codebook_usage_per_batch", "codebook_usage_whole_set"):
        if m[k] is not None and not 0.0 <= m[k] <= 1.0:
            raise ValueError(f"metric {k} is a fraction in [0, 1], got {m[k]}")
    if m["used_codes_whole_set"] is not None and m["used_codes_whole_set"] != sum(1 for c in record["code_counts"] if c):
        raise ValueError("used_codes_whole_set disagrees with code_counts")
    if not isinstance(record["data"].get("num_images"), int) or record["data"]["num_images"] < 1:
        raise ValueError("data.num_images must be a positive integer")
    row = record.get("row") or {}
    if row.get("table") not in (3, 4):
        raise ValueError(f"row.table must be 3 or 4, got {row.get('table')!r}")


def load_records(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """Read and validate evaluation JSONs (directories are searched for *.json)."""
    out = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or folder of evaluation records")
        files = sorted(p.rglob("*.json")) if p.is_dir() else [p]
        for f in files:
            rec = json.loads(f.read_text())
            if isinstance(rec, dict) and rec.get("schema") == SCHEMA:
                validate_record(rec)
                rec["_path"] = str(f)
                out.append(rec)
            elif not p.is_dir():
                raise ValueError(f"{f} is not an evaluation record (schema {SCHEMA})")
    return out
