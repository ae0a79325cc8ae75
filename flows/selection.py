"""One entry point for "select a subset with method X", shared by the pipeline and the comparison flow."""

from __future__ import annotations

from typing import Any

from flows.wiring import run_stage_task
from tasks.select import select_baseline_task
from tasks.store import StageOutput


def select_subset(selection: Any, records: StageOutput | None, output_format: str = "source",
                  parent_run_id: str | None = None) -> StageOutput:
    """Run the stages of `selection.method` on prepared records; returns the stage holding `subset.*`.

    `records` is None only for GRAPE reading a candidates file, which brings its own instructions.
    """
    if selection.method in ("random", "longest", "full"):
        return run_stage_task(select_baseline_task, records, selection, output_format,
                              parent_run_id=parent_run_id, log_config=selection)
    # Imported here so a baseline run does not import every method's models and tasks.
    if selection.method == "cherry":
        from flows.cherry import cherry_stages
        return cherry_stages(selection, records, output_format, parent_run_id)
    if selection.method == "superfilter":
        from flows.superfilter import superfilter_stages
        return superfilter_stages(selection, records, output_format, parent_run_id)
    if selection.method == "grape":
        from flows.grape import grape_stages
        return grape_stages(selection, records, output_format, parent_run_id=parent_run_id)["selection"]
    if selection.method == "deita":
        from flows.deita import deita_stages
        return deita_stages(selection, records, output_format, parent_run_id=parent_run_id)
    raise ValueError(f"selection method {selection.method!r} is not wired into flows/selection.py")
