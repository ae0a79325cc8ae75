"""Every field of a config as a flat list of dotted paths (what `--set` and a recipe take), with its type, default
and description: `pomona fields` prints it, so writing a recipe needs neither the source nor the Prefect form."""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from configs.schema import runtime_only


@dataclass(frozen=True)
class FieldDoc:
    path: str  # dotted; a list item is `N`, a mapping value `KEY` (`--set` takes `0`, `vicuna`, ...)
    type: str
    default: str  # "required", or the default as YAML
    description: str
    variant: str = ""  # under a union of sections: the discriminator value that selects this one, e.g. "method: cherry"
    runtime_only: bool = False  # changes where or how fast a stage runs, never its output: not in the cache key


def _strip_optional(annotation):
    """`X | None` -> X; anything else as it is."""
    args = typing.get_args(annotation)
    if _is_union(annotation) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
    return annotation


def _is_union(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _unannotated(annotation):
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _is_model(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def type_text(annotation) -> str:
    """A short, YAML-minded name of a field's type: `'a' | 'b'`, `int | null`, `list of str`, a section's class."""
    annotation = _unannotated(annotation)
    origin = typing.get_origin(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return " | ".join(repr(v) for v in typing.get_args(annotation))
    if _is_union(annotation):
        return " | ".join(type_text(a) for a in typing.get_args(annotation))
    if origin in (list, tuple, set, frozenset):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return f"list of {type_text(args[0])}" if args else "list"
    if origin is dict:
        key, value = typing.get_args(annotation) or (str, typing.Any)
        return f"mapping {type_text(key)} -> {type_text(value)}"
    if _is_model(annotation):
        return f"section ({annotation.__name__})"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _default_text(field) -> str:
    if field.is_required():
        return "required"
    return _value_text(field.default_factory() if field.default is PydanticUndefined else field.default)


def _value_text(value) -> str:
    if isinstance(value, BaseModel):
        return "the section's defaults"
    if isinstance(value, (list, tuple)) and any(isinstance(v, BaseModel) for v in value):
        return "[...]"
    dumped = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return dumped.removesuffix("\n...").removesuffix("...").strip()


def _tag(model: type[BaseModel], discriminator: str | None) -> str:
    if discriminator and discriminator in model.model_fields:
        return f"{discriminator}: {model.model_fields[discriminator].default}"
    return model.__name__


def _discriminator(annotation) -> str | None:
    """The discriminator a union carries in its `Annotated[..., Field(discriminator=...)]`, if any."""
    while typing.get_origin(annotation) is typing.Annotated:
        for meta in typing.get_args(annotation)[1:]:
            if isinstance(getattr(meta, "discriminator", None), str):
                return meta.discriminator
        annotation = typing.get_args(annotation)[0]
    return None


def field_docs(model: type[BaseModel], prefix: str = "", variant: str = "", runtime: bool = False) -> list[FieldDoc]:
    """Every field of `model`, depth first; sections (nested models) get a row of their own, then their fields
    (all of a runtime-only section's fields are runtime only: the key leaves the whole section out).

    A model's `implied_defaults` ({field: value}) are what its validator fills in where a recipe names nothing and
    the default depends on other fields (Deita's budget, when no share is given either): listed as the default.
    """
    implied = getattr(model, "implied_defaults", {})
    rows = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        discriminator = field.discriminator if isinstance(field.discriminator, str) else None
        # `inner` keeps its own Annotated: a union inside a list carries its discriminator there
        inner = _strip_optional(_unannotated(field.annotation))
        bare = _unannotated(inner)
        origin, args = typing.get_origin(bare), typing.get_args(bare)
        item_path = path
        if origin in (list, tuple, dict) and args:
            item_path, inner = f"{path}.{'KEY' if origin is dict else 'N'}", args[-1 if origin is dict else 0]
        discriminator = discriminator or _discriminator(inner)
        inner = _unannotated(inner)
        members = [m for m in (typing.get_args(inner) if _is_union(inner) else (inner,)) if _is_model(m)]
        type_name = type_text(field.annotation)
        if len(members) > 1:
            key = f"{item_path}.{discriminator}" if discriminator else "its section type"
            tags = [_tag(m, discriminator).split(": ", 1)[-1] for m in members]
            type_name = f"one of {len(members)} sections, chosen by {key}: {', '.join(tags)}"
            if item_path != path:
                type_name = f"{type_text(field.annotation).split(' of ')[0]} of items, each {type_name}"
        field_runtime = runtime or runtime_only(field)
        default = _value_text(implied[name]) if name in implied else _default_text(field)
        rows.append(FieldDoc(path, type_name, default, field.description or "", variant, field_runtime))
        for member in members:
            inner_variant = _tag(member, discriminator) if len(members) > 1 else variant
            rows += field_docs(member, f"{item_path}.", inner_variant, field_runtime)
    return rows


def render_field_docs(rows: list[FieldDoc], width: int = 100) -> str:
    """`path: type = default [method: x] [runtime: ...]`, the description indented under it."""
    import textwrap

    lines = []
    for row in rows:
        default = "  (required)" if row.default == "required" else f" = {row.default}"
        tags = ([f"[{row.variant}]"] if row.variant else []) + (["[runtime: not in the cache key]"] if row.runtime_only
                                                                 else [])
        lines.append("  ".join([f"{row.path}: {row.type}{default}"] + tags))
        if row.description:
            lines += textwrap.wrap(row.description, width=width, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines)


def docs_under(rows: list[FieldDoc], prefix: str, where: str = "this config") -> list[FieldDoc]:
    """The rows at `prefix` and below it (a dotted path, `N`/`KEY` or a concrete index/key for list/mapping items)."""
    from configs.errors import ConfigError

    if not prefix:
        return rows
    wanted = prefix.split(".")

    def matches(path: str) -> bool:
        parts = path.split(".")
        return len(parts) >= len(wanted) and all(
            p == w or (p in ("N", "KEY") and (w.isdigit() if p == "N" else True)) for p, w in zip(parts, wanted))

    found = [row for row in rows if matches(row.path)]
    if not found:
        import difflib

        close = difflib.get_close_matches(prefix, sorted({row.path for row in rows}), n=3, cutoff=0.5)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise ConfigError(f"no field {prefix!r} in {where}{hint}")
    return found
