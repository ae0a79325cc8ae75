"""The GPU comparison kit (bench/gpu_compare_kit.py, `make gpu-compare-kit`): what it packs, and that a GPU machine
gets back exactly that - the recipes pointed at the kit's copy of every file outside the repository."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil

import pytest
import yaml

from configs.compare import CompareConfig
from configs.pipeline import load_recipe
from configs.schema import missing_input_files
from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("gpu_compare_kit", REPO / "bench" / "gpu_compare_kit.py")
kit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kit)

SMOLLM2_RECIPES = ["compare_smollm2_small.yaml", "compare_smollm2.yaml"]


def makefile_pins(variable: str) -> list[str]:
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    return re.search(rf"^{variable} :=(.*)$", text, re.MULTILINE).group(1).split()


def test_the_kit_wheels_are_the_versions_pomona_is_tested_with():
    """One wheel per package (two stop the whole install there), each at constraints.txt's version."""
    def name(pin: str) -> str:
        return re.sub(r"[-_.]+", "-", pin.split("==")[0]).lower()

    pinned = {name(line): line.split("==")[1] for line in (REPO / "constraints.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    wheels = makefile_pins("GPU_WHEELS") + makefile_pins("GPU_COMPARE_WHEELS")[1:]  # [0] is $(GPU_WHEELS)
    wheels += makefile_pins("GPU_COMPARE_SDISTS")
    assert makefile_pins("GPU_COMPARE_WHEELS")[0] == "$(GPU_WHEELS)"
    names = [name(w) for w in wheels]
    assert len(names) == len(set(names))
    assert {n: w.split("==")[1] for n, w in zip(names, wheels)} == {n: pinned[n] for n in names}


@pytest.mark.parametrize("recipe", SMOLLM2_RECIPES)
def test_the_recipe_reads_nothing_outside_the_repo_once_pointed_at_the_kit(recipe, tmp_path):
    """Every `../` path in the recipe is an input the kit carries, and with the kit's overrides the recipe names
    only files under the kit's folder (or in the repository), all there."""
    path = REPO / "configs" / "recipes" / recipe
    inputs = kit.outside_inputs(load_recipe(path, CompareConfig))
    written = set(re.findall(r"\.\./[\w./-]+", path.read_text()))
    assert written and written == set(inputs.values())
    sets = {}
    for field, value in inputs.items():
        placed = tmp_path / kit.kit_path(value)
        if placed.suffix:
            placed.parent.mkdir(parents=True, exist_ok=True)
            placed.write_text("[]")
        else:
            placed.mkdir(parents=True, exist_ok=True)
        sets[field] = str(placed)
    config = load_recipe(path, CompareConfig, overrides=sets)
    assert "../" not in config.model_dump_json()
    # the model folder is made on the machine (import-smollm2); every data path resolves under the kit
    assert [m for m in missing_input_files(config) if "name_or_path" not in m] == []


def kit_inputs(tmp_path, monkeypatch):
    """A recipe with two inputs in ../shared (a file, a folder), three wheels and a random GGUF: small enough to
    pack in a fraction of a second into several parts (cap 0.15 MiB, chunks of 0.05 MiB)."""
    here = tmp_path / "repo"
    shared = tmp_path / "shared" / "data"
    (shared / "eval").mkdir(parents=True)
    (shared / "pool.json").write_text((REPO / "tests" / "data" / "alpaca_cherry_40.json").read_text())
    (shared / "eval" / "vicuna_test_set.jsonl").write_text('{"instruction": "hi"}\n')
    raw = yaml.safe_load((REPO / "configs" / "recipes" / "compare_tiny.yaml").read_text())
    raw["data"]["path"] = "../shared/data/pool.json"
    raw["evaluate"]["likelihood"]["data"]["path"] = str(REPO / "tests" / "data" / "alpaca_demo_200.json")  # travels
    raw["evaluate"]["instruction"] = {"sets": ["vicuna"], "data_dir": "../shared/data/eval", "limit": 1,
                                      "pairwise": False}
    raw["evaluate"]["judge"] = {"model": {"name_or_path": "tiny:0"}}
    here.mkdir()
    recipe = here / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for n, size in [("a", 90_000), ("b", 40_000), ("c", 10)]:
        (wheels / f"{n}-1.0-py3-none-any.whl").write_bytes(os.urandom(size))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(os.urandom(200_000))  # random: xz keeps it at its size, so it needs several chunks
    monkeypatch.chdir(here)  # `../shared` is found from here, as from a checkout beside ../shared
    return shared, recipe, wheels, gguf


def test_pack_check_and_assemble_give_back_every_file(tmp_path, monkeypatch, capsys):
    shared, recipe, wheels, gguf = kit_inputs(tmp_path, monkeypatch)
    parts = kit.pack(tmp_path / "kit", wheels, gguf, [recipe], cap_mib=0.15, chunk_mib=0.05)
    assert len(parts) >= 3
    for part in parts:
        assert sum(f.stat().st_size for f in part.rglob("*") if f.is_file() and f.name != kit.MANIFEST) <= 0.15 * 2**20
        assert kit.check(tmp_path / "kit", int(part.name[4:])) == 0

    root = tmp_path / "root"
    assert kit.assemble(tmp_path / "kit", root) == 0
    assert (root / "gguf" / "m.gguf").read_bytes() == gguf.read_bytes()
    assert (root / "shared" / "data" / "pool.json").read_text() == (shared / "pool.json").read_text()
    assert (root / "wheels" / "b-1.0-py3-none-any.whl").read_bytes() == (wheels / "b-1.0-py3-none-any.whl").read_bytes()
    capsys.readouterr()
    assert kit.overrides(tmp_path / "kit", "r.yaml", root) == 0
    assert capsys.readouterr().out.split() == [f"data.path={root}/shared/data/pool.json",
                                               f"evaluate.instruction.data_dir={root}/shared/data/eval"]

    chunk = next((tmp_path / "kit").glob("part*/gguf/*.001"))
    chunk.write_bytes(b"x" + chunk.read_bytes()[1:])
    assert kit.check(tmp_path / "kit", int(chunk.parts[-3][4:])) == 1
    assert kit.assemble(tmp_path / "kit", root) == 1
    shutil.rmtree(parts[0])  # the machine went back between calls: the last call finds part 1 gone
    capsys.readouterr()
    assert kit.assemble(tmp_path / "kit", root) == 1
    assert "parts missing here: [1]" in capsys.readouterr().out


def test_a_part_from_another_packing_is_named_not_used(tmp_path, monkeypatch, capsys):
    """A repack between calls leaves parts of two packings on the machine: each part is checked against its own
    manifest, and assembling names the part that is not of the others' packing."""
    _, recipe, wheels, gguf = kit_inputs(tmp_path, monkeypatch)
    parts = kit.pack(tmp_path / "kit", wheels, gguf, [recipe], cap_mib=0.15, chunk_mib=0.05)
    gguf.write_bytes(os.urandom(200_000))  # the same files but the model: another packing, the same part sizes
    other = kit.pack(tmp_path / "other", wheels, gguf, [recipe], cap_mib=0.15, chunk_mib=0.05)
    assert len(parts) == len(other) >= 3
    ours = json.loads((parts[0] / kit.MANIFEST).read_text()).get("pack")
    theirs = json.loads((other[1] / kit.MANIFEST).read_text()).get("pack")
    shutil.rmtree(parts[1])
    shutil.copytree(other[1], parts[1])  # call 2 carried part2 of the new packing, part1 is the old one's
    capsys.readouterr()

    # each part intact by its own manifest, yet the kit is not one: assembling says which part is foreign
    assert kit.assemble(tmp_path / "kit", tmp_path / "root") == 1
    out = capsys.readouterr().out
    assert "the parts here come from different packings" in out
    assert ours != theirs
    rest = ", ".join(p.name for p in parts if p.name != "part2")
    assert f"{rest}: pack {ours} ({len(parts)} parts)" in out and f"part2: pack {theirs}" in out
    assert not (tmp_path / "root").exists()

    # part2 on its own is intact (its own manifest), but part1 before it is from another packing
    assert kit.check(tmp_path / "kit", 2) == 1
    out = capsys.readouterr().out
    assert f"part2 of {len(parts)} (pack {theirs})" in out and "intact" in out
    assert f"part2: pack {theirs}" in out and "part1 must be carried again" in out
    # part1's call does not fail for a later part from another packing: the later calls replace it
    assert kit.check(tmp_path / "kit", 1) == 0
    assert "the later calls replace them" in capsys.readouterr().out

    # a manifest moved to another part's folder, or edited, is not trusted either
    shutil.copyfile(parts[0] / kit.MANIFEST, parts[1] / kit.MANIFEST)
    assert kit.check(tmp_path / "kit", 2) == 1
    assert "the manifest of part1, not of part2" in capsys.readouterr().out
    edited = json.loads((parts[0] / kit.MANIFEST).read_text())
    edited["parts"] += 1
    (parts[0] / kit.MANIFEST).write_text(json.dumps(edited))
    assert kit.check(tmp_path / "kit", 1) == 1
    assert "does not match its content" in capsys.readouterr().out
