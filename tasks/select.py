"""Selection: the shared subset writer, the baselines (random, longest, full), and their stage.

Every selection method ends the same way: a list of chosen record ids is written as `selected_ids.txt`, as
`subset.jsonl` in the user's own format, and as `subset.messages.jsonl` for TRL, always in input order.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

from configs.errors import ConfigError
from configs.selection import FullSelection, LongestSelection, RandomSelection
from tasks.data import Record, atomic_write_text, load_canonical, write_records
from tasks.store import StageOutput, file_digest, run_stage, stage_task

SUBSET_FILES = ["selected_ids.txt", "subset.jsonl", "subset.messages.jsonl"]


def write_subset(records: list[Record], selected: set[str] | list[str], folder: Path, method: str,
                 output_format: Literal["source", "alpaca", "sharegpt", "messages"] = "source") -> dict:
    """Write the chosen records in input order; returns the StageOutput fields every selection shares."""
    chosen_ids = set(selected)
    unknown = chosen_ids - {r.id for r in records}
    if unknown:
        raise ValueError(f"selection returned ids that are not in the input: {sorted(unknown)[:5]}")
    chosen = [r for r in records if r.id in chosen_ids]
    if not chosen:  # the methods say which of their rules removed everything before this; this is the backstop
        raise ConfigError(f"{method}: the selection kept none of the {len(records)} candidates, so there is no "
                          "subset to write: loosen the method's settings (see its counts in the log)")
    atomic_write_text(folder / "selected_ids.txt", "".join(r.id + "\n" for r in chosen))
    write_records(chosen, folder / "subset.jsonl", output_format)
    write_records(chosen, folder / "subset.messages.jsonl", "messages")
    digest = file_digest(folder / "subset.messages.jsonl")[:16]
    return {
        "artifacts": ["selected_ids.txt", "subset.jsonl"],
        "datasets": [{"name": f"{method}-subset", "file": "subset.messages.jsonl", "context": "training", "digest": digest}],
        "metrics": {"selected": len(chosen), "candidates": len(records)},
    }


def budget_shortfall(selection, subset: StageOutput, records: StageOutput | None) -> tuple[int, int]:
    """(asked, shortfall) of a selection with a fixed budget: asked = the budget (Superfiltering.D: its diversity
    budget), capped at the records in the pool; shortfall = how many fewer than that the subset holds. A filter
    can leave fewer candidates than the budget (IFD > 1 dropped, Deita's near-duplicates, unscored records), and
    then a comparison is no longer at one data size. (0, 0) for a share, whose base differs by method, and for
    methods without a budget."""
    diversity = getattr(selection, "diversity", None)
    budget = diversity.budget if diversity is not None else getattr(selection, "budget", None)
    if budget is None:
        return 0, 0
    # GRAPE on a candidates file has no records stage: its pool is the file's instructions
    pool = int(records.metrics["records_used"]) if records is not None else int(subset.metrics["instructions"])
    asked = min(budget, pool)
    return asked, max(0, asked - int(subset.metrics["selected"]))


def nothing_selected(stage: str, records_out: StageOutput, rule: str) -> ConfigError:
    """The error of a selection whose filter removed every record: the data file and its counts, then `rule` (what
    removed them and what to change), so an empty subset never passes as a finished selection."""
    m = records_out.metrics
    # records stages finished before data_path was recorded are named by their folder
    source = records_out.params.get("data_path") or f"the records in {records_out.path}"
    counts = (f"{int(m.get('records_read', 0))} read, {int(m.get('records_rejected', 0))} rejected, "
              f"{int(m.get('records_used', 0))} used")
    return ConfigError(f"{stage}: nothing selected from {source} ({counts}): {rule}")


def select_random(ids: list[str], count: int, seed: int) -> list[str]:
    """`count` ids drawn uniformly without replacement with a fixed seed, returned in input order."""
    picked = set(random.Random(seed).sample(ids, count))
    return [i for i in ids if i in picked]


def select_longest(records: list[Record], count: int) -> list[str]:
    """The `count` records with the longest responses (characters, all turns); ties keep input order."""
    order = sorted(range(len(records)), key=lambda i: -sum(len(a or "") for _, a in records[i].turns()))
    keep = set(order[:count])
    return [r.id for i, r in enumerate(records) if i in keep]


def baseline_selection(records_out: StageOutput, config: RandomSelection | LongestSelection | FullSelection,
                       output_format: str = "source") -> StageOutput:
    """Stage `select-<method>` for the baselines."""

    def body(folder: Path) -> dict:
        records = load_canonical(records_out.file("records.jsonl"))
        if config.method == "random":
            ids = select_random([r.id for r in records], config.count(len(records)), config.seed)
        elif config.method == "longest":
            ids = select_longest(records, config.count(len(records)))
        else:
            ids = [r.id for r in records]
        fields = write_subset(records, ids, folder, config.method, output_format)
        fields["summary"] = f"{config.method}: kept **{len(ids)}** of {len(records)} records."
        return fields

    return run_stage(f"select-{config.method}", {"selection": config, "output_format": output_format},
                     [records_out], body, digest_of=SUBSET_FILES)


select_baseline_task = stage_task(baseline_selection, name="select-baseline")
