"""Typed configs: strict keys, validators, recipes."""

from __future__ import annotations

import functools

import pytest

from configs.errors import ConfigError
from configs.pipeline import PipelineConfig, load_recipe
from configs.schema import Budget, DataConfig
from tests.conftest import REPO


def test_unknown_key_is_an_error_naming_it(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\ndata: {path: a.json, formt: alpaca}\nselection: {method: random, budget: 3}\n")
    with pytest.raises(ConfigError, match=r"data.formt: Extra inputs are not permitted"):
        load_recipe(recipe)


def test_unknown_keys_suggest_the_closest_allowed_ones(tmp_path):
    from configs.compare import CompareConfig

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\ndata: {path: a.json, formt: alpaca}\nselection: {method: random, budget: 3, zzz: 1}"
                      "\ntraining: {}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe)
    problems = str(err.value).split(": ", 1)[1].split("; ")
    assert problems == [
        "data.formt: Extra inputs are not permitted (did you mean 'format'?)",
        "selection.zzz: Extra inputs are not permitted (allowed here: budget, method, seed, share)",
        "training: Extra inputs are not permitted (did you mean 'train'? a pipeline recipe names its training "
        "section 'train', a comparison recipe 'training')"]
    # a comparison calls it `training`; keys inside lists of union members are matched against that member
    compare = (REPO / "configs/recipes/compare_tiny.yaml").read_text().replace("\ntraining:", "\ntrain:")
    recipe.write_text(compare)
    with pytest.raises(ConfigError, match=r"train: Extra inputs are not permitted \(did you mean 'training'\?"):
        load_recipe(recipe, CompareConfig)
    with pytest.raises(ConfigError, match=r"methods.0.seeed: Extra inputs are not permitted \(did you mean 'seed'\?\)"):
        load_recipe(REPO / "configs/recipes/compare_tiny.yaml", CompareConfig, overrides={"methods.0.seeed": 1})


def test_a_missing_or_unknown_method_lists_the_methods_of_the_schema(tmp_path):
    import typing

    from configs.compare import CompareConfig
    from configs.pipeline import SelectionConfig

    methods = ", ".join(m.model_fields["method"].default for m in typing.get_args(typing.get_args(SelectionConfig)[0]))
    assert methods.startswith("random, longest, full, cherry") and "deita" in methods
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\ndata: {path: a.json}\nselection: {budget: 5}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe)
    assert str(err.value) == f"recipe {recipe}: selection: add `method:`, one of {methods}"
    recipe.write_text("name: x\ndata: {path: a.json}\nselection: {method: cheri, budget: 5}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe)
    assert str(err.value).endswith(f"selection: unknown method 'cheri' (did you mean 'cherry'?): use one of {methods}")
    compare = REPO / "configs/recipes/compare_tiny.yaml"
    with pytest.raises(ConfigError, match=r"methods.1: add `method:`, one of random, longest"):
        load_recipe(compare, CompareConfig, overrides={"methods.1": {"budget": 3}})


def test_budget_needs_exactly_one_of_budget_or_share(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\ndata: {path: a.json}\nselection: {method: random, budget: 3, share: 0.1}\n")
    with pytest.raises(ConfigError, match="exactly one of 'budget' or 'share'"):
        load_recipe(recipe)
    assert Budget(share=0.25).count(10) == 2 and Budget(budget=50).count(10) == 10


def test_unknown_method_and_bad_yaml(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\ndata: {path: a.json}\nselection: {method: magic, budget: 3}\n")
    with pytest.raises(ConfigError, match="selection"):
        load_recipe(recipe)
    recipe.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(recipe)


def test_overrides_and_demo_recipe():
    config = load_recipe(REPO / "configs/recipes/demo.yaml", overrides={"selection.budget": 7})
    assert isinstance(config, PipelineConfig) and config.selection.budget == 7
    assert config.experiment == "demo"


def test_overrides_reach_into_lists_and_bad_paths_are_config_errors():
    from configs.compare import CompareConfig

    recipe = REPO / "configs/recipes/compare_tiny.yaml"
    config = load_recipe(recipe, CompareConfig, overrides={"methods.0.seed": 3})
    assert config.methods[0].method == "random" and config.methods[0].seed == 3
    for dotted, message in [("methods.9.seed", r"'methods.9' needs an index below"),
                            ("methods.x.seed", r"'methods.x' needs an index below"),
                            ("name.x", r"'name' is a str, not a section")]:
        with pytest.raises(ConfigError, match=message):
            load_recipe(recipe, CompareConfig, overrides={dotted: 1})


def test_compare_form_defaults_let_the_shared_budget_be_edited():
    # The Prefect form is pre-filled from the recipe; with the shared budget copied into every method, editing it
    # in the form clashed with those copies ("sets its own budget").
    from configs.compare import CompareConfig

    form = load_recipe(REPO / "configs/recipes/compare_tiny.yaml", CompareConfig).form_defaults()
    assert all(m["budget"] is None and m["share"] is None for m in form["methods"] if m["method"] in ("random", "longest"))
    edited = CompareConfig.model_validate({**form, "budget": 12})
    assert {m.budget for m in edited.methods if isinstance(m, Budget)} == {12}


def test_grape_in_a_comparison_keeps_the_shared_budget():
    import yaml

    from configs.compare import CompareConfig

    raw = yaml.safe_load((REPO / "configs/recipes/compare_tiny.yaml").read_text())
    grape = next(m for m in raw["methods"] if m["method"] == "grape")
    assert "budget" not in grape  # the bundled recipe leaves it to the shared budget
    assert next(m for m in CompareConfig.model_validate(raw).methods if m.method == "grape").budget == raw["budget"]
    grape["budget"] = raw["budget"] + 5
    with pytest.raises(ValueError, match="'grape' sets its own budget"):
        CompareConfig.model_validate(raw)


def test_dpo_without_pairs_is_refused_before_anything_trains():
    import yaml

    from configs.compare import CompareConfig

    raw = yaml.safe_load((REPO / "configs/recipes/demo.yaml").read_text())
    raw["train"]["dpo"] = {}
    with pytest.raises(ValueError, match="train.dpo needs preference pairs"):
        PipelineConfig.model_validate(raw)
    raw["train"]["dpo"] = {"pairs_path": "pairs.json"}
    assert PipelineConfig.model_validate(raw).train.dpo.pairs_path == "pairs.json"
    compare = yaml.safe_load((REPO / "configs/recipes/compare_tiny.yaml").read_text())
    compare["training"]["dpo"] = {"pairs_path": "pairs.json"}
    with pytest.raises(ValueError, match="SFT only: remove training.dpo"):
        CompareConfig.model_validate(compare)


def test_values_that_cannot_mean_anything_are_refused():
    from configs.runner import ScaleOutConfig
    from configs.schema import ModelConfig
    from configs.train import SFTStageConfig

    for make in (lambda: ModelConfig(name_or_path=""), lambda: DataConfig(path=""),
                 lambda: SFTStageConfig(warmup_steps=1.5), lambda: ScaleOutConfig(workers=2, processes=False)):
        with pytest.raises(ValueError):
            make()
    assert SFTStageConfig(warmup_steps=0.1).warmup_steps == 0.1 and SFTStageConfig(warmup_steps=3).warmup_steps == 3
    assert ScaleOutConfig(engine="dask", processes=False).processes is False
    with pytest.raises(ValueError, match="threads_per_worker: Dask options"):
        ScaleOutConfig(threads_per_worker=4)


def test_a_share_that_keeps_nothing_is_an_error():
    assert Budget(share=0.1).count(40) == 4 and Budget(share=0.1).count(0) == 0
    with pytest.raises(ConfigError, match="share 0.01 of 40 samples keeps none"):
        Budget(share=0.01).count(40)


def test_every_config_field_has_a_description_for_the_prefect_form():
    import importlib
    import inspect
    import pkgutil

    import configs
    from configs.schema import StrictModel

    missing, seen = [], 0
    for info in pkgutil.iter_modules(configs.__path__):
        module = importlib.import_module(f"configs.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, StrictModel) and cls.__module__ == module.__name__:
                seen += 1
                missing += [f"{name} (docstring)"] * (not cls.__doc__)
                missing += [f"{name}.{field}" for field, info in cls.model_fields.items() if not info.description]
    assert seen > 30 and not missing, missing
    data = PipelineConfig.model_json_schema()["$defs"]["DataConfig"]["properties"]
    assert all("description" in field for field in data.values())  # and they reach the schema the form renders


# Which flow each bundled recipe is for (the file's header says how to run it); a new recipe must be listed.
RECIPE_FLOWS = {
    "demo": "pipeline", "cherry_tiny": "pipeline", "superfilter_tiny": "pipeline", "deita_tiny": "pipeline",
    "grape_vicuna_smollm2": "grape", "grape_tiny": "grape", "compare_tiny": "compare", "compare_smollm2": "compare",
    "compare_smollm2_small": "compare", "sft_tiny": "sft", "dpo_tiny": "dpo", "evaluate_tiny": "evaluate",
}


@pytest.mark.parametrize("stem", sorted(RECIPE_FLOWS))
def test_every_bundled_recipe_validates_as_its_flow(stem):
    from flows.serve import flow_by_name, flow_config_type

    path = REPO / "configs" / "recipes" / f"{stem}.yaml"
    config = load_recipe(path, model=flow_config_type(flow_by_name(RECIPE_FLOWS[stem])))
    assert f"--flow {RECIPE_FLOWS[stem]}" in path.read_text() or RECIPE_FLOWS[stem] == "pipeline"
    assert config.name


def test_no_recipe_is_left_unlisted():
    assert {p.stem for p in (REPO / "configs" / "recipes").glob("*.yaml")} == set(RECIPE_FLOWS)


@pytest.mark.parametrize("stem", ["cherry_tiny", "deita_tiny", "demo"])
def test_field_reference_paths_are_what_set_takes(stem):
    """Every leaf `pomona fields` lists that the recipe holds can be set by its printed path to its value."""
    from configs.fields import field_docs

    path = REPO / "configs" / "recipes" / f"{stem}.yaml"
    config = load_recipe(path)
    dumped = config.model_dump(mode="json")
    method = f"method: {config.selection.method}"
    checked = 0
    for row in field_docs(PipelineConfig):
        if row.variant not in ("", method) or row.type.startswith(("section", "one of", "list of items")):
            continue
        node = dumped
        for part in row.path.split("."):
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        if node is KeyError:  # a section the recipe leaves out, or a list item
            continue
        assert load_recipe(path, overrides={row.path: node}) == config, row.path
        changed = load_recipe(path, overrides={row.path: node}).model_dump(mode="json")
        assert changed == dumped, row.path
        checked += 1
    assert checked > 25, checked


def test_field_reference_names_types_defaults_union_members_and_runtime_fields():
    from configs.compare import CompareConfig
    from configs.fields import docs_under, field_docs, render_field_docs

    rows = {(r.path, r.variant): r for r in field_docs(PipelineConfig)}
    threshold = rows[("selection.rule.threshold", "method: cherry")]
    assert (threshold.type, threshold.default) == ("float", "1.0") and "dropped" in threshold.description
    assert ("selection.rule.threshold", "method: superfilter") in rows
    assert not any(path == "selection.rule.threshold" and variant == "method: deita" for path, variant in rows)
    assert rows[("selection", "")].type.startswith("one of 7 sections, chosen by selection.method: random, longest")
    assert rows[("data.format", "")].type == "'auto' | 'alpaca' | 'sharegpt' | 'messages'"
    assert rows[("name", "")].default == "required"
    scale_out = rows[("selection.scoring.scale_out", "method: cherry")]
    assert scale_out.runtime_only and not rows[("selection.scoring.max_length", "method: cherry")].runtime_only
    # the union inside a list keeps its discriminator
    compare = {(r.path, r.variant) for r in field_docs(CompareConfig)}
    assert ("methods.N.scoring.scorer.name_or_path", "method: cherry") in compare
    # a concrete list index selects the `N` rows; a typo is refused with the closest paths
    assert {r.path for r in docs_under(field_docs(CompareConfig), "methods.2.tau")} == {"methods.N.tau"}
    with pytest.raises(ConfigError, match=r"no field 'selection.rul' in this config .*did you mean 'selection.rule'"):
        docs_under(field_docs(PipelineConfig), "selection.rul")
    text = render_field_docs(docs_under(field_docs(PipelineConfig), "selection.scoring.scale_out"), width=80)
    assert "selection.scoring.scale_out.workers: int = 1  [method: cherry]  [runtime: not in the cache key]" in text
    assert all(len(line) <= 80 for line in text.splitlines() if line.startswith("    "))


@pytest.mark.parametrize("selection", [
    {"method": "superfilter", "budget": 5, "scoring": {"scorer": {"name_or_path": "tiny:0"}}},
    {"method": "deita", "complexity_scorer": {"model": {"name_or_path": "tiny:0"}},
     "quality_scorer": {"model": {"name_or_path": "tiny:0"}}, "embedding": {"model": {"name_or_path": "tiny:0"}}},
    {"method": "cherry", "budget": 5, "scoring": {"scorer": {"name_or_path": "tiny:0"}}},
])
def test_field_reference_defaults_are_what_a_recipe_that_leaves_the_field_out_gets(tmp_path, selection):
    """Superfiltering's template, length and rule, and Deita's budget, differ from the shared sections' own
    defaults: `pomona fields` prints the value such a recipe runs with, not the shared class's default."""
    import yaml

    from configs.fields import field_docs

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "data": {"path": "x.jsonl"}, "selection": selection}))
    dumped = load_recipe(recipe).model_dump(mode="json")
    method, checked = f"method: {selection['method']}", 0
    for row in field_docs(PipelineConfig):
        if row.variant != method or row.default in ("required", "[...]", "the section's defaults"):
            continue
        given, node = selection, dumped
        for part in row.path.split("."):
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        for part in row.path.split(".")[1:]:
            given = given.get(part, KeyError) if isinstance(given, dict) else KeyError
        if node is KeyError or given is not KeyError:  # a section left out, or a value the recipe names
            continue
        assert yaml.safe_load(row.default) == node, (row.path, row.default, node)
        checked += 1
    assert checked > 5, checked


def test_the_run_form_offers_the_selection_method_as_a_choice():
    """Prefect's run form renders `anyOf` as one button per member with its fields; pydantic writes a discriminated
    union as `oneOf`, which the form showed as a bare JSON editor (no method list, no fields, no defaults)."""
    import json

    from flows.serve import discover_flows

    for _, flow_obj in discover_flows():
        assert '"oneOf"' not in json.dumps(flow_obj.parameters.model_dump()), flow_obj.name  # what the form reads
    selection = PipelineConfig.model_json_schema()["properties"]["selection"]
    members = [ref["$ref"].rsplit("/", 1)[-1] for ref in selection["anyOf"]]
    assert members[0] == "RandomSelection" and {"SuperfilterSelection", "GrapeSelection"} <= set(members)
    assert selection["description"] == "Selection method and its budget."
    # each button reads as the `method` a recipe writes, not the class name
    defs = PipelineConfig.model_json_schema()["$defs"]
    assert [defs[m]["title"] for m in members] == [defs[m]["properties"]["method"]["default"] for m in members]
    # the same validation: each member takes only its own method
    assert PipelineConfig.model_validate({"name": "x", "data": {"path": "a.json"},
                                          "selection": {"method": "longest", "budget": 3}}).selection.method == "longest"


def test_form_descriptions_show_their_placeholders():
    """Prefect renders descriptions as markdown, which drops `<name>` outside a code span as an HTML tag: the form
    read "'tiny:' builds a tiny random Llama" (of 'tiny:<seed>')."""
    import json
    import re

    from flows.serve import discover_flows

    hidden = set()
    for _, flow_obj in discover_flows():
        for text in re.findall(r'"description": "((?:[^"\\]|\\.)*)"', json.dumps(flow_obj.parameters.model_dump())):
            if re.search(r"<[A-Za-z_/][^>]*>", re.sub(r"`[^`]*`", "", text)):  # outside code spans
                hidden.add(text)
    assert not hidden, hidden


@functools.cache
def _deployment_schemas():
    """(Built once: 3 s.) Each flow's Prefect parameter schema as registered (rewritten) and as Prefect writes it, with its defaults."""
    from prefect.utilities.callables import parameter_schema

    from flows.serve import build_deployments, discover_flows

    raw = {flow_obj.name: parameter_schema(flow_obj).model_dump_for_openapi() for _, flow_obj in discover_flows()}
    return {d.flow_name: (d._parameter_openapi_schema.model_dump_for_openapi(), raw[d.flow_name], d.parameters)
            for d in build_deployments()}


def _refusal(params: dict, schema: dict) -> str | None:
    """What the Prefect server answers when a run is created with `params` (None: accepted)."""
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    try:
        validate(params, schema, raise_on_error=True)
    except ValidationError as exc:
        return str(exc)
    return None


def _with(params: dict, path: str, value) -> dict:
    """A copy of `params` with `path` (`config.methods.0.budget`) set, the way `--set` sets a recipe's field."""
    import copy
    from pathlib import Path

    from configs.pipeline import _set_dotted

    out = copy.deepcopy(params)
    _set_dotted(out, path, value, Path("<test parameters>"))
    return out


def test_a_value_refused_in_the_run_form_is_named_by_its_field():
    """Prefect's server checks a new run against the deployment's schema; inside a union (the selection method, an
    optional section) it said only "{...the whole section...} is not valid under any of the given schemas"."""
    schemas = _deployment_schemas()
    pipeline, pipeline_raw, defaults = schemas["pomona-pipeline"]
    compare, _, compare_defaults = schemas["pomona-compare"]
    for flow_name, (schema, raw, params) in schemas.items():
        assert _refusal(params, schema) is None and _refusal(params, raw) is None, flow_name  # the recipe defaults
    cases = [
        (pipeline, defaults, "config.selection.budget", -5, "-5 is less than the minimum of 1"),
        (pipeline, defaults, "config.train.sft.lora.r", 0, "0 is less than the minimum of 1"),
        (pipeline, defaults, "config.data.limit", 0, "0 is less than the minimum of 1"),
        (compare, compare_defaults, "config.methods.0.budget", -3, "-3 is less than the minimum of 1"),
    ]
    for schema, params, path, value, reason in cases:
        field = path.replace(".0.", "[0].")
        assert _refusal(_with(params, path, value), schema) == (
            f"Validation failed for field {field!r}. Failure reason: {reason}"), path
    # Prefect's own schema named only the union
    assert "'config.selection'" in _refusal(_with(defaults, "config.selection.budget", -5), pipeline_raw)


def test_the_rewritten_run_form_accepts_and_refuses_what_prefects_schema_did():
    from prefect.utilities.schema_tools.validation import validate

    schema, raw, defaults = _deployment_schemas()["pomona-pipeline"]
    cherry = {"method": "cherry", "budget": 3, "scoring": {"scorer": {"name_or_path": "tiny:0"}}}
    variants = [
        ("config.selection", {"method": "longest", "budget": 3}, True),
        ("config.selection", {"method": "longest", "share": 0.5}, True),
        ("config.selection", cherry, True),
        ("config.selection", {**cherry, "budget": 0}, False),
        ("config.selection", {**cherry, "model": {}}, False),  # not a field of Cherry's
        ("config.selection", {"method": "longest", "budget": 3, "seed": 1}, False),  # random's field, not longest's
        ("config.selection", {"method": "nope", "budget": 3}, False),
        ("config.selection.budget", "many", False),
        ("config.train", None, True),
        ("config.train.sft.lora", None, True),
        ("config.train.sft.lora.dropout", 1.0, False),
        ("config.train.sft.learning_rate", 0, False),
        ("config.data", None, True),
        ("config.data.bogus", 1, False),
    ]
    for path, value, valid in variants:
        params = _with(defaults, path, value)
        # the verdict alone: Prefect's error list (what the UI's check reads) is empty or not; `_refusal` also checks
        # the 190 KB schema itself on every call, as the server does
        assert (not validate(params, raw)) is valid, (path, value, _refusal(params, raw))
        assert (not validate(params, schema)) is valid, (path, value, _refusal(params, schema))
    # The one difference: a selection without its method reached the flow, whose config refused it at the start.
    nameless = _with(defaults, "config.selection", {"budget": 3})
    assert _refusal(nameless, raw) is None
    assert _refusal(nameless, schema) == ("Validation failed for field 'config.selection'. Failure reason: 'method' "
                                          "is a required property")
    with pytest.raises(Exception, match="Unable to extract tag using discriminator 'method'"):
        PipelineConfig.model_validate(nameless["config"])


def test_the_run_form_renders_from_copies_without_checks():
    """The form's union members keep what it renders - their order, titles (the buttons), fields, defaults,
    required fields - and carry no check of their own: those are in the `if`/`then` the form does not read."""
    import json

    schema, raw, _ = _deployment_schemas()["pomona-pipeline"]
    selection = schema["definitions"]["PipelineConfig"]["properties"]["selection"]
    members = [ref["$ref"].rsplit("/", 1)[-1] for ref in raw["definitions"]["PipelineConfig"]["properties"]["selection"]["anyOf"]]
    titles = {raw["definitions"][m]["title"]: m for m in members}
    # every member once, those whose fields another's include first (the form reads values back by field names)
    assert [m["title"] for m in selection["anyOf"]] == ["full", "longest", "random", "cherry", "superfilter", "grape",
                                                       "deita"]
    assert sorted(titles) == sorted(m["title"] for m in selection["anyOf"])
    for member, name in ((m, titles[m["title"]]) for m in selection["anyOf"]):
        assert list(member["properties"]) == list(raw["definitions"][name]["properties"]), name
        assert member.get("required") == raw["definitions"][name].get("required"), name
        text = json.dumps(member)
        assert '"$ref"' not in text and '"minimum"' not in text and '"if"' not in text, name
    cherry = next(m for m in selection["anyOf"] if m["title"] == "cherry")
    # a field that is a section keeps its own label ("Scoring"), not its class name ("ScoringConfig")
    assert cherry["properties"]["scoring"]["title"] == "Scoring" and "description" in cherry["properties"]["scoring"]
    # item counts stay: the form offers no third item for the percentile band (Prefect's V2 UI read it)
    band = cherry["properties"]["pre_experience"]["anyOf"][0]["properties"]["band"]
    assert (band["minItems"], band["maxItems"]) == (2, 2)
    # pydantic writes no title on a field that is a section or a union: each gets the one pydantic gives the others
    pipeline = schema["definitions"]["PipelineConfig"]["properties"]
    assert "title" not in raw["definitions"]["PipelineConfig"]["properties"]["train"]
    assert (pipeline["train"]["title"], pipeline["output_format"]["title"]) == ("Train", "Output Format")
    # one `if` per method, each checked against its own definition; anything else is an unknown method
    checked, node = {}, selection
    while "if" in node:
        checked[node["if"]["properties"]["method"]["const"]] = node["then"]["$ref"].rsplit("/", 1)[-1]
        node = node["else"]
    assert checked == {raw["definitions"][m]["title"]: m for m in members}
    assert node["properties"]["method"]["enum"] == sorted(checked)


def test_checked_form_schema_on_a_small_schema():
    """The rewrite on a schema written out by hand: an optional section, a discriminated union, a union of two
    objects it cannot single out (left as it is), a rewrite applied twice, and a definition that refers to itself."""
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    from configs.form_schema import checked_form_schema

    defs = {
        "Inner": {"type": "object", "title": "Inner", "required": ["n"],
                  "properties": {"n": {"type": "integer", "minimum": 1, "title": "N"}}, "additionalProperties": False},
        "A": {"type": "object", "title": "a", "properties": {"kind": {"const": "a", "default": "a"},
                                                               "inner": {"$ref": "#/definitions/Inner"}}},
        "B": {"type": "object", "title": "b", "properties": {"kind": {"const": "b", "default": "b"},
                                                               "size": {"type": "integer", "maximum": 3}}},
    }
    schema = {"type": "object", "definitions": defs, "properties": {
        "section": {"anyOf": [{"$ref": "#/definitions/Inner"}, {"type": "null"}], "default": None},
        "choice": {"anyOf": [{"$ref": "#/definitions/A"}, {"$ref": "#/definitions/B"}],
                   "discriminator": {"propertyName": "kind",
                                     "mapping": {"a": "#/definitions/A", "b": "#/definitions/B"}}},
        "either": {"anyOf": [{"$ref": "#/definitions/A"}, {"$ref": "#/definitions/B"}]},
    }}
    checked = checked_form_schema(schema)
    assert checked_form_schema(checked) == checked
    assert checked["properties"]["either"] == schema["properties"]["either"]
    section = checked["properties"]["section"]
    assert section["anyOf"][0] == {"type": "object", "title": "Inner", "required": ["n"],
                                   "properties": {"n": {"type": "integer", "title": "N", "position": 0}}}
    assert section["if"] == {"type": "object"} and section["then"] == {"$ref": "#/definitions/Inner"}
    # the member's own field refers to a definition: inlined without its class title
    assert checked["properties"]["choice"]["anyOf"][0]["properties"]["inner"]["properties"]["n"] == {
        "type": "integer", "title": "N", "position": 0}

    def refusal(value) -> str | None:
        try:
            validate(value, checked, raise_on_error=True)
        except ValidationError as exc:
            return str(exc)
        return None

    assert refusal({"section": None, "choice": {"kind": "b", "size": 2}}) is None
    assert refusal({"section": {"n": 0}}) == ("Validation failed for field 'section.n'. Failure reason: 0 is less "
                                              "than the minimum of 1")
    assert refusal({"choice": {"kind": "a", "inner": {"n": 0}}}).startswith(
        "Validation failed for field 'choice.inner.n'.")
    assert refusal({"choice": {"kind": "b", "size": 4}}) == (
        "Validation failed for field 'choice.size'. Failure reason: 4 is greater than the maximum of 3")
    assert refusal({"section": {"n": 1, "m": 2}}) == (
        "Validation failed for field 'section'. Failure reason: Additional properties are not allowed ('m' was "
        "unexpected)")

    looped = {"type": "object", "definitions": {"Node": {"type": "object", "properties": {
        "next": {"anyOf": [{"$ref": "#/definitions/Node"}, {"type": "null"}]}}}},
        "properties": {"head": {"anyOf": [{"$ref": "#/definitions/Node"}, {"type": "null"}]}}}
    with pytest.raises(ValueError, match="'Node' refers to itself: Node -> Node"):
        checked_form_schema(looped)


def _form_shows(members: list[dict], value: dict) -> str:
    """The member under which Prefect's run forms (V1 and V2 alike, read from the UI bundles of Prefect 3.8.8) show an
    existing value: the first one sharing the most field names with it."""
    counts = [len(set(value) & set(m.get("properties", ()))) for m in members]
    return members[counts.index(max(counts))]["title"]


def test_the_run_form_shows_every_recipe_method_under_its_own_button():
    """A `longest` or `full` selection showed as `random` (whose fields include theirs), which added its `seed`, and
    Submit was refused: `pomona serve --recipe` with such a recipe could not start a run from the form."""
    from prefect.utilities.callables import parameter_schema

    from configs.form_schema import checked_form_schema
    from flows.serve import discover_flows, flow_config_type

    flows = {stem: f for stem, f in discover_flows()}
    seen = set()
    for stem, union in (("pipeline", lambda d: d["PipelineConfig"]["properties"]["selection"]),
                        ("compare", lambda d: d["CompareConfig"]["properties"]["methods"]["items"])):
        schema = checked_form_schema(parameter_schema(flows[stem]).model_dump_for_openapi())
        members = union(schema["definitions"])["anyOf"]
        for recipe in sorted((REPO / "configs/recipes").glob("*.yaml")):
            try:
                config = load_recipe(recipe, model=flow_config_type(flows[stem])).form_defaults()
            except ConfigError:
                continue  # a recipe of another flow
            for value in config["methods"] if stem == "compare" else [config["selection"]]:
                assert _form_shows(members, value) == value["method"], (stem, recipe.name, value)
                seen.add(value["method"])
        # and each method's own button, as a user clicks it, shows its defaults under itself
        for member in members:
            defaults = {name: field.get("default") for name, field in member["properties"].items()}
            assert _form_shows(members, defaults) == member["title"], (stem, member["title"])
    assert seen == {"random", "longest", "full", "cherry", "superfilter", "grape", "deita"}
