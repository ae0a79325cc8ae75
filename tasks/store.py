"""Content-addressed stage outputs, shards with a manifest, and the cache key Prefect uses.

A stage's output folder is `<store>/<stage>/<key>/` with key = hash(stage name, stage config, fingerprints of
the local files the config names, digests of its inputs, CODE_VERSION). A finished stage writes `_SUCCESS` (its
`StageOutput` as JSON); seeing it, a rerun returns at once. `stage_key.json` records what the key was made of.
Long stages write `part-NNNNN.parquet` shards and a manifest, each atomically, so a killed run resumes at the
first missing shard. The Prefect cache key hashes the task's parameters and the same file fingerprints, so the UI
shows reused stages as Cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from configs.redact import redact_url
from configs.settings import CODE_VERSION, prefect_results_dir, store_root

SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"
KEY_FILE = "stage_key.json"
# Parameters that say where to report, not what to compute: never part of a cache key.
_NOT_IN_KEY = frozenset({"parent_run_id", "tracking", "fail_at"})


class StageOutput(BaseModel):
    """What passes between tasks: small, hashable, and enough to find and trust the files."""

    stage: str
    key: str
    path: str
    digest: str = Field(description="sha256 over the stage's output files")
    metrics: dict[str, float] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    artifacts: list[str] = Field(default_factory=list, description="files (relative to path) to log to MLflow")
    datasets: list[dict[str, str]] = Field(default_factory=list, description="{name, file, context} to log as MLflow inputs")
    summary: str = Field("", description="a short markdown summary for the Prefect UI")
    seconds: float | None = Field(None, description="wall time of the body in the run that finished the stage (a "
                                                    "resumed stage: its last attempt only)")
    reused: bool = Field(False, description="True when this call found the stage already finished in the store "
                                            "(set on the returned copy, never in the `_SUCCESS` record)")

    def file(self, name: str) -> Path:
        return Path(self.path) / name


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temp file and rename, so a killed run never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{writer_id()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def writer_id() -> str:
    """Temp-file suffix unique to this process and thread (shards are written from worker threads too)."""
    import threading

    return f"{os.getpid()}-{threading.get_ident()}"


@contextlib.contextmanager
def folder_lock(folder: Path, name: str):
    """An exclusive lock (flock on a dot-file, so digests skip it) between threads and processes sharing `folder`:
    two runs of the same stage, or shard workers, must not lose each other's manifest entries."""
    import fcntl

    with open(folder / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)



def canonical(obj: Any) -> Any:
    """A JSON-able, order-stable view of a config or task input, for hashing."""
    if isinstance(obj, StageOutput):
        return {"stage": obj.stage, "digest": obj.digest}
    if isinstance(obj, BaseModel):
        from configs.schema import runtime_only

        # field by field, so runtime-only fields of nested configs stay out too
        fields = type(obj).model_fields
        dumped = obj.model_dump(mode="json")
        view = {name: canonical(getattr(obj, name)) if isinstance(getattr(obj, name), (BaseModel, list, tuple, dict))
                else canonical(dumped[name])
                for name in sorted(dumped) if name not in fields or not runtime_only(fields[name])}
        from configs.schema import ModelConfig

        if isinstance(obj, ModelConfig) and "auto" in (obj.device, obj.dtype):
            from models.loading import auto_resolution

            # 'auto' is float32 on a CPU and bfloat16 on CUDA: without this a store shared by (or copied between)
            # a CPU and a GPU machine would hand one's numbers to the other
            view["auto_resolves_to"] = auto_resolution(obj)
        return view
    if isinstance(obj, dict):
        return {str(k): canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, os.PathLike):
        obj = os.fspath(obj)
    if isinstance(obj, str):
        # A URL's credentials stay out of stage_key.json (logged to MLflow) and out of the key: a rotated API key
        # or password reaches the same endpoint and must not recompute the stage.
        return store_relative(redact_url(obj))
    if obj is None or isinstance(obj, (int, float, bool)):
        return obj
    from pydantic_core import to_jsonable_python

    return to_jsonable_python(obj)


STORE_PREFIX = "<store>/"


def store_relative(text: str) -> str:
    """A path inside this home's store as `<store>/<stage>/<key>/...`, anything else unchanged: keys must not
    depend on where the home folder is (a moved home, the compose volume and the host share finished stages).
    What a store folder holds enters keys by its stage's output digest, so the name is enough."""
    root = str(store_root()) + os.sep
    return STORE_PREFIX + text[len(root):] if text.startswith(root) else text


def content_digest(obj: Any) -> str:
    blob = json.dumps(canonical(obj), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def file_digest(path: str | os.PathLike, normalize: Callable[[Path, bytes], bytes] | None = None) -> str:
    """sha256 of a file's bytes, or of a folder's relative paths and file bytes (markers and temp files excluded).
    `normalize(file, bytes)` may give the bytes to hash instead of a small file's own (read whole: see
    `portable_model_digest`); it returns None for a file hashed as it is."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f.name == SUCCESS or f.name.startswith("."):
            continue
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        normalized = normalize(f, f.read_bytes()) if normalize is not None and normalizes(normalize, f) else None
        if normalized is not None:
            h.update(normalized)
            continue
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def normalizes(normalize: Callable[[Path, bytes], bytes], f: Path) -> bool:
    """Whether `normalize` wants to see `f` (its `names` attribute: file names; default every file)."""
    names = getattr(normalize, "names", None)
    return names is None or f.name in names


def _store_paths_relative(f: Path, data: bytes) -> bytes | None:
    """What of a saved model's home-dependent files enters its digest. PEFT records the base model's absolute path
    in `adapter_config.json` and the adapter's `README.md`: there this store's root is written `<store>/` (a base in
    the store, a tiny model or a merged SFT, would otherwise make the digest depend on where the home folder is;
    the files on disk keep the path PEFT loads from). `training_args.bin` (a pickle in a zip, its output_dir the
    stage folder) does not enter: it is the training config, which the stage key already holds."""
    if f.name == "training_args.bin":
        return b""
    root = (str(store_root()) + os.sep).encode()
    return data.replace(root, STORE_PREFIX.encode())


_store_paths_relative.names = ("adapter_config.json", "README.md", "training_args.bin")  # type: ignore[attr-defined]


def portable_model_digest(path: str | os.PathLike) -> str:
    """`file_digest` of a model folder that is the same in every home: a LoRA adapter's base model, when it lies
    in the store, enters by its store-relative name (what a store path enters every key by: `store_relative`)."""
    return file_digest(path, normalize=_store_paths_relative)


def stage_key(stage: str, config: Any, inputs: Iterable[Any] = ()) -> str:
    return content_digest({"stage": stage, "config": config, "inputs": list(inputs), "code": CODE_VERSION})[:20]


def keyed_config(config: Any) -> Any:
    """A stage config as its key sees it: with the fingerprint of every local file or folder it names (a model
    folder retrained in place, a DeepSpeed file, a task folder), so the store never returns a result computed from
    other files. Unchanged when the config names none."""
    material = canonical(config)
    files = file_fingerprints(material)
    return {"config": material, "files": files} if files else config


def stage_dir(stage: str, key: str) -> Path:
    return store_root() / stage / key


def load_finished(folder: Path) -> StageOutput | None:
    """The finished stage in `folder`, its path as the folder is now (a store moved to another home still serves)."""
    marker = folder / SUCCESS
    if not marker.exists():
        return None
    return StageOutput.model_validate_json(marker.read_text()).model_copy(update={"path": str(folder)})


@contextlib.contextmanager
def stage_lock(stage: str, folder: Path):
    """Held while a stage computes into `folder`: a second run of the same stage and inputs (another process, a
    parallel comparison branch) waits for the first and then reuses its output, instead of training or scoring
    into the same folder at once."""
    import fcntl
    import logging

    with open(folder / ".stage.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logging.getLogger("pomona.store").warning(
                "stage %s: another run is computing %s; waiting for it to finish", stage, folder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_stage(stage: str, config: Any, inputs: Iterable[Any], body: Callable[[Path], dict[str, Any]],
              digest_of: Iterable[str] | None = None,
              digest_file: Callable[[Path], str] = file_digest) -> StageOutput:
    """Run `body(folder)` once per (stage, config, inputs); later calls return the recorded output.

    `body` writes its files into `folder` and returns StageOutput fields (metrics, artifacts, ...). The output
    digest covers the files named in `digest_of` (default: the whole folder), each hashed by `digest_file`.
    """
    inputs = list(inputs)
    keyed = keyed_config(config)
    key = stage_key(stage, keyed, inputs)
    folder = stage_dir(stage, key)
    finished = load_finished(folder)
    if finished is not None:
        return finished.model_copy(update={"reused": True})
    folder.mkdir(parents=True, exist_ok=True)
    with stage_lock(stage, folder):
        finished = load_finished(folder)  # finished by the run this one waited for
        if finished is not None:
            return finished.model_copy(update={"reused": True})
        # what the key was made of, readable (logged to MLflow): why a rerun reused this folder or made a new one
        atomic_write_text(folder / KEY_FILE, json.dumps(
            {"stage": stage, "key": key, "code_version": CODE_VERSION, "config": canonical(keyed),
             "inputs": canonical(inputs)}, indent=1, sort_keys=True, ensure_ascii=False))
        started = time.perf_counter()
        fields = body(folder)
        fields.setdefault("seconds", round(time.perf_counter() - started, 3))
        if digest_of is None:
            digest = file_digest(folder)
        else:
            digest = content_digest([digest_file(folder / name) for name in digest_of])
        out = StageOutput(stage=stage, key=key, path=str(folder), digest=digest, **fields)
        atomic_write_text(folder / SUCCESS, out.model_dump_json(indent=1))
    return out


def store_listing(root: Path | None = None) -> list[dict[str, Any]]:
    """One row per folder of the store: stage, key, state (finished; partial = a run stopped or still running, a
    rerun resumes it; model = a built tiny model), size in bytes, last change (unix time), for a finished stage
    its wall time, and `code`: "current" when this code made it, "other" when other code (another pomona version
    or library versions: every stage key holds the code version, so no run of this code reuses or resumes it; a
    tiny model built by another `models/tiny.py`), None where unknown (a folder without its `stage_key.json`)."""
    root = root or store_root()
    rows = []
    for folder in sorted(p for p in root.glob("*/*") if p.is_dir()):
        files = [f for f in folder.rglob("*") if f.is_file()]
        finished = load_finished(folder)
        # store/models/ holds the tiny models built for `tiny:<seed>` names, not stage outputs
        state = "model" if folder.parent.name == "models" else "finished" if finished else "partial"
        rows.append({"stage": folder.parent.name, "key": folder.name, "state": state,
                     "bytes": sum(f.stat().st_size for f in files),
                     "modified": max((f.stat().st_mtime for f in files), default=folder.stat().st_mtime),
                     "seconds": finished.seconds if finished else None, "path": str(folder),
                     "code": tiny_made_by(folder) if state == "model" else made_by(folder)})
    return rows


def tiny_made_by(folder: Path) -> str:
    """"current" if this code's `models/tiny.py` built the tiny model folder (its name ends with that file's
    stamp), else "other": no run of this code loads it again."""
    from models.tiny import tiny_build_stamp

    return "current" if folder.name.endswith(f"-{tiny_build_stamp()}") else "other"


def made_by(folder: Path) -> str | None:
    """"current" if this code version made the stage folder, "other" if another did, None if it does not say."""
    try:
        recorded = json.loads((folder / KEY_FILE).read_text())["code_version"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return "current" if recorded == CODE_VERSION else "other"


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def path_fingerprint(path: Path) -> str:
    """What a cache key records of a local file or folder a stage reads: a file's content digest (remembered per
    path, size and mtime, so a big data file is hashed once per process), a folder's relative paths, sizes and
    mtimes (a model folder is hundreds of MB; retraining or editing it in place changes its mtimes)."""
    if path.is_file():
        stat = path.stat()
        memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if memo not in _FILE_DIGESTS:
            _FILE_DIGESTS[memo] = file_digest(path)
        return _FILE_DIGESTS[memo]
    listing = []
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        if f.name == SUCCESS or f.name.startswith("."):
            continue
        stat = f.stat()
        listing.append([str(f.relative_to(path)), stat.st_size, stat.st_mtime_ns])
    return content_digest(listing)


def local_paths(material: Any) -> set[str]:
    """Every string in a canonical structure that names an existing local file or folder."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str) and value and len(value) < 4096 and "\n" not in value:
            try:
                if Path(value).expanduser().exists():
                    found.add(value)
            except OSError:  # a string that is no valid path (too long a component, say) is no file
                pass

    walk(material)
    return found


def file_fingerprints(material: Any) -> dict[str, str]:
    """`path_fingerprint` of every existing local path named in a canonical structure."""
    return {path: path_fingerprint(Path(path).expanduser()) for path in sorted(local_paths(material))}


def repo_input_fingerprints(value: Any) -> dict[str, str]:
    """`path_fingerprint` of every folder a REPO_INPUT_DIR field names (at any depth of configs, lists and dicts),
    found where the stage finds it (`repo_path`: the current folder, else the repository root). A relative name
    that exists only under the repository root is no local path to `file_fingerprints`, which looks from here."""
    from configs.schema import repo_path

    found: dict[str, str] = {}
    if isinstance(value, BaseModel):
        for name, field in type(value).model_fields.items():
            item = getattr(value, name)
            extra = field.json_schema_extra
            if isinstance(extra, dict) and extra.get("pomona_input_file") == "repo" and isinstance(item, str):
                if repo_path(item).exists():
                    found[item] = path_fingerprint(repo_path(item))
                    found.update(referenced_input_fingerprints(extra.get("pomona_input_refs"), repo_path(item)))
            else:
                found.update(repo_input_fingerprints(item))
    elif isinstance(value, dict):
        for item in value.values():
            found.update(repo_input_fingerprints(item))
    elif isinstance(value, (list, tuple)):
        for item in value:
            found.update(repo_input_fingerprints(item))
    return found


def referenced_input_fingerprints(function_ref: str | None, folder: Path) -> dict[str, str]:
    """The fingerprints of the inputs that the files of `folder` name (`pomona_input_refs`: "module:function"), {}
    when the field names none. An input it cannot find is left to the stage, which stops on it with the error."""
    import importlib

    from configs.errors import ConfigError

    if not function_ref:
        return {}
    module, name = function_ref.split(":")
    try:
        return getattr(importlib.import_module(module), name)(folder)
    except ConfigError:
        return {}


def stage_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect cache key: the task's name plus its inputs, configs and upstream digests, plus CODE_VERSION.

    Every local file or folder the parameters name (data files, candidates, pairs, task folders, models) enters
    by `path_fingerprint` (as in the store's own keys, `keyed_config`), so an edited file is a new key: Prefect must
    never hand back a result the stage itself would recompute. Folders named relative to the repository (lm-eval
    tasks, instruction test sets) enter as the stage finds them (`repo_input_fingerprints`), from any folder. The
    key may be finer than the stage's store key (a config field the stage ignores); then the task runs, finds its
    folder finished and returns it as `reused`.
    """
    kept = {name: value for name, value in parameters.items() if name not in _NOT_IN_KEY}
    material = {name: canonical(value) for name, value in kept.items()}
    material["files"] = {**file_fingerprints(material), **repo_input_fingerprints(kept)}
    task_name = getattr(getattr(context, "task", None), "name", "task")
    return f"{task_name}-{stage_key(task_name, material)}"


STAGE_TASK_NAMES: set[str] = set()
"""Names of every stage task made by `stage_task` in the modules imported so far (see `stage_task_names`)."""


def stage_task_names() -> list[str]:
    """Every stage task name pomona defines: each `tasks` module is imported, so a flow that has not yet imported a
    method's stages (the pipeline imports them on first use) still knows their names."""
    import importlib
    import pkgutil

    import tasks

    for module in pkgutil.iter_modules(tasks.__path__):
        if module.name != "train_entry":  # a subprocess's entry point, defines no stage
            importlib.import_module(f"tasks.{module.name}")
    return sorted(STAGE_TASK_NAMES)


def stage_task(fn: Callable, name: str, **options: Any):
    """Wrap a stage function as a Prefect task cached on `stage_cache_key`, results persisted in POMONA_HOME."""
    from prefect import task

    STAGE_TASK_NAMES.add(name)

    # log_prints off inside stages: libraries that capture stdout by swapping sys.stdout (dill's globalvars, used by
    # datasets' fingerprinting under TRL) would otherwise pour their captured text - whole bytecode listings - into
    # the run's logs, since Prefect's print patch logs a print to "stdout" whatever sys.stdout is. Stages report
    # through logging, summaries and artifacts; flows keep log_prints for their own messages.
    options.setdefault("log_prints", False)
    return task(fn, name=name, cache_key_fn=stage_cache_key, persist_result=True,
                result_storage=prefect_results_dir(), **options)


# ----------------------------------------------------------------------------------------------------- shards
def _schema_text(schema) -> str:
    import base64

    return base64.b64encode(schema.serialize().to_pybytes()).decode("ascii")


def _schema_of(text: str):
    import base64

    import pyarrow as pa

    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def _conform(table, schema):
    """`table` with exactly `schema`'s columns, in its order and types (a column it lacks: typed nulls)."""
    import pyarrow as pa

    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def _record_schema(manifest: dict[str, Any], schema) -> None:
    """Record a table's schema in its manifest: exactly (to write later shards in it) and readably (`columns`)."""
    manifest["schema"] = _schema_text(schema)
    manifest["columns"] = {f.name: str(f.type) for f in schema}


class ShardedTable:
    """Rows written in numbered parquet shards with a manifest; resume skips the shards already written.

    Every shard of a table has the one schema its manifest records, so the shard folder reads as one dataset
    (`pyarrow.dataset.dataset(folder)`, `pandas.read_parquet(folder)`, DuckDB, Spark): a column that is all null
    (or absent) in a shard is written as typed nulls, not as parquet's null type. The schema is fixed by the first
    shard and widened when a later shard brings a type an earlier one lacked (null -> string, int -> double, a new
    column); the shards already written are then rewritten to it, losslessly. The manifest is `_<prefix>-manifest.json`,
    a name those readers skip like `_SUCCESS`.
    """

    tabular = True

    def __init__(self, folder: str | os.PathLike, prefix: str = "part"):
        self.folder = Path(folder)
        self.prefix = prefix
        self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def manifest_path(self) -> Path:
        return self.folder / f"_{self.prefix}-{MANIFEST}"

    @property
    def legacy_manifest_path(self) -> Path:
        """Where versions before the schema-stable shards kept the manifest (read by dataset readers as a shard)."""
        return self.folder / f"{self.prefix}-{MANIFEST}"

    def manifest(self) -> dict[str, Any]:
        for path in (self.manifest_path, self.legacy_manifest_path):
            if path.exists():
                return json.loads(path.read_text())
        return {"shards": {}}

    def _save_manifest(self, manifest: dict[str, Any]) -> None:
        """Write the manifest (caller holds the folder lock); a legacy-named one goes, so readers skip it."""
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=1, sort_keys=True))
        self.legacy_manifest_path.unlink(missing_ok=True)

    def _lock(self):
        return folder_lock(self.folder, f"{self.prefix}-{MANIFEST}")

    def check(self) -> tuple[set[int], list[str]]:
        """(shards whose file matches its manifest entry, a line per shard that does not): a shard deleted,
        truncated or replaced after it was recorded."""
        return self._check(self.manifest())

    def _check(self, manifest: dict[str, Any]) -> tuple[set[int], list[str]]:
        good, bad = set(), []
        for key, entry in manifest["shards"].items():
            path = self.shard_path(int(key))
            if not path.exists():
                bad.append(f"{path.name} is missing")
            elif file_digest(path) != entry["sha256"]:
                bad.append(f"{path.name} does not match the sha256 its manifest recorded")
            else:
                good.add(int(key))
        return good, bad

    def done(self) -> set[int]:
        """The shards a resumed run may skip: a recorded shard whose file no longer matches is computed again."""
        good, bad = self.check()
        import logging

        if bad:
            logging.getLogger("pomona.store").warning("%s: %s; computing them again", self.folder, "; ".join(bad))
        if self.tabular and good and "schema" not in self.manifest():
            good = self._adopt_legacy(good)
        return good

    def _adopt_legacy(self, good: set[int]) -> set[int]:
        """Shards written before tables kept one schema (a partial stage of an older version): rewrite them to one
        schema and record it; a shard whose types conflict with the others is forgotten and computed again."""
        import logging

        import pyarrow as pa
        import pyarrow.parquet as pq

        log = logging.getLogger("pomona.store")
        with self._lock():
            manifest = self.manifest()
            if "schema" in manifest:  # adopted meanwhile by another writer
                return good
            schema, kept = None, set()
            for index in sorted(good):
                shard_schema = pq.read_schema(self.shard_path(index)).remove_metadata()
                try:
                    schema = shard_schema if schema is None else pa.unify_schemas(
                        [schema, shard_schema], promote_options="permissive")
                    kept.add(index)
                except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
                    log.warning("%s: %s was written by an older version with conflicting column types (%s); "
                                "computing it again", self.folder, self.shard_path(index).name, err)
                    manifest["shards"].pop(str(index), None)
            for index in sorted(kept):
                manifest["shards"][str(index)] = self._rewrite(index, schema)
            _record_schema(manifest, schema)
            self._save_manifest(manifest)
        return kept

    def _rewrite(self, index: int, schema) -> dict[str, Any]:
        """Shard `index` rewritten to `schema` (caller holds the lock); its new manifest entry."""
        import pyarrow.parquet as pq

        table = pq.read_table(self.shard_path(index))
        return self._write_file(index, _conform(table, schema))

    def _write_file(self, index: int, table) -> dict[str, Any]:
        import pyarrow.parquet as pq

        path = self.shard_path(index)
        tmp = path.with_name(f".{path.name}.tmp-{writer_id()}")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        return {"rows": table.num_rows, "sha256": file_digest(path)}

    def todo(self, count: int) -> list[int]:
        """The shards of range(count) still to compute, in order. Checks the manifest once: `done()` hashes every
        recorded shard, so calling it per shard (`[s for s in ... if s not in t.done()]`) made a resume quadratic
        in the shard count (a 12k-record score stage at 16 per shard, half done: 27 s before its first shard)."""
        done = self.done()
        return [s for s in range(count) if s not in done]

    def shard_path(self, index: int) -> Path:
        return self.folder / f"{self.prefix}-{index:05d}.parquet"

    def write(self, index: int, rows: list[dict[str, Any]]) -> None:
        """Write shard `index` in the table's schema (widened first when these rows need it), then record it."""
        import pyarrow as pa

        keys = list(dict.fromkeys(key for row in rows for key in row))  # every row's columns, not the first's
        table = pa.Table.from_pydict({key: [row.get(key) for row in rows] for key in keys})
        before = self.manifest()
        if before["shards"] and "schema" not in before:
            self.done()  # shards of an older version: adopted first (it takes the lock itself)
        with self._lock():
            manifest = self.manifest()
            recorded = _schema_of(manifest["schema"]) if "schema" in manifest else None
            schema = table.schema
            if recorded is not None:
                try:
                    schema = pa.unify_schemas([recorded, table.schema], promote_options="permissive")
                except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
                    raise ValueError(f"{self.folder}: shard {index} has column types that conflict with the shards "
                                     f"written before ({err})") from err
            if recorded is not None and not schema.equals(recorded):
                good, _ = self._check(manifest)
                for other in sorted(good - {index}):
                    manifest["shards"][str(other)] = self._rewrite(other, schema)
            manifest["shards"][str(index)] = self._write_file(index, _conform(table, schema))
            _record_schema(manifest, schema)
            self._save_manifest(manifest)

    def _publish(self, index: int, tmp: Path, rows: int) -> None:
        """Move a fully written shard into place, then record it in the manifest (which is what marks it done)."""
        path = self.shard_path(index)
        os.replace(tmp, path)
        entry = {"rows": rows, "sha256": file_digest(path)}
        with self._lock():  # read-modify-write of a file others update too
            manifest = self.manifest()
            manifest["shards"][str(index)] = entry
            self._save_manifest(manifest)

    def verified(self) -> set[int]:
        """The recorded shards, all checked against the manifest; a mismatch is an error (never data read as if
        it were what the stage computed)."""
        good, bad = self.check()
        if bad:
            from configs.errors import StoreCorrupt

            raise StoreCorrupt(f"{self.folder}: {'; '.join(bad)}. Delete the stage folder that holds it to compute "
                               "it again")
        return good

    def read(self) -> list[dict[str, Any]]:
        """All rows, in shard order."""
        import pyarrow.parquet as pq

        rows: list[dict[str, Any]] = []
        for index in sorted(self.verified()):
            rows.extend(pq.read_table(self.shard_path(index)).to_pylist())
        return rows


class ArrayShards(ShardedTable):
    """`ShardedTable`'s manifest and resume, with float32 `.npy` shards (e.g. a 4096-wide vector per row). Keep them
    in a folder of their own: beside parquet shards, they would break reading that folder as a dataset."""

    tabular = False

    def shard_path(self, index: int) -> Path:
        return self.folder / f"{self.prefix}-{index:05d}.npy"

    def write_array(self, index: int, array) -> None:
        import numpy as np

        path = self.shard_path(index)
        tmp = path.with_name(f".{path.stem}.tmp-{writer_id()}.npy")
        np.save(tmp, np.ascontiguousarray(array, dtype=np.float32))
        self._publish(index, tmp, int(array.shape[0]))

    def read_array(self, index: int):
        import numpy as np

        return np.load(self.shard_path(index))


def rows_by_shard(folder: str | os.PathLike, count: int, shard_size: int,
                  shard_rows: Callable[[int, int], list[dict[str, Any]]], desc: str,
                  progress: bool = True) -> list[dict[str, Any]]:
    """Rows for items [0, count), `shard_rows(start, stop)` computing `shard_size` items at a time into a
    `ShardedTable` under `folder`: a rerun after a crash computes only the shards still missing. All rows, in order."""
    from tqdm.auto import tqdm

    table = ShardedTable(folder)
    n_shards = -(-count // shard_size)
    todo = table.todo(n_shards)
    for shard in tqdm(todo, desc=desc, unit="shard", disable=not progress or not todo):
        table.write(shard, shard_rows(shard * shard_size, min(count, (shard + 1) * shard_size)))
    return table.read()
