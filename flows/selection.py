"""One entry point for "select a subset with method X", shared by the pipeline and the comparison flow."""

from __future__ import annotations

from typing import Any

from flows.wiring import run_stage_task
from tasks.select import select_baseline_task
from tasks.store import StageOutput


def select_subset(selection: Any, records: StageOutput, output_format: str = "source",
                  parent_run_id: str | None = None) -> StageOutput:
    """Run the stages of `selection.method` on prepared records; returns the stage holding `subset.*`."""
    if selection.method in ("random", "longest", "full"):
        return run_stage_task(select_baseline_task, records, selection, output_format,
                              parent_run_id=parent_run_id, log_config=selection)
    raise ValueError(f"selection method {selection.method!r} is not wired into flows/selection.py")
