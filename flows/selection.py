"""One entry point for "select a subset with method X", shared by the pipeline and the comparison flow."""

from __future__ import annotations

from typing import Any

from flows.wiring import run_stage_task
from tasks.select import budget_shortfall, select_baseline_task
from tasks.store import StageOutput


def select_subset(selection: Any, records: StageOutput | None, output_format: str = "source",
                  parent_run_id: str | None = None) -> StageOutput:
    """Run the stages of `selection.method` on prepared records; returns the stage holding `subset.*`.

    `records` is None only for GRAPE reading a candidates file, which brings its own instructions. A subset
    smaller than its fixed budget is warned about in the run's log.
    """
    subset = _method_stages(selection, records, output_format, parent_run_id)
    warn_short_of_budget(selection, subset, records)
    return subset


def warn_short_of_budget(selection: Any, subset: StageOutput, records: StageOutput | None) -> None:
    """Say in the run's log when a method's filters left fewer samples than its fixed budget (every flow that
    selects calls this: the pipeline and comparison through `select_subset`, the method flows directly)."""
    asked, short = budget_shortfall(selection, subset, records)
    if short:
        from prefect.logging import get_run_logger

        get_run_logger().warning(
            "%s kept %d samples, %d fewer than the %d asked: its filters left no more (the stage's summary and "
            "counts say which); a comparison is then not at one data size", selection.method,
            int(subset.metrics["selected"]), short, asked)


def _method_stages(selection: Any, records: StageOutput | None, output_format: str,
                   parent_run_id: str | None) -> StageOutput:
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
