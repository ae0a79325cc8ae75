"""The one helper flows share: run a stage task, then log it to MLflow (cached or not)."""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from configs.settings import store_root
from tasks.store import StageOutput, load_finished
from tasks.track import log_stage


class InjectedFailure(RuntimeError):
    """Raised by the stage named in a flow's test-only `fail_at` parameter."""


# Test-only switch: the Prefect task name (e.g. "select-baseline") that must fail on the run's first attempt.
_FAIL_AT: contextvars.ContextVar[dict | None] = contextvars.ContextVar("pomona_fail_at", default=None)


@contextlib.contextmanager
def fail_at_stage(stage: str | None) -> Iterator[None]:
    """Make the stage task named `stage` fail once it is Running, on the first attempt of this flow run only.

    So a UI "Retry" (same flow run, run_count 2) or a new run with `fail_at=None` passes. Nothing of the failed
    attempt is cached (Prefect caches only completed tasks; the stage writes no `_SUCCESS`). A name that matches
    no stage is an error, so a typo cannot make a test pass silently: a name no pomona stage has is refused before
    any stage runs (`check_fail_at`), and one that is a stage of other flows only, when this flow ends.
    """
    if not stage:
        yield
        return
    check_fail_at(stage)
    from prefect.runtime import flow_run

    seen: dict = {"stage": stage, "first_attempt": flow_run.get_run_count() <= 1, "ran": []}
    token = _FAIL_AT.set(seen)
    try:
        yield
    finally:
        _FAIL_AT.reset(token)
    if stage not in seen["ran"]:
        from configs.errors import ConfigError

        raise ConfigError(f"fail_at={stage!r} matched no stage of this flow; stages run: {seen['ran']}")


def check_fail_at(stage: str) -> None:
    """Refuse a `fail_at` that names no stage task at all, listing the names (the closest first when one is near);
    otherwise a typo is found only after every stage of the run has computed."""
    import difflib

    from configs.errors import ConfigError
    from tasks.store import stage_task_names

    names = stage_task_names()
    if stage in names:
        return
    close = difflib.get_close_matches(stage, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"fail_at={stage!r} matched no stage: it names no stage task of pomona; {hint}"
                      f"stage tasks are: {', '.join(names)}")


def _failing_copy(stage_task):
    """A task with the stage's name and signature that raises once Running; never cached, so it always runs."""
    from prefect import Task
    from prefect.cache_policies import NO_CACHE

    @functools.wraps(stage_task.fn)
    def injected(*args: Any, **kwargs: Any):
        raise InjectedFailure(f"stage {stage_task.name!r} failed on purpose (test-only switch fail_at={stage_task.name!r}); "
                              "Retry the flow run or rerun it without fail_at")

    return Task(fn=injected, name=stage_task.name, cache_policy=NO_CACHE, retries=0)


def run_stage_task(stage_task, *args: Any, parent_run_id: str | None = None, log_config: Any = None,
                   **kwargs: Any) -> StageOutput:
    """Call a cached stage task; its child MLflow run is tagged `pomona.cached=true` when Prefect reused it or the
    stage found its output finished in the store."""
    injected = _FAIL_AT.get()
    if injected is not None:
        injected["ran"].append(stage_task.name)
        if injected["stage"] == stage_task.name and injected["first_attempt"]:
            stage_task = _failing_copy(stage_task)
    state = stage_task(*args, return_state=True, **kwargs)
    out: StageOutput = state.result()  # raises the task's exception when it failed
    if state.name == "Cached" and not still_in_store(out):
        # Prefect's cache outlives the store: a stage folder deleted to free disk must be recomputed, not handed
        # on as a path to nothing (the stage's own store lookup then misses and the body runs).
        from prefect.logging import get_run_logger

        get_run_logger().warning("stage %s: Prefect's cached result points at %s, which is no longer a finished "
                                 "stage folder in this home; running the stage task again: it reuses the stage's "
                                 "finished folder in this home if there is one (a moved home), else computes it",
                                 stage_task.name, out.path)
        state = stage_task.with_options(refresh_cache=True)(*args, return_state=True, **kwargs)
        out = state.result()
    if parent_run_id:
        log_stage(parent_run_id, out, config=log_config, cached=state.name == "Cached" or out.reused)
    return out


def still_in_store(out: StageOutput) -> bool:
    """Whether `out`'s folder, in this home's store, still holds the finished stage it describes (not deleted, not
    replaced)."""
    folder = Path(out.path)
    if not folder.is_relative_to(store_root()):  # a result cached by a home since moved, or another home's folder
        return False
    finished = load_finished(folder)
    return finished is not None and finished.key == out.key and finished.digest == out.digest


def fail_at_switch(flow_fn):
    """Decorate a flow function that has a `fail_at` parameter: arms `fail_at_stage` around its body."""
    import inspect

    # Resolved annotations: Prefect validates parameters against the wrapper, whose module globals are these.
    signature = inspect.signature(flow_fn, eval_str=True)

    @functools.wraps(flow_fn)
    def wrapper(*args: Any, **kwargs: Any):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        with fail_at_stage(bound.arguments.get("fail_at")):
            return flow_fn(*args, **kwargs)

    wrapper.__signature__ = signature
    return wrapper
