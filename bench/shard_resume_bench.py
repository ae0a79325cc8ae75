"""Resuming a sharded stage: finding the shards left to compute, per-shard `done()` (before) vs one `todo()`.

    .venv/bin/python bench/shard_resume_bench.py --shards 200 750 2000

A stage killed half way has `shards / 2` shards recorded in its manifest; a rerun first lists the shards still to
compute. `done()` reads the manifest and sha256-hashes every recorded shard, so asking it once per shard (as the
score, Deita and evaluation stages did) costs shards x recorded hashes; `todo()` checks once. Shards hold 16 rows
of a score-table-like row (the tiny recipes' shard_size), so the hashing, not the disk, dominates.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    from tasks.store import ShardedTable

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, nargs="+", default=[200, 750])
    parser.add_argument("--rows", type=int, default=16, help="rows per shard")
    args = parser.parse_args()
    print("| shards | recorded | per-shard done() s | todo() s | same list |")
    print("|---:|---:|---:|---:|:---:|")
    for count in args.shards:
        with tempfile.TemporaryDirectory() as folder:
            table = ShardedTable(folder)
            for shard in range(count // 2):
                table.write(shard, [{"index": shard * args.rows + i, "id": f"{shard}-{i}", "status": "scored",
                                     "cond_mean_nll": 1.5, "direct_mean_nll": 1.6} for i in range(args.rows)])
            start = time.perf_counter()
            before = [s for s in range(count) if s not in table.done()]
            middle = time.perf_counter()
            after = table.todo(count)
            end = time.perf_counter()
            print(f"| {count} | {count // 2} | {middle - start:.2f} | {end - middle:.3f} | {before == after} |")


if __name__ == "__main__":
    main()
