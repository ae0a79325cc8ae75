"""Superfiltering (IFD v2): likelihood scores from a small scorer -> IFD subset -> optional diversity step.

Each step is its own cached stage task, so a failed step reruns alone and the steps before it show as Cached.
"""

from __future__ import annotations

from prefect import flow

from configs.ifd import SuperfilterFlowConfig, SuperfilterSelection
from flows.selection import warn_short_of_budget
from flows.wiring import fail_at_switch, run_stage_task
from tasks.data import prepare_records_task
from tasks.ifd import diversity_selection_task, ifd_selection_task
from tasks.score import score_task
from tasks.store import StageOutput
from tasks.track import tracked_run


def superfilter_stage_outputs(selection: SuperfilterSelection, records: StageOutput, output_format: str = "source",
                              parent_run_id: str | None = None) -> dict[str, StageOutput | None]:
    """Every Superfiltering stage's output; `selection` is the final subset (the diversity step's when enabled)."""
    scores = run_stage_task(score_task, records, selection.scoring,
                            parent_run_id=parent_run_id, log_config=selection.scoring)
    ifd = run_stage_task(ifd_selection_task, records, scores, selection, output_format,
                         parent_run_id=parent_run_id,
                         log_config=selection.model_dump(mode="json", exclude={"scoring", "diversity"}))
    diverse = None
    if selection.diversity is not None:
        diverse = run_stage_task(diversity_selection_task, records, ifd, selection, output_format,
                                 parent_run_id=parent_run_id, log_config=selection.diversity)
    return {"scores": scores, "ifd_selection": ifd, "diversity": diverse, "selection": diverse or ifd}


def superfilter_stages(selection: SuperfilterSelection, records: StageOutput, output_format: str = "source",
                       parent_run_id: str | None = None) -> StageOutput:
    """The Superfiltering stages on prepared records; returns the stage holding the final `subset.*`."""
    return superfilter_stage_outputs(selection, records, output_format, parent_run_id)["selection"]


@flow(name="pomona-superfilter", log_prints=True)
@fail_at_switch
def superfilter_flow(config: SuperfilterFlowConfig, fail_at: str | None = None) -> dict[str, StageOutput | None]:
    """Superfiltering selection on its own, tracked under one MLflow parent run.

    Args:
        config: Data, the Superfiltering selection (scorer, IFD rule, budget, optional diversity), output format.
        fail_at: Test-only. The Prefect task name of a stage (e.g. 'score-likelihood') that raises once Running, on
            this flow run's first attempt only; Retry the run (or rerun without it) to resume from the cache.
    """
    with tracked_run(config) as parent:
        records = run_stage_task(prepare_records_task, config.data, parent_run_id=parent, log_config=config.data)
        stages = superfilter_stage_outputs(config.selection, records, config.output_format, parent_run_id=parent)
        warn_short_of_budget(config.selection, stages["selection"], records)
    return {"records": records, **stages}
