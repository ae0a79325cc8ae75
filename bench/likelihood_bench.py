"""Likelihood engine vs the reference's one-sample loops: tokens/s, speed-up, and share of the machine's limit.

    .venv/bin/python bench/likelihood_bench.py --model tiny:0 --records 200
    .venv/bin/python bench/likelihood_bench.py --model pomona-runs/models/smollm2-135m-instruct --records 32

All score the same requests (Cherry `wiz` pairs of real Alpaca rows from ../shared/data, conditioned + direct).
Two yardsticks: the plain one-sample loop (`model(ids, labels=...).loss`, "vs loop"), and Cherry's own scoring loop,
which also walks every position in Python for its per-token loss list ("vs Cherry"; `cherry_token_loop_scores`).
Tokenization is outside every timing (the requests are built once, before).
"tokens" = every token of every scored sequence (the forward pass covers them all). The limit is
2 x parameters x tokens FLOPs at the matrix-multiply rate measured in this same run (fp32 on CPU, the model's dtype
on CUDA), so "of limit" = achieved 2·P·tokens/s over that rate, taken at its best burst in this run. "of
sustained" divides by the matmul's sustained rate instead (median of two-second runs between the timed ones): on a
shared machine a 30-second scoring run cannot keep the best burst's pace even with nothing but matmuls to do.
Timings are wall clock on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def matmul_flops(device: str, dtype, size: int = 1024, seconds: float = 2.0) -> tuple[float, float]:
    """(best, sustained) FLOP/s of a square matmul over `seconds`: the best short burst is the arithmetic ceiling
    of a quiet moment; the sustained rate (all the work over all the time) is what a long run on this shared
    machine can expect while its neighbours are as busy as they are now."""
    import torch

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    reps = 10 if device == "cuda" else 2
    best, done = 0.0, 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, reps * 2 * size ** 3 / (time.perf_counter() - t0))
        done += reps
    return best, done * 2 * size ** 3 / (time.perf_counter() - start)


def exact_mean_nlls(model, requests) -> list[float]:
    """Mean NLL of each request with the LM head and softmax in float64 over the model's own hidden states: the
    yardstick for whether the engine or the loop is off when they disagree (the body is the same in both)."""
    import torch

    from models.likelihood import split_head

    split = split_head(model)
    out = []
    with torch.inference_mode():
        weight = split.head.weight.double()
        bias = None if getattr(split.head, "bias", None) is None else split.head.bias.double()
        for request in requests:
            start = max(1, request.target_start)
            ids = torch.tensor([request.input_ids], device=next(model.parameters()).device)
            hidden = split.body(input_ids=ids).last_hidden_state[0, start - 1:-1].double()
            logits = split.transform(torch.nn.functional.linear(hidden, weight, bias))
            out.append(float(torch.nn.functional.cross_entropy(logits, ids[0, start:], reduction="mean")))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny:0", help="tiny:<seed>, a local HF folder, or a hub name")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "alpaca_cherry_5pct.json"))
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--template", default="wiz")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[16],
                        help="most rows per forward pass; several values = one engine row each")
    parser.add_argument("--max-batch-tokens", nargs="+", default=["auto"],
                        help="padded tokens per forward pass: integers, or 'auto' (the engine's device default); "
                             "every batch-size x max-batch-tokens pair is an engine row")
    parser.add_argument("--loop-records", type=int, default=None,
                        help="score only this many records with the loops (both yardsticks)")
    parser.add_argument("--no-cherry-loop", action="store_true", help="leave Cherry's per-token loop out")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run engine and loop this many times, interleaved, and report the medians (the shared "
                             "machines here swing 10-30 %% between runs)")
    args = parser.parse_args()

    import torch

    from configs.schema import ModelConfig
    from configs.settings import prepare_environment
    from models.likelihood import batch_token_budget, cherry_token_loop_scores, reference_scores, score_requests
    from models.loading import load_model
    from models.templates import build_pair

    prepare_environment()
    model, tok = load_model(ModelConfig(name_or_path=args.model))
    device = str(next(model.parameters()).device).split(":")[0]
    dtype = next(model.parameters()).dtype
    params = sum(p.numel() for p in model.parameters())
    rows = json.loads(Path(args.data).read_text())[:args.records]
    pairs = [build_pair(args.template, tok, r["instruction"], r.get("input", ""), r["output"], args.max_length) for r in rows]
    requests = [q for p in pairs if p.skip_reason is None for q in (p.conditioned, p.direct)]
    loop_requests = requests[:2 * args.loop_records] if args.loop_records else requests
    tokens = sum(len(r.input_ids) for r in requests)
    loop_tokens = sum(len(r.input_ids) for r in loop_requests)

    def timed(fn):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    pad = int(tok.pad_token_id or 0)
    settings = [(rows_cap, batch_token_budget(device, cap if cap == "auto" else int(cap), model.config.hidden_size))
                for rows_cap in args.batch_size for cap in args.max_batch_tokens]
    score_requests(model, requests[:4], batch_size=settings[0][0], pad_id=pad)  # warm-up
    reference_scores(model, requests[:2])
    cherry_token_loop_scores(model, requests[:2])
    matmul_dtype = torch.float32 if device == "cpu" else dtype
    bests, sustained = [], []
    engine_times: dict[tuple, list[float]] = {s: [] for s in settings}
    loop_times, cherry_times = [], []
    for _ in range(args.repeats):  # interleaved, so a noisy neighbour slows every variant alike
        best, steady = matmul_flops(device, matmul_dtype)
        bests.append(best)
        sustained.append(steady)
        for rows_cap, cap in settings:
            result, seconds = timed(lambda: score_requests(model, requests, batch_size=rows_cap, pad_id=pad,
                                                           max_batch_tokens=cap))
            engine_times[(rows_cap, cap)].append(seconds)
            if (rows_cap, cap) == settings[0]:
                engine = result
        loop, seconds = timed(lambda: reference_scores(model, loop_requests))
        loop_times.append(seconds)
        if not args.no_cherry_loop:
            cherry, seconds = timed(lambda: cherry_token_loop_scores(model, loop_requests))
            cherry_times.append(seconds)
    t_loop = statistics.median(loop_times)
    t_cherry = statistics.median(cherry_times) if cherry_times else math.nan
    best, steady = matmul_flops(device, matmul_dtype)
    limit = max(bests + [best])  # the limit: the matmul rate at its best in this run
    steady_limit = statistics.median(sustained + [steady])
    gaps = [abs(a.mean_nll - b.mean_nll) for a, b in zip(engine, loop)]
    diff = max(gaps)
    worst = sorted(range(len(gaps)), key=gaps.__getitem__)[-8:]
    exact = dict(zip(worst, exact_mean_nlls(model, [loop_requests[i] for i in worst])))

    loop_rate = loop_tokens / t_loop
    cherry_rate = loop_tokens / t_cherry

    def row(name, n_tok, secs):
        rate = n_tok / secs
        vs_cherry = f"{rate / cherry_rate:.2f}x" if cherry_times else "-"
        return (f"| {name} | {n_tok} | {secs:.2f} | {rate:,.0f} | {rate / loop_rate:.2f}x | {vs_cherry} | "
                f"{2 * params * rate / 1e9:.1f} | {2 * params * rate / limit:.0%} | {2 * params * rate / steady_limit:.0%} |")

    print(f"\nmodel {args.model} ({params / 1e6:.1f}M params, {dtype}, {device}, {torch.get_num_threads()} threads); "
          f"{len(rows)} records, template {args.template}, max_length {args.max_length}, "
          f"{len(requests)} sequences; matmul limit {limit / 1e9:.1f} GFLOP/s (best burst; sustained "
          f"{steady_limit / 1e9:.1f}, median of {len(sustained) + 1} two-second runs between the timed ones)\n")
    print("| method | tokens | seconds | tokens/s | vs loop | vs Cherry | GFLOP/s (2·P·tok/s) | of limit | of sustained |")
    print("|---|---|---|---|---|---|---|---|---|")
    if cherry_times:
        print(row("Cherry's loop, per-token losses (data_analysis.py)", loop_tokens, t_cherry))
    print(row("one-sample loop, HF loss (reference)", loop_tokens, t_loop))
    for rows_cap, cap in settings:
        print(row(f"engine (batch {rows_cap}, {cap} tok)", tokens, statistics.median(engine_times[(rows_cap, cap)])))
    print(f"\nengine: batch {settings[0][0]}, {settings[0][1]} tok; max |mean NLL engine - loop| over {len(loop)} "
          f"sequences: {diff:.2e}; on the {len(worst)} sequences where they differ most, against a float64 head "
          f"and softmax: engine within "
          f"{max(abs(engine[i].mean_nll - exact[i]) for i in worst):.2e}, loop within "
          f"{max(abs(loop[i].mean_nll - exact[i]) for i in worst):.2e}")
    if cherry_times:
        print(f"max |mean NLL engine - Cherry's per-token loop|: "
              f"{max(abs(a.mean_nll - b.mean_nll) for a, b in zip(engine, cherry)):.2e}")
    if args.repeats > 1:
        for (rows_cap, cap), times in engine_times.items():
            print(f"single runs, seconds: engine batch {rows_cap}, {cap} tok: {' '.join(f'{t:.2f}' for t in times)}")
        print(f"single runs, seconds: loop {' '.join(f'{t:.2f}' for t in loop_times)}")
        if cherry_times:
            print(f"single runs, seconds: Cherry's loop {' '.join(f'{t:.2f}' for t in cherry_times)}")


if __name__ == "__main__":
    main()
