"""The pipeline config: one recipe = one run. Composes the per-stage configs; loads from YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from configs.errors import ConfigError
from configs.evaluate import EvaluateConfig
from configs.schema import DataConfig, StrictModel, TrackingConfig, tracking_field
from configs.deita import DeitaSelection
from configs.grape import GrapeSelection
from configs.ifd import CherrySelection, SuperfilterSelection
from configs.selection import FullSelection, LongestSelection, RandomSelection
from configs.train import TrainingConfig


class _FormChoice:
    """Writes a discriminated union's JSON schema as `anyOf` instead of pydantic's `oneOf`.

    Prefect's run form renders `anyOf` as one button per member, each with its own fields and defaults; a `oneOf`
    it does not know, and shows as a bare JSON editor (the user types the method's settings from memory). Validation
    is the same: members differ in their `method` constant, so at most one matches either way.
    """

    def __get_pydantic_json_schema__(self, core_schema, handler):
        schema = handler(core_schema)
        if "oneOf" in schema:
            schema["anyOf"] = schema.pop("oneOf")
        return schema


SelectionConfig = Annotated[
    Union[RandomSelection, LongestSelection, FullSelection, CherrySelection, SuperfilterSelection, GrapeSelection,
          DeitaSelection],
    Field(discriminator="method"),
    _FormChoice(),
]


class PipelineConfig(StrictModel):
    """End-to-end run: load -> select -> write the subset (-> train -> evaluate as those stages land)."""

    name: str = Field(min_length=1, description="Recipe name; also the MLflow experiment unless tracking.experiment is set.")
    data: DataConfig | None = Field(
        None, description="The candidate pool. Required, except for GRAPE reading a candidates file (the "
                          "instructions and their responses then come from that file).")
    selection: SelectionConfig = Field(description="Selection method and its budget.")
    output_format: Literal["source", "alpaca", "sharegpt", "messages"] = Field(
        "source", description="Format of subset.jsonl: 'source' writes each record as the user's own row.")
    train: TrainingConfig | None = Field(
        None, description="Fine-tune a base model on the selected subset: SFT, then optional DPO (pairs from "
                          "dpo.pairs_path or the selection's pairs.jsonl, e.g. GRAPE with DPO pairs on).")
    evaluate: EvaluateConfig | None = Field(None, description="Benchmarks run on the trained model (needs `train`).")
    tracking: TrackingConfig = tracking_field()

    @model_validator(mode="after")
    def _evaluate_needs_a_model(self):
        if self.evaluate is not None and self.train is None:
            raise ValueError("'evaluate' runs on the trained model: add a 'train' section")
        return self

    @model_validator(mode="after")
    def _dpo_has_pairs(self):
        """Checked here, not after SFT has trained: DPO needs a pairs file or a selection that writes pairs."""
        dpo = self.train.dpo if self.train is not None else None
        grape_pairs = isinstance(self.selection, GrapeSelection) and self.selection.dpo.enabled
        if dpo is not None and not dpo.pairs_path and not grape_pairs:
            raise ValueError("train.dpo needs preference pairs: set train.dpo.pairs_path, or select with GRAPE and "
                             "selection.dpo.enabled: true")
        return self

    @model_validator(mode="after")
    def _data_matches_selection(self):
        from_candidates = isinstance(self.selection, GrapeSelection) and self.selection.candidates is not None
        if from_candidates and self.data is not None:
            raise ValueError("with selection.candidates the instructions come from that file: remove 'data'")
        if not from_candidates and self.data is None:
            raise ValueError(f"selection method {self.selection.method!r} needs 'data' (the candidate pool)")
        return self

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name


def _set_dotted(raw: dict, dotted: str, value, path: Path) -> None:
    """Apply one `--set a.b.0.c=value`: mappings by key (created when missing), lists by index."""
    node = raw
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        here = ".".join(parts[:depth + 1])
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"recipe {path}: --set {dotted}: {here!r} needs an index below {len(node)} "
                                  f"({'.'.join(parts[:depth]) or 'the top'} is a list)")
            key = int(part)
        elif isinstance(node, dict):
            key = part
            if not last and node.get(key) is None:
                node[key] = {}
        else:
            raise ConfigError(f"recipe {path}: --set {dotted}: {'.'.join(parts[:depth])!r} is a "
                              f"{type(node).__name__}, not a section with fields")
        if last:
            node[key] = value
        else:
            node = node[key]


def load_recipe(path: str | Path, model: type[StrictModel] = PipelineConfig, overrides: dict | None = None):
    """Parse a YAML recipe into its typed config; errors name the file and the offending keys."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"recipe {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"recipe {path} is a folder: give a YAML file (configs/recipes/*.yaml)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"recipe {path} is not UTF-8 text (byte {exc.start}): give a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"recipe {path} cannot be read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path}: expected a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value, path)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_problem(model, e) for e in exc.errors())
        raise ConfigError(f"recipe {path}: {problems}") from None


def _problem(model: type, error: dict) -> str:
    """One validation error as `the.yaml.path: message`: without pydantic's union-member tags in the path
    (`selection.random.seeed` is `selection.seeed` in the file) and its "Value error, " prefix."""
    nodes, shown = [model], []
    message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    loc = error["loc"]
    for depth, part in enumerate(loc):
        with_field = [n for n in nodes if part in n.model_fields]
        tagged = [n for n in nodes if not with_field and "method" in n.model_fields
                  and n.model_fields["method"].default == part]
        if with_field:
            shown.append(str(part))
            nodes = _models_in(with_field[0].model_fields[part].annotation)
        elif tagged:  # a discriminated union's member: not a key in the file
            nodes = tagged
        else:
            if depth == len(loc) - 1 and error["type"] == "extra_forbidden":
                message += _did_you_mean(str(part), nodes)
            # a list index or mapping key: the models below it are those of the field above
            shown.append(str(part))
    if error["type"] in ("union_tag_not_found", "union_tag_invalid"):
        message = _tag_problem(error, nodes) or message
    return f"{'.'.join(shown)}: {message}" if shown else message


def _tag_problem(error: dict, members: list[type]) -> str | None:
    """A missing or unknown discriminator (`method:`) in the file's terms, with the allowed values of the schema."""
    import difflib

    key = error.get("ctx", {}).get("discriminator", "").strip("'")
    tags = [m.model_fields[key].default for m in members if key in m.model_fields]
    if not tags:
        return None
    allowed = ", ".join(str(t) for t in tags)
    if error["type"] == "union_tag_not_found":
        return f"add `{key}:`, one of {allowed}"
    tag = str(error["ctx"].get("tag"))
    close = difflib.get_close_matches(tag, [str(t) for t in tags], n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown {key} '{tag}'{hint}: use one of {allowed}"


# The same section under two names: a pipeline recipe trains in `train`, a comparison in `training`.
_SECTION_TWINS = {"train": "training", "training": "train"}


def _did_you_mean(key: str, models: list[type]) -> str:
    """` (did you mean 'x'?)` with the allowed keys closest to an unknown `key`, else the allowed keys."""
    import difflib

    allowed = sorted({name for m in models for name in m.model_fields})
    if not allowed:
        return ""
    twin = _SECTION_TWINS.get(key)
    if twin in allowed:
        return (f" (did you mean '{twin}'? a pipeline recipe names its training section 'train', a comparison "
                "recipe 'training')")
    close = difflib.get_close_matches(key, allowed, n=3, cutoff=0.6)
    if close:
        return f" (did you mean {' or '.join(repr(c) for c in close)}?)"
    return f" (allowed here: {', '.join(allowed)})"


def _models_in(annotation) -> list[type]:
    """The pydantic models a field can hold (through Optional, lists, Annotated and unions)."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
