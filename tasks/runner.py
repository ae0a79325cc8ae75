"""Map a long stage over its shards with a Prefect task runner: threads here, or Dask (prefect-dask).

A stage that writes a `ShardedTable` splits its input into shards and calls `map_shards(shard_rows, n, table,
scale_out, ...)`. Each shard not yet in the table's manifest becomes one Prefect task run (`<name>-shard`, visible
in the UI) on the configured runner; the rows it returns are written by the calling process, one shard at a time,
so the manifest has a single writer however many workers compute. A bounded window of shards is in flight
(`ScaleOutConfig.max_in_flight`): the next is submitted as one is written, so memory holds a few shards' rows,
not the stage's. A killed or failed run resumes at the first
shard missing from the manifest. Shard functions must be module-level (picklable) and load what they need from
paths (a model per worker, cached in the worker), never receive a model object.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from configs.runner import ScaleOutConfig
from tasks.store import ShardedTable


@functools.lru_cache(maxsize=2)
def worker_records(records_path: str):
    """A stage's canonical records, read once per worker process (its shards all slice the same file)."""
    from tasks.data import load_canonical

    return load_canonical(records_path)


def model_files_stamp(*models) -> str:
    """What a worker's cache of loaded models must see of the `ModelConfig`s' local folders: their
    `path_fingerprint` (a folder retrained in place is a new stage key, and must not be served the weights this
    process loaded before); "" for a hub or tiny name."""
    from pathlib import Path

    from tasks.store import path_fingerprint

    paths = [Path(m.name_or_path).expanduser() for m in models if m is not None]
    return ";".join(path_fingerprint(p) if p.exists() else "" for p in paths)


class _Entry:
    def __init__(self, stamp: str, value: Any):
        self.stamp = stamp
        self.value = value
        self.users = 0  # shards using the value now
        self.evicted = False  # out of the cache: closed by its last user


class WorkerCache:
    """Loaded objects (models, scorers, generators) kept by a worker process for the shards it computes.

    An entry is keyed by what identifies its config and holds the stamp of its model files (`model_files_stamp`):
    a request with another stamp (a folder retrained in place) closes the old entry and loads again. At most
    `size` entries, least recently used evicted first, and before the new one loads: a generator's vLLM engine
    reserves most of the GPU, so the next one can only load once the last is closed. An evicted entry is closed
    (`close()`, where it has one) at once, or, while a shard still uses it, when that shard is done.

    Dask workers and the threads engine run shards in threads of one process: one lock covers lookups and loads,
    so concurrent shards of a stage load their model once (a load blocks the process's other shards meanwhile).
    """

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        _WORKER_CACHES.append(self)

    @contextmanager
    def use(self, key: Hashable, stamp: str, load: Callable[[], Any]) -> Iterator[Any]:
        """The value cached for `key` and `stamp`, loaded by `load()` if there is none, for a `with` block."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.stamp != stamp:
                self._evict(key)
                entry = None
            if entry is None:
                while len(self._entries) >= self.size:
                    self._evict(next(iter(self._entries)))
                entry = self._entries[key] = _Entry(stamp, load())
            self._entries.move_to_end(key)
            entry.users += 1
        try:
            yield entry.value
        finally:
            with self._lock:
                entry.users -= 1
                if entry.evicted and not entry.users:
                    _close(entry.value)

    def drop_idle(self) -> None:
        """Drop (and close) every entry no shard uses now. One whose close() fails does not keep the others loaded:
        all are dropped, then the first error is raised."""
        with self._lock:
            first_error(self._evict, [k for k, entry in self._entries.items() if not entry.users])

    def _evict(self, key: Hashable) -> None:
        entry = self._entries.pop(key)
        entry.evicted = True
        if not entry.users:
            _close(entry.value)


_WORKER_CACHES: list[WorkerCache] = []


def release_worker_caches() -> None:
    """Drop what the worker caches of this process hold and no shard uses. A stage calls it when it ends, here for
    the threads engine and on every worker of an external Dask cluster (`release_worker_caches_in_a_thread`): both
    processes outlive the stage, and a Deita scorer, a Cherry scorer or a vLLM engine kept there would hold its
    memory (GPU memory included) through every later stage (a training on the same GPU), where the in-process path
    loads per stage and lets go. A later stage of the same model loads it again."""
    first_error(WorkerCache.drop_idle, _WORKER_CACHES)


def first_error(action: Callable[[Any], Any], items: Iterable[Any]) -> None:
    """`action(item)` for every item, even after one raises; then the first error is raised."""
    failure: Exception | None = None
    for item in items:
        try:
            action(item)
        except Exception as exc:
            failure = failure or exc
    if failure is not None:
        raise failure


async def release_worker_caches_in_a_thread() -> None:
    """`release_worker_caches` for `Client.run`: in a thread of the worker, not on its event loop, which a close
    waiting for another stage's model load (the cache lock) would hold up, heartbeats and all."""
    import asyncio

    await asyncio.to_thread(release_worker_caches)


def release_cached_models(release: Callable[[], Any], whose: str) -> None:
    """`release()`, a failure logged and not raised: a model that fails to close (a dead vLLM engine) must not fail
    a stage whose shards all succeeded, nor replace a shard's own error."""
    try:
        release()
    except Exception as exc:
        logging.getLogger("pomona.runner").warning("could not release %s cached models: %r", whose, exc)


def _close(value: Any) -> None:
    close = getattr(value, "close", None)
    if callable(close):
        close()


# (model, tokenizer) pairs of the scoring, Cherry profile and Deita embedding stages: two, as before (a shard uses
# one; two stages of parallel compare branches then keep theirs); a pair has no close(): evicted, it is dropped.
WORKER_MODELS = WorkerCache(size=2)


def worker_model(model_json: str):
    """(model, tokenizer) of a `ModelConfig` JSON, loaded once per worker process and model files (a stage's
    shards share it), for a `with` block."""
    from configs.schema import ModelConfig
    from models.loading import load_model

    config = ModelConfig.model_validate_json(model_json)
    return WORKER_MODELS.use(model_json, model_files_stamp(config), lambda: load_model(config))


class Interrupted(KeyboardInterrupt):
    """Raised in a worker thread whose flow was interrupted (Ctrl-C, SIGTERM, a cancelled flow run): the thread
    unwinds as the main thread does on Ctrl-C. A KeyboardInterrupt, so what handles Ctrl-C handles it too."""

    def __init__(self, *args: Any):
        super().__init__(*args or ("its flow run was interrupted (Ctrl-C, SIGTERM, cancelled)",))


class WorkerThreads:
    """The threads running a flow's submitted task runs now, so that an interrupt of the flow can reach them.

    Python gives Ctrl-C (and pomona's SIGTERM) to the main thread only. A task run submitted to a thread (a
    comparison branch, a shard) went on computing, and the flow could not end: Prefect's ThreadPoolTaskRunner waits
    for its running task runs when it closes, and Python's exit joins the pool's threads, so an interrupted
    comparison hung, its flow run not yet Crashed, its MLflow runs RUNNING and its Prefect server up, until the
    running branch had trained and evaluated (hours on a real model). So the interrupted flow raises `Interrupted`
    in these threads (`PyThreadState_SetAsyncExc`, as Prefect's own timeouts of sync tasks do): each unwinds at its
    next Python instruction through the code a Ctrl-C already goes through (stage runs end FAILED, a stage folder
    stays partial for a rerun to resume, a launched training is stopped with its ranks, the task run is Crashed).
    Not daemon threads or an os._exit after cleanup: they would end the process but leave the branch's MLflow and
    Prefect runs RUNNING, and a launched torchrun training on, holding the GPUs. A thread inside one long C call
    (a blocking read, a wait on a lock or another process) takes the exception when that call returns.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[int] = set()
        self._interrupted = False

    @contextmanager
    def running(self) -> Iterator[None]:
        """Around a task run's body, in its worker thread. Once interrupted, a task run queued behind the
        interrupted ones ends as it starts (a freed pool thread takes the next one before the task runner cancels
        what is queued)."""
        ident = threading.get_ident()
        with self._lock:
            if self._interrupted:
                raise Interrupted()
            self._running.add(ident)
        try:
            yield
        finally:
            with self._lock:
                self._running.discard(ident)

    def interrupt(self) -> int:
        """Raise `Interrupted` in every thread inside `running()` now, but the main thread (the signal's own) and
        this one; returns how many."""
        import ctypes

        skip = {threading.get_ident(), threading.main_thread().ident}
        with self._lock:  # a thread leaves `running()` under this lock: none is interrupted after it left
            self._interrupted = True
            targets = [ident for ident in self._running if ident not in skip]
            for ident in targets:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(Interrupted))
        return len(targets)


_WORKER_THREADS: contextvars.ContextVar[WorkerThreads | None] = contextvars.ContextVar("pomona_worker_threads",
                                                                                        default=None)


@contextmanager
def interrupting_workers(what: str) -> Iterator[None]:
    """Around the code that submits task runs to threads and waits for them: when it is interrupted (any exception
    that is not an `Exception`: KeyboardInterrupt, SIGTERM's SystemExit or Prefect's TerminationSignal), the task
    runs still running (in `interruptible()`) are interrupted too (see `WorkerThreads`). `what` names them in the
    log. Submitted task runs see it through the context Prefect copies into them."""
    threads = WorkerThreads()
    token = _WORKER_THREADS.set(threads)
    try:
        yield
    except BaseException as exc:
        if not isinstance(exc, Exception):
            count = threads.interrupt()
            if count:
                logging.getLogger("pomona.runner").warning("%s: interrupting %d running %s",
                                                           type(exc).__name__, count, what)
        raise
    finally:
        _WORKER_THREADS.reset(token)


@contextmanager
def interruptible() -> Iterator[None]:
    """Around a submitted task run's body: the interrupt of the flow that submitted it (`interrupting_workers`)
    interrupts it too. A no-op outside one (called directly, or in a Dask worker process)."""
    threads = _WORKER_THREADS.get()
    if threads is None:
        yield
        return
    with threads.running():
        yield


def interruptible_shard(shard_rows: Callable[..., Any]) -> Callable[..., Any]:
    """`shard_rows` as a shard task for the threads engine: `interruptible()` (same signature, for Prefect)."""

    @functools.wraps(shard_rows)
    def shard(*args: Any, **kwargs: Any) -> Any:
        with interruptible():
            return shard_rows(*args, **kwargs)

    return shard


INTERRUPTIBLE_STEP_S = 0.5


def wait_in_short_steps(wait: Callable[[float], Any], timed_out: type[BaseException],
                        step_s: float = INTERRUPTIBLE_STEP_S) -> Any:
    """`wait(step_s)` again until it returns rather than raising `timed_out`. A wait in one C call would hold off
    an interrupt raised in this thread (a comparison branch's: see `WorkerThreads`) until the wait ends."""
    while True:
        try:
            return wait(step_s)
        except timed_out:
            continue


def next_finished(finished) -> Any:
    """The next (index, future) of a shard whose task run ended, waited for in short steps."""
    import queue

    return wait_in_short_steps(lambda step_s: finished.get(timeout=step_s), queue.Empty)


def task_runner(config: ScaleOutConfig):
    """The Prefect task runner `config` selects (not started)."""
    if config.engine == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=config.workers)
    from prefect_dask import DaskTaskRunner

    if config.address:
        return DaskTaskRunner(address=config.address)
    return DaskTaskRunner(cluster_class=config.cluster_class,
                          cluster_kwargs={"n_workers": config.workers, "threads_per_worker": config.threads_per_worker,
                                          "processes": config.processes, "dashboard_address": None})


def release(future) -> None:
    """Free a written shard's result now rather than at the next full garbage collection.

    A Prefect future and the future it wraps reference each other (a done-callback), so the pair, and the
    result in its final state, outlive the last reference until the cyclic collector's rare full pass:
    every shard's rows piled up over a stage. The final state drops its data (the rows are written) and a Dask
    future releases its key, which frees the worker's copy.
    """
    wrapped = getattr(future, "wrapped_future", None)
    if callable(getattr(wrapped, "release", None)):  # distributed.Future
        wrapped.release()
    state = future.state  # the final state, kept by the future once its result was read (no API call)
    if state.is_final():
        state.data = None


def map_shards(shard_rows: Callable[..., Any], shard_count: int, table: ShardedTable,
               config: ScaleOutConfig, name: str, progress: bool = True,
               write: Callable[[int, Any], None] | None = None, **shared: Any) -> dict[str, int]:
    """Run `shard_rows(index, **shared)` for every shard index in range(shard_count) not yet in `table`.

    `shared` holds small, picklable arguments (paths, configs). `write(index, result)` stores a shard (default
    `table.write` for a list of rows; e.g. an array writer for embeddings). Returns counts: shards computed now,
    shards reused from an earlier attempt, rows written now.

    At most `config.max_in_flight` shards are submitted and not yet written: a new shard is submitted as an
    earlier one is written, and a written shard's result is dropped (its future too), so the stage holds a
    bounded window of results in memory whatever the shard count. The first shard that raises stops the
    submission of new shards; the shards already submitted are still awaited and written (a rerun resumes from
    them), then the first error is raised.
    """
    write = write or table.write
    import queue

    from prefect import task
    from prefect.cache_policies import NO_CACHE
    from tqdm import tqdm

    done = table.done()
    todo = [i for i in range(shard_count) if i not in done]
    counts = {"shards_computed": 0, "shards_reused": shard_count - len(todo), "rows_written": 0}
    if not todo:
        return counts
    # Results travel back in memory: the shard files are the durable output, not Prefect's result store.
    shard_task = task(interruptible_shard(shard_rows) if config.engine == "threads" else shard_rows,
                      name=f"{name}-shard", cache_policy=NO_CACHE, persist_result=False,
                      task_run_name=f"{name}-shard-{{index:05d}}")
    bar = tqdm(total=shard_count, initial=counts["shards_reused"], desc=name, unit="shard", disable=not progress)
    window = config.max_in_flight
    pending = iter(todo)
    finished: queue.SimpleQueue = queue.SimpleQueue()  # (index, future) as each shard's task run ends
    in_flight = 0
    failure: BaseException | None = None
    # an interrupt (Ctrl-C, SIGTERM) interrupts the shards running in threads, whose results it would drop anyway,
    # instead of the runner waiting for them to finish before the stage can unwind (see `WorkerThreads`)
    with task_runner(config) as runner, interrupting_workers(f"{name} shard(s)"):
        # An external cluster's workers outlive the stage (a local one exits with it). Connected here, not by the
        # first submit, so that an unreachable scheduler fails once and not again in the release below.
        external_cluster = runner.client if config.engine == "dask" and config.address else None

        def submit_next() -> bool:
            index = next(pending, None)
            if index is None:
                return False
            future = runner.submit(shard_task, parameters={"index": index, **shared})
            future.add_done_callback(lambda f, i=index: finished.put((i, f)))
            return True

        interrupted = False
        try:
            while in_flight < window and submit_next():
                in_flight += 1
            while in_flight:
                index, future = next_finished(finished)
                in_flight -= 1
                try:
                    rows = future.result()
                except Exception as exc:  # write the shards already submitted, then raise the first error
                    failure = failure or exc
                else:
                    write(index, rows)
                    counts["shards_computed"] += 1
                    counts["rows_written"] += len(rows)
                    bar.update(1)
                    release(future)
                    del rows
                del future
                if failure is None and submit_next():
                    in_flight += 1
        except BaseException as exc:
            interrupted = not isinstance(exc, Exception)
            raise
        finally:
            # not on an interrupt: Client.run has no timeout, and the unwind must not wait on busy workers
            if external_cluster is not None and not interrupted:
                release_cached_models(lambda: external_cluster.run(release_worker_caches_in_a_thread),
                                      "the Dask workers'")
    bar.close()
    if config.engine == "threads":  # the shards ran here
        release_cached_models(release_worker_caches, "this process's")
    if failure is not None:
        raise failure
    return counts
