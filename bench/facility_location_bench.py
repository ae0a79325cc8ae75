"""Superfiltering.D's facility location: lazy greedy (pomona) vs recomputing every gain on every step.

    .venv/bin/python bench/facility_location_bench.py
    .venv/bin/python bench/facility_location_bench.py --sizes 2000x384x200 5000x384x500 --kernels euclidean

Synthetic embeddings: 50 cluster centres plus noise (sentence-embedding-like spread). Each size runs the plain
greedy (every candidate's gain recomputed after every pick, the textbook definition) and `facility_location`,
asserts the two choose the same samples in the same order, and prints the table. Wall clock, one run each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.ifd import facility_kernel, facility_location  # noqa: E402


def plain_greedy(embeddings: np.ndarray, k: int, kernel: str) -> list[int]:
    """Every gain recomputed on every step from the stored kernel; ties to the lowest index."""
    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    sims = facility_kernel(x, x, kernel)
    cover = np.zeros(len(x))
    chosen: list[int] = []
    for _ in range(min(k, len(x))):
        gains = np.maximum(sims - cover[:, None], 0).sum(axis=0)
        gains[chosen] = -np.inf
        best = int(np.argmax(gains))
        chosen.append(best)
        cover = np.maximum(cover, sims[:, best])
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["2000x384x200", "5000x384x500"], help="rows x dims x picks")
    parser.add_argument("--kernels", nargs="+", default=["euclidean", "cosine"])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| rows x dims | picks | kernel | plain greedy s | lazy s | speed-up | selection |")
    print("|---|---:|---|---:|---:|---:|---|")
    for size in args.sizes:
        n, d, k = (int(v) for v in size.split("x"))
        centres = rng.normal(size=(50, d))
        emb = centres[rng.integers(0, 50, n)] + 0.7 * rng.normal(size=(n, d))
        for kernel in args.kernels:
            start = time.perf_counter()
            expected = plain_greedy(emb, k, kernel)
            plain_s = time.perf_counter() - start
            start = time.perf_counter()
            got = facility_location(emb, k, kernel)
            lazy_s = time.perf_counter() - start
            if got != expected:
                raise SystemExit(f"{size} {kernel}: lazy greedy chose differently from the plain greedy")
            print(f"| {n:,} x {d} | {k} | {kernel} | {plain_s:.2f} | {lazy_s:.2f} | {plain_s / lazy_s:.1f}x | identical |")


if __name__ == "__main__":
    main()
