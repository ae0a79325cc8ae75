"""Deita: score complexity -> score quality -> embed -> diversity filter, each a cached, tracked stage."""

from __future__ import annotations

from prefect import flow

from configs.deita import DeitaFlowConfig, DeitaSelection
from flows.selection import warn_short_of_budget
from flows.wiring import fail_at_switch, run_stage_task
from tasks.data import prepare_records_task
from tasks.deita import deita_complexity_task, deita_embed_task, deita_quality_task, deita_select_task
from tasks.store import StageOutput
from tasks.track import tracked_run


def deita_stages(selection: DeitaSelection, records: StageOutput, output_format: str = "source",
                 parent_run_id: str | None = None) -> StageOutput:
    """The Deita stages on prepared records; returns the stage holding `subset.*` (used by flows/selection.py)."""
    return deita_stage_outputs(selection, records, output_format, parent_run_id)["selection"]


def deita_stage_outputs(selection: DeitaSelection, records: StageOutput, output_format: str = "source",
                        parent_run_id: str | None = None) -> dict[str, StageOutput | None]:
    """Every Deita stage's output: complexity, quality (None when the score does not use it), embeddings, selection."""
    complexity = quality = None
    if selection.complexity_scorer is not None and selection.score in ("evol", "complexity"):
        complexity = run_stage_task(deita_complexity_task, records, selection.complexity_scorer,
                                    parent_run_id=parent_run_id, log_config=selection.complexity_scorer)
    if selection.quality_scorer is not None and selection.score in ("evol", "quality"):
        quality = run_stage_task(deita_quality_task, records, selection.quality_scorer,
                                 parent_run_id=parent_run_id, log_config=selection.quality_scorer)
    embeddings = run_stage_task(deita_embed_task, records, selection.embedding,
                                parent_run_id=parent_run_id, log_config=selection.embedding)
    subset = run_stage_task(deita_select_task, records, complexity, quality, embeddings, selection, output_format,
                            parent_run_id=parent_run_id,
                            log_config=selection.model_dump(mode="json", exclude={"complexity_scorer", "quality_scorer",
                                                                                  "embedding"}))
    return {"complexity": complexity, "quality": quality, "embeddings": embeddings, "selection": subset}


@flow(name="pomona-deita", log_prints=True)
@fail_at_switch
def deita_flow(config: DeitaFlowConfig, fail_at: str | None = None) -> dict[str, StageOutput | None]:
    """Deita selection on its own: records -> complexity -> quality -> embeddings -> filtered subset.

    Args:
        config: Data, the Deita selection (scorers, embedding, tau, budget), output format.
        fail_at: Test-only. The Prefect task name of a stage (e.g. 'deita-embed') that raises once Running, on this
            flow run's first attempt only; Retry the run (or rerun without it) to resume from the cache.
    """
    with tracked_run(config) as parent:
        records = run_stage_task(prepare_records_task, config.data, parent_run_id=parent, log_config=config.data)
        stages = deita_stage_outputs(config.selection, records, config.output_format, parent_run_id=parent)
        warn_short_of_budget(config.selection, stages["selection"], records)
    return {"records": records, **stages}
