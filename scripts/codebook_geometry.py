#!/usr/bin/env python
"""Why a codebook collapses: encoder-output norms against codebook norms, and how many codes can ever be chosen.

  python scripts/codebook_geometry.py --config configs/small_vqgan.yaml [--checkpoint CKPT] [--seed 0] [--json OUT]

Without --checkpoint the model is freshly initialised (seeded), i.e. the state at step 0. On 128 evaluation crops
(the offline photographs, as reproduce.sh evaluates) it prints: the norm of the encoder outputs e (in the lookup
space: raw for the VQGAN, before l2-normalisation for the ViT-VQGAN), the codebook norms, the codes used, and
"reachable" codes: codes that are the nearest one for at least one of 20,000 random vectors whose norm is the
median ||e||. When ||e|| >> ||c||, nearest-code search reduces to argmax <e, c>, which only the few vertices of the
codebook's convex hull can win, whatever the encoder does: a collapse built into the initialisation.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "third_party" / "latent-diffusion"), str(ROOT / "third_party" / "enhancing-transformers")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402


@torch.no_grad()
def geometry(config: str, checkpoint: Optional[str], seed: int = 0, images: int = 128, probes: int = 20000
             ) -> dict[str, Any]:
    from adapters import evaluation as E

    torch.manual_seed(seed)
    loaded = E.load_model(E.load_config([config]), checkpoint, "cpu")
    model = loaded.model.eval()
    ds, _ = E.build_dataset(loaded, "photos", limit=images)
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    x = batch["image"]
    if loaded.family == "taming":
        x = torch.as_tensor(x).permute(0, 3, 1, 2).float()
        e = model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1).reshape(-1, model.quantize.embedding.weight.shape[1])
        codes = model.quantize.embedding.weight
        normed = False
    else:
        e = model.pre_quant(model.encoder(x)).reshape(-1, model.quantizer.embedding.weight.shape[1])
        codes = model.quantizer.embedding.weight
        normed = True
    look_e = torch.nn.functional.normalize(e, dim=1) if normed else e
    look_c = torch.nn.functional.normalize(codes, dim=1) if normed else codes
    idx = torch.cdist(look_e, look_c).argmin(1)
    used = torch.unique(idx)
    q = look_c[idx]
    en, cn = e.norm(dim=1), codes.norm(dim=1)
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(probes, e.shape[1], generator=g), dim=1)
    probe = u if normed else u * en.median()
    reachable = torch.unique(torch.cdist(probe, look_c).argmin(1)).numel()
    out = {
        "config": config, "checkpoint": checkpoint, "step": (loaded.checkpoint or {}).get("global_step"),
        "n_codes": codes.shape[0], "dim": codes.shape[1], "lookup": "l2-normalised" if normed else "raw",
        "e_norm_median": en.median().item(), "e_norm_mean": en.mean().item(),
        "code_norm_median": cn.median().item(), "code_norm_max": cn.max().item(),
        "used_code_norm_median": cn[used].median().item(),
        "ratio_e_to_code_norm": (en.median() / cn.median()).item(),
        "used_codes": used.numel(), "reachable_codes_at_median_norm": reachable,
        "quant_error": ((look_e - q) ** 2).sum(1).mean().item(),
    }
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    a = p.parse_args(argv)
    out = geometry(a.config, a.checkpoint, a.seed, a.images)
    print(json.dumps(out))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(out) + "\n")
    return out


if __name__ == "__main__":
    main()
