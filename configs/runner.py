"""Scale-out: which Prefect task runner maps a long stage's shards (generation, scoring, embedding)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from configs.schema import RUNTIME_ONLY, StrictModel


class ScaleOutConfig(StrictModel):
    """Where shards run: threads of this process, or a Dask cluster (local, or an existing scheduler)."""

    engine: Literal["threads", "dask"] = Field(
        "threads", description="'threads': a thread pool in the stage's process (one accelerator). "
                               "'dask': prefect-dask's DaskTaskRunner on a local or remote Dask cluster.")
    workers: int = Field(1, ge=1, description="Threads ('threads') or worker processes of a local Dask cluster; "
                                             "with 'address', the cluster's worker count (it sizes the shards "
                                             "in flight).")
    threads_per_worker: int = Field(1, ge=1, description="Dask only: threads inside each local worker process.")
    address: str | None = Field(
        None, description="Dask only: an existing scheduler (e.g. 'tcp://10.0.0.5:8786'); no local cluster then.")
    cluster_class: str = Field(
        "distributed.LocalCluster",
        description="Dask only: the local cluster class; 'dask_cuda.LocalCUDACluster' gives one worker per GPU.")
    processes: bool = Field(True, description="Dask local cluster: workers as processes (True) or threads (False).")

    @property
    def max_in_flight(self) -> int:
        """Shards submitted and not yet written at once: two per worker slot, so a slot finds its next shard
        queued while the stage's process writes the last one, and only this many results are held in memory."""
        return 2 * self.workers * self.threads_per_worker

    @model_validator(mode="after")
    def _dask_options_need_dask(self):
        if self.engine == "threads":
            defaults = type(self).model_fields
            dask_only = [name for name in ("address", "cluster_class", "threads_per_worker", "processes")
                         if getattr(self, name) != defaults[name].default]
            if dask_only:
                raise ValueError(f"{', '.join(dask_only)}: Dask options, ignored with engine: threads (set engine: dask)")
        return self


def scale_out_field(verb: str):
    """The `scale_out` field of a long stage's config: which task runner computes its shards (`verb`: 'Score')."""
    return Field(None, json_schema_extra=RUNTIME_ONLY,
                 description=f"{verb} shards as Prefect task runs on a task runner (threads or a Dask cluster, e.g. one "
                             f"worker per GPU); None runs them one after another in the stage's process. Not part of "
                             f"the cache key: the same results either way.")
