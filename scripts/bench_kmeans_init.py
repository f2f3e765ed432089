#!/usr/bin/env python
"""Cost of ``codebook_init: kmeans`` (adapters/quantizer/kmeans.py) against vector-quantize-pytorch's ``kmeans``.

  python scripts/bench_kmeans_init.py [--threads 1] [--repeats 3] [--iters 10] [--cases 8192x3@1024,...]

Each case K x d @ N (codes x dim @ encoder vectors in the first batch) runs in a fresh process: median CPU seconds
of the process over the repeats (one thread by default, so on an idle machine that is the wall time; CPU time is
what a shared machine cannot inflate), the extra peak memory of one call (ru_maxrss after minus before), and the mean squared distance of the
vectors to their nearest code (lower is a better fit). Default cases: the small configs' first batch (1,024
vectors: fewer than K, the jittered-copy path), the paper's VQGAN batch (16 x 64 x 64 = 65,536 x 3) and ViT-VQGAN
batch (32 x 32 x 32 = 32,768 x 32). The peer runs the same Lloyd iterations from uniform seeding with an N x K
distance matrix; ours seeds by k-means++ and assigns by the blocked search.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

DEFAULT_CASES = "8192x3@1024,8192x32@1024,8192x3@65536,8192x32@32768"


def _worker(method: str, k: int, d: int, n: int, iters: int, repeats: int) -> dict:
    import torch

    torch.manual_seed(0)
    x = torch.randn(n, d)
    x = x / x.norm(dim=1, keepdim=True) * (0.5 + torch.rand(n, 1))  # |e| ~ 1, as an encoder's first outputs
    spherical = d == 32  # the ViT-VQGAN codebook is l2-normalised

    def run() -> torch.Tensor:
        if method == "ours":
            from adapters.quantizer.kmeans import kmeans_codebook

            return kmeans_codebook(x, k, iters=iters, spherical=spherical)
        from vector_quantize_pytorch.vector_quantize_pytorch import kmeans

        xs = torch.nn.functional.normalize(x, dim=1) if spherical else x
        return kmeans(xs[None], k, num_iters=iters, use_cosine_sim=spherical)[0][0]

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, peak = [], before
    for _ in range(repeats):
        t = time.process_time()
        c = run()
        times.append(time.process_time() - t)
        peak = max(peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    xs = torch.nn.functional.normalize(x, dim=1) if spherical else x
    fit = sum(torch.cdist(xs[i:i + 4096], c).min(1).values.pow(2).sum().item() for i in range(0, n, 4096))
    return {"seconds": statistics.median(times), "extra_peak_mib": max(0, peak - before) / 1024,
            "fit": fit / n, "distinct": int(torch.unique(c, dim=0).shape[0])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=DEFAULT_CASES)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", default="ours,vector-quantize-pytorch")
    p.add_argument("--_worker", nargs=5, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._worker:
        import torch

        torch.set_num_threads(a.threads)
        method, k, d, n, iters = a._worker
        print(json.dumps(_worker(method, int(k), int(d), int(n), int(iters), a.repeats)))
        return 0
    print("| K x d @ N | method | CPU seconds (median) | extra peak (MiB) | mean sq. distance to nearest code | distinct codes |")
    print("|---|---|---|---|---|---|")
    for case in a.cases.split(","):
        kd, n = case.split("@")
        k, d = kd.split("x")
        for method in a.methods.split(","):
            res = subprocess.run([sys.executable, __file__, "--threads", str(a.threads), "--repeats", str(a.repeats),
                                  "--_worker", method, k, d, n, str(a.iters)], capture_output=True, text=True)
            if res.returncode != 0:
                print(f"| {case} | {method} | failed: {res.stderr.strip().splitlines()[-1][:80]} | | | |")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"| {k} x {d} @ {n} | {method} | {r['seconds']:.3f} | {r['extra_peak_mib']:.0f} | "
                  f"{r['fit']:.3e} | {r['distinct']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
