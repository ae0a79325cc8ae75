"""Deita diversity filter: the blocked implementation vs the plain sequential loop, same selection asserted.

    .venv/bin/python bench/diversity_filter_bench.py                       # 100k x 1024 (both) + 1M x 1024 (blocked)
    .venv/bin/python bench/diversity_filter_bench.py --sizes 20000x256 --budget 2000

Embeddings are synthetic but shaped like real ones for this filter: half the rows fall in tight clusters whose
members have cosine similarity straddling tau (0.83-0.96), the rest are spread out; scores are rounded, so ties
are common. Large matrices are written to a memory-mapped .npy in --workdir (the filter reads only the rows of its
current block), so resident memory stays near the kept set and one block.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.deita_selection import (default_bound_dims, diversity_filter, diversity_filter_sequential,  # noqa: E402
                                   ranking_order, screen_dtype)


def synthetic_embeddings(path: Path | None, n: int, d: int, seed: int = 0, chunk: int = 50_000) -> np.ndarray:
    """[n, d] float32 (a memory map when `path` is given), generated chunk by chunk."""
    rng = np.random.default_rng(seed)
    n_clusters = max(1, n // 50)
    centers = rng.standard_normal((n_clusters, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    out = (np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d)) if path is not None
           else np.empty((n, d), dtype=np.float32))
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        noise = rng.standard_normal((m, d), dtype=np.float32) / np.float32(np.sqrt(d))
        clustered = rng.random(m) < 0.5
        block = noise
        sigma = rng.uniform(0.2, 0.45, int(clustered.sum())).astype(np.float32)[:, None]
        block[clustered] = centers[rng.integers(0, n_clusters, int(clustered.sum()))] + sigma * noise[clustered]
        out[start:start + m] = block
    if path is not None:
        out.flush()
    return out


def timed(fn, *args, pause: float = 0.0, **kwargs):
    """(result, seconds). `pause` first: BLAS and OpenMP worker threads spin for a while after a call, and on
    2 cores the previous implementation's spinning threads would slow the next one's start (up to 2x here)."""
    time.sleep(pause)
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["100000x1024", "1000000x1024"], help="NxD matrices to run")
    parser.add_argument("--budget", type=int, default=10_000, help="samples to keep")
    parser.add_argument("--tau", type=float, default=0.9)
    parser.add_argument("--block-size", type=int, default=1024, help="as DeitaSelection.filter_block_size")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the blocked filter runs (the sequential reference always runs on the CPU)")
    parser.add_argument("--precisions", nargs="+", default=["auto", "float32"],
                        help="screen precisions to time (as DeitaSelection.filter_precision)")
    parser.add_argument("--bound-dims", nargs="+", default=["auto", "0"],
                        help="bound screen widths to time (diversity_filter's bound_dims; 0: none)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of each implementation per size; the table shows the median (the first "
                             "blocked run of a process includes oneDNN's kernel compilation)")
    parser.add_argument("--reference-max-rows", type=int, default=100_000,
                        help="run the sequential loop (and assert identical selection) up to this many rows")
    parser.add_argument("--workdir", default=None, help="where large matrices are memory-mapped (default: a temp dir)")
    parser.add_argument("--memmap-from-rows", type=int, default=500_000, help="memory-map matrices from this size on")
    parser.add_argument("--pause", type=float, default=0.5, help="seconds of rest before each timed run")
    args = parser.parse_args()

    import torch  # imported before any timing

    torch.empty(1) @ torch.empty(1)
    if args.device == "cuda":  # context creation and kernel loading out of the first timing
        torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")

    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="deita-bench-") as tmp:
        for size in args.sizes:
            n, d = (int(v) for v in size.lower().split("x"))
            path = Path(tmp) / f"emb-{n}x{d}.npy" if n >= args.memmap_from_rows else None
            emb, t_gen = timed(synthetic_embeddings, path, n, d)
            scores = np.round(np.random.default_rng(1).random(n) * 100, 1)  # about n/1000 samples share each score
            order = ranking_order(scores)
            run_seq = n <= args.reference_max_rows
            times: dict[str, list[float]] = {}
            results = {}
            for _ in range(args.repeats):  # interleaved, so a noisy neighbour slows every implementation alike
                for precision in args.precisions:
                    for bound in args.bound_dims:
                        bound = bound if bound == "auto" else int(bound)
                        dims = default_bound_dims(d) if bound == "auto" else bound
                        label = (f"blocked, {args.device}, {screen_dtype(args.device, precision)}".replace("torch.", "")
                                 + (f", bound {dims + 1} dims" if dims else ", no bound"))
                        results[label], t = timed(diversity_filter, emb, order, args.tau, args.budget,
                                                  block_size=args.block_size, device=args.device, precision=precision,
                                                  bound_dims=bound, pause=args.pause)
                        times.setdefault(label, []).append(t)
                if run_seq:
                    results["sequential"], t = timed(diversity_filter_sequential, emb, order, args.tau, args.budget,
                                                     pause=args.pause)
                    times.setdefault("sequential", []).append(t)
            t_seq = float(np.median(times["sequential"])) if run_seq else None
            for label, result in results.items():
                if label == "sequential":
                    continue
                if run_seq:
                    assert np.array_equal(results["sequential"].selected, result.selected), f"{size}: selections differ"
                    assert results["sequential"].examined == result.examined
                t_fast = float(np.median(times[label]))
                rows.append((f"{n:,} x {d}", label, args.budget, len(result.selected), result.examined,
                             result.rejected, t_seq, t_fast, "identical" if run_seq else "(not run)"))
            print(f"{size}: generated in {t_gen:.1f}s; " + ", ".join(
                f"{k} {' '.join(f'{t:.2f}' for t in v)} s" for k, v in times.items()), file=sys.stderr, flush=True)
            del emb
            if path is not None:
                os.unlink(path)

    gpu = f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    print(f"\nDeita diversity filter, tau={args.tau}, torch {torch.__version__}, {torch.get_num_threads()} threads{gpu}, "
          f"block {args.block_size}, median of {args.repeats}\n")
    print("| embeddings | filter | budget | kept | examined | rejected | sequential s | blocked s | speed-up | selection |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for shape, label, budget, kept, examined, rejected, t_seq, t_fast, same in rows:
        seq_text = f"{t_seq:.2f}" if t_seq is not None else "-"
        ratio = f"{t_seq / t_fast:.1f}x" if t_seq is not None else "-"
        print(f"| {shape} | {label} | {budget:,} | {kept:,} | {examined:,} | {rejected:,} | {seq_text} | {t_fast:.2f} "
              f"| {ratio} | {same} |")


if __name__ == "__main__":
    main()
