"""GRAPE fit scoring: candidates scored per second with prefix reuse vs K independent passes.

Prefix reuse runs each instruction's prompt once and scores its K candidates from the prompt's KV cache
(`models.fit.fit_with_prefix_reuse`); the baseline scores prompt + response K times through the likelihood engine
(`models.fit.fit_plain`). The gain grows with the prompt's share of the tokens and with K.

Candidates come from the real two-model files in ../shared/data/candidates (Answer1, Answer2); for K > 2 the
extra candidates are the same answers cut at 90%, 80%, ... of their words (content does not matter for speed).

    .venv/bin/python bench/grape_prefix_bench.py --model pomona-runs/models/smollm2-135m-instruct --datasets lima vicuna \
        --ks 2 4 --instructions 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("POMONA_HOME", str(REPO / "pomona-runs"))


def k_candidates(answers: list[str], k: int) -> list[str]:
    out = []
    for j in range(k):
        words = answers[j % len(answers)].split(" ")
        keep = max(1, int(len(words) * (1 - 0.1 * (j // len(answers)))))
        out.append(" ".join(words[:keep]))
    return out


def build_groups(tok, dataset: str, n: int, k: int, max_response_tokens: int):
    from configs.grape import CandidatesFile
    from models.fit import CandidateGroup, candidate_tokens
    from tasks.grape import group_candidates, read_candidates_file

    path = REPO.parent / "shared" / "data" / "candidates" / f"{dataset}_two_models.json"
    instructions, rows, _ = read_candidates_file(CandidatesFile(path=str(path), limit=n))
    by_instruction = group_candidates(rows)
    groups = []
    for record in instructions:
        answers = [r["response"] for r in by_instruction[record.id]]
        tokens = candidate_tokens(tok, record.messages, k_candidates(answers, k), record.id)
        groups.append(CandidateGroup(tokens[0].prompt_ids,
                                     tuple(t.target_ids(True)[:max_response_tokens] for t in tokens)))
    return groups


def interleaved_best(first, second, repeats: int, clock) -> tuple[float, object, float, object]:
    """Best time of each of two functions, run alternately so a shared machine's load hits both alike."""
    best = [float("inf"), float("inf")]
    results = [None, None]
    for _ in range(repeats):
        for j, fn in enumerate((first, second)):
            start = clock()
            results[j] = fn()
            best[j] = min(best[j], clock() - start)
    return best[0], results[0], best[1], results[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny:0", help="Target model: a folder or tiny:<seed>.")
    parser.add_argument("--datasets", nargs="+", default=["lima", "vicuna"])
    parser.add_argument("--ks", nargs="+", type=int, default=[2, 4, 8], help="Candidates per instruction.")
    parser.add_argument("--instructions", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-response-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="Best of N timings (the machine is shared).")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="'cpu' = this process's CPU seconds (steadier on a shared machine; use --threads 1).")
    args = parser.parse_args()

    import torch

    from configs.schema import ModelConfig
    from models.fit import fit_plain, fit_with_prefix_reuse
    from models.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    model, tok = load_model(ModelConfig(name_or_path=args.model))
    rows = []
    for dataset in args.datasets:
        for k in args.ks:
            groups = build_groups(tok, dataset, args.instructions, k, args.max_response_tokens)
            n_cands = sum(len(g.targets) for g in groups)
            fit_with_prefix_reuse(model, groups[:1], batch_size=args.batch_size, pad_id=tok.pad_token_id)  # warm-up
            t_plain, plain, t_reuse, reuse = interleaved_best(
                lambda: fit_plain(model, groups, args.batch_size, tok.pad_token_id),
                lambda: fit_with_prefix_reuse(model, groups, args.batch_size, tok.pad_token_id), args.repeats, clock)
            diff = max(abs(a.mean_nll - b.mean_nll) for ga, gb in zip(plain, reuse) for a, b in zip(ga, gb))
            rows.append({
                "dataset": dataset, "K": k, "instructions": len(groups), "candidates": n_cands,
                "prompt_tok": statistics.fmean(len(g.prompt_ids) for g in groups),
                "response_tok": statistics.fmean(len(t) for g in groups for t in g.targets),
                "plain_cand_s": n_cands / t_plain, "reuse_cand_s": n_cands / t_reuse, "ratio": t_plain / t_reuse,
                "max_abs_diff_mean_nll": diff})
            print(f"done: {dataset} K={k}: plain {t_plain:.2f}s, reuse {t_reuse:.2f}s", file=sys.stderr, flush=True)
    print(f"\nmodel {args.model}, batch size {args.batch_size}, torch threads {torch.get_num_threads()}, "
          f"best of {args.repeats}, {args.clock} clock (cand_s = candidates per {args.clock} second)\n")
    header = ["dataset", "K", "instructions", "candidates", "prompt_tok", "response_tok", "plain_cand_s",
              "reuse_cand_s", "ratio", "max_abs_diff_mean_nll"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = []
        for key in header:
            value = row[key]
            cells.append(f"{value:.2e}" if key.startswith("max_abs") else f"{value:.2f}" if isinstance(value, float)
                         else str(value))
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
