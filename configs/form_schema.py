"""The deployments' parameter schema, rewritten so that a value the Prefect server refuses is refused by its field.

Prefect checks a new run's parameters against the deployment's JSON schema (jsonschema). A union - `selection` (one
member per method), an optional section like `train: TrainingConfig | None` - is an `anyOf`, and when a value fails
inside the member it was meant for, jsonschema can only say that no member matched: "Validation failed for field
'config.selection'. Failure reason: {...the whole section...} is not valid under any of the given schemas", which
names neither the field nor the rule. So every union with an object member is rewritten:

- its members become *form copies*: the fields, types, titles, defaults, descriptions and constants the UI renders
  (one button per member), with the constraints on values left out and references inlined, so that they only fail
  on a type, a missing required field, a list's length or the member's constant (where the message stays vague);
- the member's full definition is applied with `if`/`then`: if the value is that member (its `method` constant in
  a discriminated union, an object for an optional section), then it must match the definition, whose errors
  name the field and the rule ("config.selection.budget: -5 is less than the minimum of 1").

The members are also put in an order the UI can read a value back by. Both of Prefect's UIs show an existing value
(a recipe's defaults) under the first member sharing the most field names with it, so a `longest` value - whose
fields random's also has, with `seed` besides - showed as `random`, which added its `seed`, and Submit was refused.
A member therefore comes before every member whose fields include all of its own (`full`, `longest`, `random`).

Every field of a definition also gets a title where pydantic writes none (a field that is a section or a union:
Prefect's V2 UI labelled those "Field" or by the section's class name, V1 by the bare field name) and its
`position`, which the forms order fields by: a Prefect server on PostgreSQL keeps the schema as JSONB, which
reorders an object's keys (shortest first), and the forms listed `data` before `name`, `path` after `limit`.

The UI renders `anyOf` and leaves `if`/`then` out of the schema it validates with while the form is filled in, so
such a value is refused when the run is created, and the UI shows the server's message (Prefect's V2 UI, at `/v2`,
had the browser check a number's bounds as it was typed; it now shows the server's message as V1 does). What the schema accepts is
unchanged, but for a selection without its `method`: Prefect's schema let it through to the flow, whose config
refused it as the run started; now the run is not created ("'method' is a required property").
"""

from __future__ import annotations

import copy
from typing import Any

_VALUE_CONSTRAINTS = frozenset({
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength", "maxLength", "pattern",
    "uniqueItems", "minProperties", "maxProperties", "if", "then", "else", "not",
})
"""Left out of the form copies. Kept: `required` (the form marks the other fields "(Optional)") and `minItems` /
`maxItems` (the form offers no more items than allowed, so only JSON given outside it can break them)."""
_SCHEMA_LISTS = ("anyOf", "allOf", "prefixItems")  # (no `oneOf`: `configs.pipeline._FormChoice` writes unions as `anyOf`)
_SCHEMA_MAPS = ("properties", "patternProperties")
_SCHEMA_VALUES = ("items", "additionalProperties", "not", "if", "then", "else")
_DEFINITIONS_PREFIX = "#/definitions/"


def checked_form_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of a Prefect parameter schema rewritten as the module says: fields titled and positioned, unions of
    objects as form copies in a readable order plus their definitions' checks."""
    out = copy.deepcopy(schema)
    definitions = out.get("definitions", {})
    for definition in definitions.values():
        for position, (name, field) in enumerate(definition.get("properties", {}).items()):
            field.setdefault("title", name.replace("_", " ").title())  # pydantic's own rule for the others
            field.setdefault("position", position)
    rewrite = _UnionRewriter(definitions)
    for definition in definitions.values():
        rewrite.walk(definition)
    for prop in out.get("properties", {}).values():
        rewrite.walk(prop)
    return out


class _UnionRewriter:
    def __init__(self, definitions: dict[str, Any]):
        # The form copies are made from the definitions as they were: later rewrites add only `if`/`then`, which
        # a form copy leaves out anyway.
        self.originals = copy.deepcopy(definitions)

    def walk(self, node: Any) -> None:
        """Rewrite the unions in `node`, deepest first (a member's own unions before the union holding it)."""
        if not isinstance(node, dict) or "if" in node:
            return  # ("if": rewritten already; its members are form copies, which must stay without checks)
        for key in _SCHEMA_LISTS:
            for child in node.get(key, ()):
                self.walk(child)
        for key in _SCHEMA_MAPS:
            for child in node.get(key, {}).values():
                self.walk(child)
        for key in _SCHEMA_VALUES:
            self.walk(node.get(key))
        self._rewrite_union(node)

    def _rewrite_union(self, node: dict[str, Any]) -> None:
        members = node.get("anyOf")
        if not members:
            return
        discriminator = node.get("discriminator") or {}
        copies = [self.form_copy(m, ()) for m in members]
        if discriminator.get("mapping"):
            check = _discriminated_check(discriminator["propertyName"], discriminator["mapping"])
            copies = _fewer_fields_first(copies)  # (members of objects only; an optional section's stay in order)
        else:
            objects = [m for m in members if self._is_object(m)]
            if len(objects) != 1:
                return  # no member to single out: the union stays as it is
            check = {"if": {"type": "object"}, "then": objects[0]}
        node["anyOf"] = copies
        node.update(check)

    def _is_object(self, member: dict[str, Any]) -> bool:
        target = self._resolve(member["$ref"]) if "$ref" in member else member
        return target.get("type") == "object" or "properties" in target

    def _resolve(self, ref: str) -> dict[str, Any]:
        if not ref.startswith(_DEFINITIONS_PREFIX):
            raise ValueError(f"parameter schema reference {ref!r} is not under {_DEFINITIONS_PREFIX}")
        return self.originals[ref.removeprefix(_DEFINITIONS_PREFIX)]

    def form_copy(self, node: Any, inlined: tuple[str, ...]) -> Any:
        """`node` without value constraints, its references inlined (what the form renders, nothing it checks).

        A field that refers to a definition keeps its own title (`Model`, not the class name `ModelConfig`).
        """
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            name = node["$ref"].removeprefix(_DEFINITIONS_PREFIX)
            if name in inlined:
                raise ValueError(f"parameter schema definition {name!r} refers to itself: "
                                 f"{' -> '.join((*inlined, name))}")
            target = self.form_copy(self._resolve(node["$ref"]), (*inlined, name))
            return {**target, **self.form_copy({k: v for k, v in node.items() if k != "$ref"}, inlined)}
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _VALUE_CONSTRAINTS or (key == "additionalProperties" and value is False):
                continue
            if key in _SCHEMA_LISTS:
                out[key] = [self.form_copy(v, inlined) for v in value]
            elif key in _SCHEMA_MAPS:
                out[key] = {name: self.form_copy(v, inlined) for name, v in value.items()}
            elif key in _SCHEMA_VALUES:
                out[key] = self.form_copy(value, inlined)
            else:
                out[key] = value  # defaults, consts, enums, titles: data, not schemas
        return out


def _fewer_fields_first(members: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`members` reordered so that none follows a member whose fields include all of its own (else kept in order)."""
    fields = [set(m.get("properties", ())) for m in members]
    ordered: list[int] = []
    for i in range(len(members)):
        # before the first placed member whose fields are a strict superset of this one's
        at = next((k for k, j in enumerate(ordered) if fields[i] < fields[j]), len(ordered))
        ordered.insert(at, i)
    return [members[i] for i in ordered]


def _discriminated_check(prop: str, mapping: dict[str, str]) -> dict[str, Any]:
    """if prop == first: then its definition, else if prop == second: ..., else prop must be one of them."""
    check: dict[str, Any] = {"required": [prop], "properties": {prop: {"enum": list(mapping)}}}
    for value, ref in reversed(list(mapping.items())):
        check = {"if": {"required": [prop], "properties": {prop: {"const": value}}}, "then": {"$ref": ref},
                 "else": check}
    return check
