#!/usr/bin/env python
"""Forward+backward time and extra peak memory of the VQ layer at the paper's shapes, ours vs upstream.

Rows, from one run:
  fused     adapters.quantizer (gradient=rotation_released; l2-normalised for Table 4), search: fused (one compiled
            kernel, no N x K distance matrix)
  blocked   the same with search: blocked (taming's distance expression by row blocks of 64 MiB)
  upstream  taming's VectorQuantizer2 (enhancing's VectorQuantizer for Table 4) followed by the released rotation,
            materialising the (N, d, d) matrices as the authors' rot_vqgan.py / rot_vitvqgan.py do
  vqp       vector_quantize_pytorch.VectorQuantize(rotation_trick=True) (cosine sim for Table 4)

Each (shape, method) runs in a fresh subprocess. Each first runs one forward+backward on 1/16 of the batch (for
fused, this compiles the search: its time is printed below the table), then one at full size for the peak, then
--repeats timed ones (the median is reported). "extra peak" is the peak during that full-size forward+backward minus
the memory held before it (inputs, codebook): on CPU the resident-set high-water mark, reset before the call through
/proc/self/clear_refs (Linux; elsewhere ru_maxrss, which the warm-up may already have raised); on CUDA
torch.cuda.max_memory_allocated.

  python scripts/bench_quantizer.py --device cpu --scale 0.25
  python scripts/bench_quantizer.py --device cuda --repeats 20
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# name: (batch, height*width, codebook size, dim, l2-normalised)
SHAPES = {
    "table3_64x64x3": (16, 64 * 64, 8192, 3, False),
    "table3_32x32x4": (16, 32 * 32, 16384, 4, False),
    "table4_vit_32": (32, 32 * 32, 8192, 32, True),
}
METHODS = ("fused", "blocked", "upstream", "vqp")
LABELS = {"fused": "ours, fused", "blocked": "ours, blocked", "upstream": "upstream", "vqp": "vqp"}


def released_rotation(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The authors' released Table 3/4 estimator with explicit per-vector d x d matrices. e, q: (N, d)."""
    u = e / torch.norm(e, dim=1, keepdim=True)
    qh = q / torch.norm(q, dim=1, keepdim=True)
    w = (u + qh) / torch.norm(u + qh, dim=1, keepdim=True)
    eye = torch.eye(e.shape[1], device=e.device, dtype=e.dtype)
    rot = (eye - 2 * torch.einsum("ni,nj->nij", w, w) + 2 * torch.einsum("ni,nj->nij", qh, u)).detach()
    return torch.bmm(rot, u.unsqueeze(-1)).squeeze(-1) * torch.norm(q.detach(), dim=1, keepdim=True)


def _enhancing_quantizer_class():
    path = ROOT / "third_party/enhancing-transformers/enhancing/modules/stage1/quantizers.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("_enhancing_quantizers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # the file imports only torch
    return mod.VectorQuantizer


def build(method: str, k: int, d: int, norm: bool, device: str):
    """Returns (module, step) where step(z) -> scalar to backpropagate; z is (B, d, H*W, 1) or (B, T, d)."""
    if method in ("fused", "blocked"):
        from adapters.quantizer import NormRotationQuantizer, RotationVectorQuantizer
        if norm:
            m = NormRotationQuantizer(d, k, gradient="rotation_released", search=method).to(device)
        else:
            m = RotationVectorQuantizer(k, d, gradient="rotation_released", search=method).to(device)
        # statistics stay on (track_stats=True): they are part of what the layer costs

        def step(z):
            out, loss, _ = m(z)
            return out.square().mean() + loss
        return m, step
    if method == "upstream":
        if norm:
            cls = _enhancing_quantizer_class()
            if cls is None:
                raise SystemExit("n/a: third_party/enhancing-transformers is absent (run scripts/setup_submodules.sh)")
            m = cls(d, k).to(device)

            def step(z):
                q, loss, _ = m(z)
                e = z.reshape(-1, d)
                out = released_rotation(e, q.reshape(-1, d))
                return out.square().mean() + loss
            return m, step
        from taming.modules.vqvae.quantize import VectorQuantizer2
        m = VectorQuantizer2(k, d, beta=0.25).to(device)

        def step(z):
            q, loss, _ = m(z)
            e = z.permute(0, 2, 3, 1).reshape(-1, d)
            out = released_rotation(e, q.permute(0, 2, 3, 1).reshape(-1, d))
            return out.square().mean() + loss
        return m, step
    if method == "vqp":
        from vector_quantize_pytorch import VectorQuantize
        # its defaults (EMA codebook updates); cosine similarity cannot be combined with a learnable codebook
        m = VectorQuantize(dim=d, codebook_size=k, rotation_trick=True, use_cosine_sim=norm,
                           channel_last=norm).to(device)

        def step(z):
            out, _, loss = m(z if norm else z.flatten(2))
            return out.square().mean() + loss
        return m, step
    raise ValueError(method)


def _rss_bytes(field: str) -> int:
    """VmRSS or VmHWM of this process from /proc/self/status, in bytes."""
    text = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith(field + ":"))) * 1024


def _reset_cpu_peak() -> bool:
    """Reset the resident-set high-water mark to the current RSS (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    """This process's resident-set high-water mark (ru_maxrss is in KiB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def worker(shape: str, method: str, device: str, scale: float, repeats: int) -> dict:
    b, hw, k, d, norm = SHAPES[shape]
    b = max(1, round(b * scale))
    torch.manual_seed(0)
    m, step = build(method, k, d, norm, device)
    z0 = torch.randn(b, hw, d, device=device) if norm else torch.randn(b, d, hw, 1, device=device)
    z = z0.clone().requires_grad_(True)
    small = z0[:, : max(1, hw // 16)].clone().requires_grad_(True) if norm else \
        z0[:, :, : max(1, hw // 16)].clone().requires_grad_(True)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def once(x: torch.Tensor) -> None:
        x.grad = None
        m.zero_grad(set_to_none=True)
        step(x).backward()
        sync()

    t0 = time.perf_counter()
    once(small)  # compiles the fused search (no recompilation for the full size: its sizes are symbolic)
    first_call = time.perf_counter() - t0
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        once(z)
        peak = torch.cuda.max_memory_allocated() - base
    elif _reset_cpu_peak():
        base = _rss_bytes("VmRSS")
        once(z)
        peak = _rss_bytes("VmHWM") - base
    else:
        base = _maxrss_bytes()
        once(z)
        peak = _maxrss_bytes() - base
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once(z)
        times.append(time.perf_counter() - t0)
    return {"shape": shape, "method": method, "n": b * hw, "k": k, "d": d, "first_call_s": first_call,
            "median_s": statistics.median(times), "extra_peak_bytes": max(peak, 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the batch (so N) by this, e.g. 0.25 on CPU")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--threads", type=int, help="torch.set_num_threads in each worker (CPU); 1 on a busy machine, "
                    "where two-thread parallel regions wait on a descheduled partner")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--_worker", nargs=2, metavar=("SHAPE", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible here; use --device cpu (with --scale to shrink N)")

    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._worker:
        print(json.dumps(worker(*args._worker, args.device, args.scale, args.repeats)))
        return

    rows = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for shape in args.shapes:
        for method in args.methods:
            cmd = [sys.executable, __file__, "--device", args.device, "--scale", str(args.scale),
                   "--repeats", str(args.repeats), "--_worker", shape, method]
            cmd += ["--threads", str(args.threads)] if args.threads else []
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                msg = (res.stdout + res.stderr).strip().splitlines()
                rows.append({"shape": shape, "method": method, "error": msg[-1] if msg else f"exit {res.returncode}"})
            else:
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"  {shape:16s} {method:9s} done", file=sys.stderr)

    cuda = args.device.startswith("cuda")
    device = torch.cuda.get_device_name(0) if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"device={args.device} ({device}) scale={args.scale} repeats={args.repeats} torch={torch.__version__}")
    print("| shape | N | K | d | method | fwd+bwd median (ms) | extra peak (MiB) | time vs upstream | peak vs upstream "
          "| time vs blocked |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        ref = next((r for r in rows if r["shape"] == shape and r["method"] == "upstream" and "error" not in r), None)
        blk = next((r for r in rows if r["shape"] == shape and r["method"] == "blocked" and "error" not in r), None)
        for r in (r for r in rows if r["shape"] == shape):
            label = LABELS[r["method"]]
            if "error" in r:
                print(f"| {shape} | | | | {label} | {r['error']} | | | | |")
                continue
            t_ratio = f"{r['median_s'] / ref['median_s']:.2f}x" if ref else "n/a"
            m_ratio = f"{r['extra_peak_bytes'] / max(ref['extra_peak_bytes'], 1):.3f}x" if ref else "n/a"
            b_ratio = f"{r['median_s'] / blk['median_s']:.2f}x" if blk else "n/a"
            print(f"| {shape} | {r['n']} | {r['k']} | {r['d']} | {label} | {r['median_s'] * 1e3:.1f} "
                  f"| {r['extra_peak_bytes'] / 2**20:.0f} | {t_ratio} | {m_ratio} | {b_ratio} |")
    firsts = [f"{r['shape']} {r['first_call_s']:.1f} s" for r in rows if r["method"] == "fused" and "error" not in r]
    if firsts:
        cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "the default inductor cache")
        print(f"\nfused: first forward+backward of each process (compiles the search; cache: {cache}): "
              + ", ".join(firsts))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
