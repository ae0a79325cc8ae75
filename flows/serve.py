"""Register every pomona flow as a Prefect deployment: served by this process, or onto a work pool for workers.

`pomona serve` runs the deployments in this process (each flow run in a subprocess), which is all a single
machine needs: open the Prefect UI, pick a deployment, fill the form (rendered from the pydantic configs, with
their descriptions and defaults), run. `pomona deploy --work-pool NAME` registers the same deployments onto a
work pool so `prefect worker start --pool NAME` (the docker compose worker) runs them.

Flows are found, not listed: every `prefect.Flow` defined in a module of the `flows` package (except the
plumbing modules below) becomes a deployment, so a new stage flow is served as soon as its module exists.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flows as flows_package
from configs.errors import ConfigError
from configs.form_schema import checked_form_schema

DEPLOYMENT_NAME = "pomona"
"""Every flow's deployment has this name: `prefect deployment run pomona-pipeline/pomona`."""

_NOT_FLOW_MODULES = frozenset({"cli", "serve", "wiring", "selection"})
REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = REPO_ROOT / "configs" / "recipes"
DEFAULT_RECIPE = RECIPES / "demo.yaml"


@dataclass(frozen=True)
class DeploymentPolicy:
    """Tags and concurrency for the deployments of one flow module."""

    tags: tuple[str, ...]
    # Runs of one deployment beyond this wait in AwaitingConcurrencySlot (ENQUEUE) instead of competing for
    # the one accelerator of a serving host; the whole process is further capped by `serve --limit`.
    concurrency: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


POLICIES: dict[str, DeploymentPolicy] = {
    "pipeline": DeploymentPolicy(("pipeline", "end-to-end")),
    "compare": DeploymentPolicy(("pipeline", "comparison")),
    "cherry": DeploymentPolicy(("selection", "cherry", "ifd")),
    "superfilter": DeploymentPolicy(("selection", "superfiltering", "ifd")),
    "grape": DeploymentPolicy(("selection", "grape")),
    "deita": DeploymentPolicy(("selection", "deita")),
    "train": DeploymentPolicy(("training",)),
    "evaluate": DeploymentPolicy(("evaluation",)),
}
_OTHER = DeploymentPolicy(("stage",))


def flow_modules() -> list[str]:
    """Module stems of `flows/` that may define flows (import errors inside them propagate)."""
    return sorted(m.name for m in pkgutil.iter_modules(flows_package.__path__)
                  if not m.ispkg and m.name not in _NOT_FLOW_MODULES)


def discover_flows() -> list[tuple[str, Any]]:
    """(module stem, flow) for every Prefect flow defined (not merely imported) in a `flows` module."""
    from prefect import Flow

    found = []
    for stem in flow_modules():
        module = importlib.import_module(f"flows.{stem}")
        for attr, value in sorted(vars(module).items()):
            if isinstance(value, Flow) and getattr(value.fn, "__module__", None) == module.__name__:
                found.append((stem, value))
    return found


def flow_config_type(flow_obj):
    """The pydantic class of a flow's `config` parameter (None when it has none)."""
    import inspect

    from pydantic import BaseModel

    parameter = inspect.signature(flow_obj.fn, eval_str=True).parameters.get("config")
    config_type = parameter.annotation if parameter is not None else None
    return config_type if isinstance(config_type, type) and issubclass(config_type, BaseModel) else None


def flow_by_name(name: str):
    """A pomona flow by its short name ('pipeline', 'compare', 'sft', ...) or full name ('pomona-sft')."""
    found = {f.name.removeprefix("pomona-"): f for _, f in discover_flows()}
    flow_obj = found.get(name.removeprefix("pomona-"))
    if flow_obj is None:
        raise ConfigError(f"no flow named {name!r}; pomona's flows are: {', '.join(sorted(found))}")
    return flow_obj


def recipe_defaults(flow_obj, stem: str) -> dict[str, Any]:
    """Form defaults from the first recipe in configs/recipes/ that validates as the flow's `config` type.

    Recipes named after the flow module come first, and tiny-model ones before those needing a real model, so a
    click on Run does something real without editing. A flow without a matching recipe gets an empty form
    (still typed, with descriptions and schema defaults).
    """
    from configs.pipeline import load_recipe

    config_type = flow_config_type(flow_obj)
    if config_type is None:
        return {}
    candidates = sorted(RECIPES.glob("*.yaml"),
                        key=lambda p: (not p.stem.startswith(stem), "tiny" not in p.stem, p.name))
    for path in candidates:
        try:
            return {"config": load_recipe(path, model=config_type).form_defaults()}
        except ConfigError:
            continue  # a recipe for another flow
    return {}


def default_parameters(stem: str, flow_obj, recipe: Path | None) -> dict[str, Any]:
    """The pipeline's form from `recipe` (the demo by default); other flows' from a matching recipe."""
    if stem != "pipeline":
        return recipe_defaults(flow_obj, stem)
    from configs.pipeline import load_recipe

    path = recipe or DEFAULT_RECIPE
    if not path.exists():
        raise ConfigError(f"recipe {path} for the pipeline deployment's default parameters does not exist")
    return {"config": load_recipe(path).form_defaults()}


def build_deployments(recipe: Path | None = None, work_pool: str | None = None,
                      name: str = DEPLOYMENT_NAME, working_dir: Path | None = None) -> list:
    """One `RunnerDeployment` per flow, with tags, a concurrency limit, version and parameter defaults.

    `working_dir` (work pools only) becomes the process worker's `working_dir` job variable: without it the worker
    starts each flow run in a fresh temporary folder, where a recipe's relative paths (configs/recipes/...,
    tests/data/..., the default ./pomona-runs) name nothing.
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.deployments.runner import EntrypointType

    from tasks.track import git_commit

    version = git_commit()[:12]
    job_variables = {"working_dir": str(working_dir)} if work_pool and working_dir is not None else {}
    deployments = []
    for stem, flow_obj in discover_flows():
        policy = POLICIES.get(stem, _OTHER)
        deployments.append(flow_obj.to_deployment(
            name=name,
            tags=["pomona", *policy.tags],
            concurrency_limit=ConcurrencyLimitConfig(limit=policy.concurrency, collision_strategy="ENQUEUE"),
            parameters=default_parameters(stem, flow_obj, recipe),
            version=version,
            # `flows.pipeline.pipeline` rather than a file path: works from any working directory and in the
            # images, where pomona is an installed package.
            entrypoint_type=EntrypointType.MODULE_PATH,
            work_pool_name=work_pool,
            job_variables=dict(job_variables),
            **policy.extra,
        ))
    if not deployments:
        raise ConfigError("no Prefect flows found in the flows package")
    for deployment in deployments:
        # A private attribute in Prefect 3.8.8: `to_deployment` takes no schema of ours.
        deployment._parameter_openapi_schema = type(deployment._parameter_openapi_schema)(
            **checked_form_schema(deployment._parameter_openapi_schema.model_dump_for_openapi()))
    return deployments


def serve(recipe: Path | None = None, limit: int | None = 2) -> None:
    """Serve every deployment from this process until interrupted (Ctrl-C pauses their schedules)."""
    from prefect import serve as prefect_serve

    prefect_serve(*build_deployments(recipe), limit=limit)


def project_dir(working_dir: Path | None = None) -> Path:
    """The folder deployed runs start in: `working_dir`, else the current one (where `pomona run` would resolve
    the same recipe's relative paths); it must exist, as the worker cannot start a run in a missing folder."""
    folder = Path(working_dir or Path.cwd()).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(f"working directory {folder} for the deployed runs is not a folder")
    return folder


def deploy(work_pool: str, recipe: Path | None = None, name: str = DEPLOYMENT_NAME,
           working_dir: Path | None = None) -> list[str]:
    """Register every deployment onto `work_pool` (created as a process pool when missing); returns their ids.

    On a process pool each run starts in `project_dir(working_dir)` (the worker's default is a temporary folder).
    """
    from prefect import deploy as prefect_deploy
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    folder = project_dir(working_dir)
    with get_client(sync_client=True) as client:
        try:
            pool = client.create_work_pool(WorkPoolCreate(name=work_pool, type="process"))
        except ObjectAlreadyExists:
            pool = client.read_work_pool(work_pool)  # an existing pool is what we want; its type is the operator's
    # `working_dir` is a variable of process pools only; other pool types set their own working folder.
    ids = prefect_deploy(*build_deployments(recipe, work_pool=work_pool, name=name,
                                            working_dir=folder if pool.type == "process" else None),
                         work_pool_name=work_pool, build=False, push=False, print_next_steps_message=False,
                         ignore_warnings=True)
    return [str(i) for i in ids]
