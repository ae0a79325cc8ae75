"""The SmolLM2 comparison's kit for a lent GPU machine: packing here, checking and assembling there.

A device call carries the working tree plus at most 64 MiB, and the machine reaches no registry. What the comparison
needs beyond the image - about 89 MB of Python 3.12 wheels, SmolLM2's 94 MiB GGUF and the recipe's data from
../shared - is therefore packed into a few part folders of at most CAP_MIB each (`make gpu-compare-kit`), carried
one per call while the machine stays warm, and put together by the last call (bench/gpu_compare.sh).

    pack KIT --wheels DIR --gguf FILE RECIPE...   (here, pomona's venv) fill KIT/part1..N, print their sizes
    check KIT N                                   (there, stdlib only) is part N there, complete and intact?
    assemble KIT ROOT                             (there) every part checked, all of one packing, the GGUF rebuilt:
                                                  ROOT/wheels, ...
    overrides KIT RECIPE ROOT                     (there) the recipe's --set arguments pointing at ROOT's data
    env-check SITE                                (there) requirements of the carried wheels the machine misses
    summary EXPERIMENT                            (there, with pomona importable) wall times from MLflow, markdown

Every part carries its own copy of the kit's manifest (kit.json) with a pack id, a hash of that manifest: `check`
verifies part N against part N's own manifest, and a part left on the machine from another packing (a repack
between calls) is named as such rather than read as damaged or, worse, used.

The commands that run on the GPU machine use the standard library only (and `packaging`, which the image has), so
they work before the wheels are installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

# 64 MiB per call, less the working tree (~2 MB) and room for it to grow.
CAP_MIB = 58
# GGUF pieces small enough that the packing fills every part close to the cap.
CHUNK_MIB = 8
MANIFEST = "kit.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------ packing

def outside_inputs(config) -> dict[str, str]:
    """`dotted.field: path` for every input the config names outside the repository (`../shared/...`): those do not
    travel with the working tree. Dotted fields are as `--set` takes them (list items by index)."""
    from pydantic import BaseModel

    from configs.errors import ConfigError
    from configs.schema import REPO_ROOT, repo_path

    found: dict[str, str] = {}

    def walk(node, where: str) -> None:
        for name, field in type(node).model_fields.items():
            value, here = getattr(node, name), f"{where}{name}"
            extra = field.json_schema_extra
            if isinstance(extra, dict) and extra.get("pomona_input_file") and isinstance(value, str) and value:
                resolved = repo_path(value) if extra["pomona_input_file"] == "repo" else Path(value).resolve()
                if not resolved.is_relative_to(REPO_ROOT):
                    if not value.startswith("../"):
                        raise ConfigError(f"{here}: {value!r} is outside the repository and not ../-relative: "
                                          "the kit cannot place it")
                    found[here] = value
            items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) \
                else [(None, value)]
            for key, item in items:
                if isinstance(item, BaseModel):
                    walk(item, f"{here}." if key is None else f"{here}.{key}.")

    walk(config, "")
    return found


def kit_path(value: str) -> str:
    """Where an outside input lives in the kit: its path without the leading `../` (`shared/data/eval`)."""
    parts = Path(value).parts
    while parts and parts[0] == "..":
        parts = parts[1:]
    return Path(*parts).as_posix()


def first_fit(items: list[tuple[str, int]], cap: int) -> list[list[str]] | None:
    """Largest first into the fewest bins that hold them (None when even one item is over the cap)."""
    if any(size > cap for _, size in items):
        return None
    bins: list[tuple[int, list[str]]] = []
    for name, size in sorted(items, key=lambda it: -it[1]):
        for i, (used, names) in enumerate(bins):
            if used + size <= cap:
                bins[i] = (used + size, names + [name])
                break
        else:
            bins.append((size, [name]))
    # fullest part first: an early call that carries the most leaves the least for the call that also runs
    return [names for _, names in sorted(bins, key=lambda b: -b[0])]


def xz_file(src: Path, dst: Path) -> None:
    """src compressed to dst: the xz tool on all cores where it is installed (~1 min for the GGUF on 2 cores),
    else Python's lzma (single-threaded, a few minutes); Python's lzma reads either."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if shutil.which("xz"):
        with open(dst, "wb") as out:
            subprocess.run(["xz", "-T0", "-6", "-c", str(src)], stdout=out, check=True)
    else:
        with open(src, "rb") as f, lzma.open(dst, "wb", preset=6) as out:
            shutil.copyfileobj(f, out, 1 << 20)


def pack(kit: Path, wheels: Path, gguf: Path, recipes: list[Path], cap_mib: float = CAP_MIB,
         chunk_mib: float = CHUNK_MIB) -> list[Path]:
    """Fill kit/part1..N with the wheels, the GGUF in chunks and every outside input of the recipes."""
    from configs.compare import CompareConfig
    from configs.pipeline import load_recipe
    from configs.schema import repo_path

    sources: dict[str, Path] = {}  # kit-relative name -> file here
    overrides: dict[str, dict[str, str]] = {}
    for recipe in recipes:
        fields = outside_inputs(load_recipe(recipe, CompareConfig))
        overrides[recipe.name] = {field: kit_path(value) for field, value in fields.items()}
        for value in fields.values():
            src, base = repo_path(value), kit_path(value)
            if src.is_file():
                sources[base] = src
            else:  # a folder (the instruction sets'): all of it, a few hundred KB
                sources.update({f"{base}/{f.relative_to(src).as_posix()}": f
                                for f in sorted(src.rglob("*")) if f.is_file()})
    wheel_files = sorted(wheels.glob("*.whl"))
    if not wheel_files:
        raise SystemExit(f"no wheels in {wheels}")
    names = {}
    for w in wheel_files:
        project = w.name.split("-")[0].lower().replace("_", "-")
        if project in names:  # two versions of one package stop the whole install there
            raise SystemExit(f"two wheels of {project}: {names[project]} and {w.name}")
        names[project] = w.name
        sources[f"wheels/{w.name}"] = w

    for old in kit.glob("part*"):
        shutil.rmtree(old)
    # The GGUF and the JSON data travel xz-compressed (the GGUF by 8 %, the data by 75 %): uncompressed, the kit
    # needs a fourth call for its last few MiB. The wheels are zips already.
    packed = kit / "packed"
    shutil.rmtree(packed, ignore_errors=True)
    unpack: dict[str, str] = {}
    for name in [n for n in sources if not n.startswith("wheels/")]:
        dst = packed / f"{name}.xz"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(lzma.compress(sources.pop(name).read_bytes(), preset=6))
        sources[f"{name}.xz"], unpack[f"{name}.xz"] = dst, name
    gguf_xz = packed / f"{gguf.name}.xz"
    xz_file(gguf, gguf_xz)
    chunk = int(chunk_mib * 2**20)
    xz_size = gguf_xz.stat().st_size
    chunk_names = [f"gguf/{gguf_xz.name}.{i:03d}" for i in range(math.ceil(xz_size / chunk))]
    items = [(name, src.stat().st_size) for name, src in sources.items()]
    items += [(name, min(chunk, xz_size - i * chunk)) for i, name in enumerate(chunk_names)]
    bins = first_fit(items, int(cap_mib * 2**20))
    if bins is None:
        raise SystemExit(f"a file is over the {cap_mib} MiB cap of a part: {max(items, key=lambda it: it[1])}")

    where = {name: n for n, names in enumerate(bins, 1) for name in names}
    chunk_index = {name: i for i, name in enumerate(chunk_names)}
    files: dict[str, dict] = {}
    with open(gguf_xz, "rb") as g:
        for name, n in sorted(where.items()):
            dst = kit / f"part{n}" / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if name in chunk_index:
                g.seek(chunk_index[name] * chunk)
                dst.write_bytes(g.read(chunk))
            else:
                shutil.copyfile(sources[name], dst)
            files[name] = {"part": n, "size": dst.stat().st_size, "sha256": sha256(dst)}
    shutil.rmtree(packed)
    manifest = {"parts": len(bins), "files": files, "overrides": overrides, "unpack": unpack,
                "gguf": {"name": gguf.name, "size": gguf.stat().st_size, "sha256": sha256(gguf), "chunks": chunk_names}}
    manifest["pack"] = pack_id(manifest)
    parts = []
    for n in range(1, len(bins) + 1):
        part = kit / f"part{n}"
        (part / MANIFEST).write_text(json.dumps({**manifest, "part": n}, indent=1))
        parts.append(part)
    return parts


# ----------------------------------------------------------------------------------------- on the GPU machine

def pack_id(manifest: dict) -> str:
    """The packing a manifest belongs to: a hash of all of it but the part number (and this id). Two packings of
    the same files give the same id, and their parts are interchangeable; any other difference changes it."""
    body = {k: v for k, v in manifest.items() if k not in ("pack", "part")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def read_manifest(kit: Path, n: int) -> dict | None:
    """Part n's manifest (each holds the whole kit's); None when part n is not there."""
    path = kit / f"part{n}" / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def present_manifests(kit: Path) -> dict[int, dict]:
    """The manifest of every part folder here, by part number."""
    found = {}
    for m in kit.glob(f"part*/{MANIFEST}"):
        suffix = m.parent.name[4:]
        if suffix.isdigit():
            found[int(suffix)] = json.loads(m.read_text())
    return dict(sorted(found.items()))


def manifest_problem(manifest: dict, n: int) -> str | None:
    """Why part n's own manifest cannot be trusted: packed before pack ids, edited, or another part's."""
    if "pack" not in manifest:
        return f"part{n}/{MANIFEST}: packed before kits had a pack id: run `make gpu-compare-kit` again"
    if manifest["pack"] != pack_id(manifest):
        return f"part{n}/{MANIFEST}: its pack id does not match its content (edited or damaged): repack"
    if manifest.get("part") != n:
        return f"part{n}/{MANIFEST}: the manifest of part{manifest.get('part')}, not of part{n}"
    return None


def packings(manifests: dict[int, dict]) -> str:
    """`part1, part3: pack X (3 parts); part2: pack Y (3 parts)` - which part came from which packing."""
    groups: dict[str, list[int]] = {}
    for n, m in manifests.items():
        groups.setdefault(m.get("pack", "none (old kit)"), []).append(n)
    return "; ".join(f"{', '.join(f'part{n}' for n in ns)}: pack {pack} ({manifests[ns[0]]['parts']} parts)"
                     for pack, ns in groups.items())


def part_problems(kit: Path, manifest: dict, n: int, deep: bool = True) -> list[str]:
    """What is missing or damaged in part n (sizes always, sha256 when deep)."""
    problems = []
    for name, info in manifest["files"].items():
        if info["part"] != n:
            continue
        f = kit / f"part{n}" / name
        if not f.is_file():
            problems.append(f"part{n}/{name}: missing")
        elif f.stat().st_size != info["size"]:
            problems.append(f"part{n}/{name}: {f.stat().st_size} bytes, not {info['size']}")
        elif deep and sha256(f) != info["sha256"]:
            problems.append(f"part{n}/{name}: sha256 differs")
    return problems


def check(kit: Path, n: int) -> int:
    """Part n, against its own manifest: there, intact, and of the same packing as the parts before it here (a
    later part from another packing is only named: the calls still to come replace it)."""
    manifest = read_manifest(kit, n)
    if manifest is None:
        print(f"part{n}: not here ({kit / f'part{n}'}): carry it in this call")
        return 1
    bad = manifest_problem(manifest, n)
    if bad:
        print(bad)
        return 1
    problems = part_problems(kit, manifest, n)
    mine = [i for i in manifest["files"].values() if i["part"] == n]
    print(f"part{n} of {manifest['parts']} (pack {manifest['pack']}): {len(mine)} files, "
          f"{sum(i['size'] for i in mine) / 2**20:.1f} MiB, "
          + ("intact" if not problems else f"{len(problems)} problems"))
    if problems:
        print("\n".join(problems))
    others = present_manifests(kit)
    print(f"parts on this machine: {list(others)}")
    foreign = [i for i, m in others.items() if m.get("pack") != manifest["pack"]]
    if foreign:
        earlier = [i for i in foreign if i < n]
        print(f"{'another packing' if len(foreign) == 1 else 'other packings'} here: {packings(others)}"
              + (f"; part{', part'.join(map(str, earlier))} must be carried again from this packing (start again "
                 "from part 1)" if earlier else "; the later calls replace them"))
        if earlier:
            return 1
    return 1 if problems else 0


def assemble(kit: Path, root: Path) -> int:
    """Every part checked; wheels and data linked under root, the GGUF rebuilt and verified at root/gguf/NAME."""
    manifests = present_manifests(kit)
    if not manifests:
        print(f"no part of the kit in {kit}")
        return 1
    untrusted = [p for n, m in manifests.items() if (p := manifest_problem(m, n))]
    if untrusted:
        print(*untrusted, sep="\n")
        return 1
    # every part's manifest must be the same packing's: a part from another one would pass its own checks
    if len({m["pack"] for m in manifests.values()}) > 1:
        print(f"the parts here come from different packings: {packings(manifests)}. Carry every part of one "
              "packing (the last `make gpu-compare-kit`), starting again from part 1")
        return 1
    manifest = next(iter(manifests.values()))
    missing = [n for n in range(1, manifest["parts"] + 1) if n not in manifests]
    problems = [p for n in range(1, manifest["parts"] + 1) if n not in missing for p in part_problems(kit, manifest, n)]
    if missing or problems:
        print(f"parts missing here: {missing} (the machine was given back between calls, or a call carried the "
              "wrong path: start again from part 1)" if missing else "", *problems, sep="\n")
        return 1
    if root.exists():
        shutil.rmtree(root)
    chunks = manifest["gguf"]["chunks"]
    unpack = manifest.get("unpack", {})
    for name, info in manifest["files"].items():
        src = kit / f"part{info['part']}" / name
        if name in unpack:
            dst = root / unpack[name]
            dst.parent.mkdir(parents=True, exist_ok=True)
            with lzma.open(src) as f, open(dst, "wb") as out:
                shutil.copyfileobj(f, out, 1 << 20)
        elif name not in chunks:
            dst = root / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(src.resolve(), dst)
    gguf = root / "gguf" / manifest["gguf"]["name"]
    gguf.parent.mkdir(parents=True, exist_ok=True)
    # the chunks in order are one xz stream: decompressed as it is read, never stored whole
    decompress = lzma.LZMADecompressor()
    with open(gguf, "wb") as out:
        for name in chunks:
            with open(kit / f"part{manifest['files'][name]['part']}" / name, "rb") as f:
                out.writelines(decompress.decompress(block) for block in iter(lambda: f.read(1 << 20), b""))
    if sha256(gguf) != manifest["gguf"]["sha256"]:
        print(f"{gguf}: rebuilt, but its sha256 differs from the packed file's")
        return 1
    print(f"kit assembled in {root}: {len(manifest['files']) - len(chunks)} files, {gguf.name} "
          f"({manifest['gguf']['size'] / 2**20:.1f} MiB, sha256 ok)")
    return 0


def overrides(kit: Path, recipe: str, root: Path) -> int:
    """One `--set field=path` argument a line: the recipe's outside inputs at their place under root."""
    manifest = next(iter(present_manifests(kit).values()), {})
    table = manifest.get("overrides", {}).get(Path(recipe).name)
    if table is None:
        print(f"the kit was not packed for {recipe}", file=sys.stderr)
        return 1
    for field, path in table.items():
        print(f"{field}={root / path}")
    return 0


def env_check(site: Path) -> int:
    """Requirements of the wheels installed in site that this environment (site first, then the image) does not
    meet: a missing package, or an image package at a version outside the range. Diagnostics: a package imported
    only on paths the comparison does not take needs nothing."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    env = {"extra": ""}
    carried = {canonicalize_name(d.metadata["Name"]) for d in metadata.distributions(path=[str(site)])}
    lines = []
    for dist in metadata.distributions(path=[str(site)]):
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            try:
                version = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                lines.append(f"{dist.metadata['Name']} needs {req}: not installed")
                continue
            if not req.specifier.contains(version, prereleases=True):
                where = "carried" if canonicalize_name(req.name) in carried else "image"
                lines.append(f"{dist.metadata['Name']} needs {req}: {version} ({where})")
    print("\n".join(sorted(set(lines))) or "every requirement of the carried wheels is met")
    return 0


def summary(experiment: str) -> int:
    """Markdown: the comparison's wall time in all, per method (MLflow's method runs) and per stage kind."""
    from tasks.track import client

    mlc = client()
    exp = mlc.get_experiment_by_name(experiment)
    if exp is None:
        print(f"no MLflow experiment {experiment!r}: the run did not get as far as tracking")
        return 1
    runs = mlc.search_runs([exp.experiment_id], max_results=5000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if not parents:
        print("no parent run")
        return 1
    parent = max(parents, key=lambda r: r.info.start_time)

    def seconds(r):
        return None if not r.info.end_time else (r.info.end_time - r.info.start_time) / 1000

    def fmt(s):
        return "-" if s is None else f"{s:.0f}"

    children: dict[str, list] = {}
    for r in runs:
        children.setdefault(r.data.tags.get("mlflow.parentRunId"), []).append(r)
    print(f"Parent run {parent.info.run_id}: {parent.info.status}, {fmt(seconds(parent))} s in all (MLflow).\n")
    methods = sorted((r for r in children.get(parent.info.run_id, []) if r.data.tags.get("pomona.stage") == "method"),
                     key=lambda r: r.info.start_time)
    def cached(r) -> bool:  # a stage another branch computed earlier in this run: its seconds are that branch's
        return r.data.tags.get("pomona.cached") == "true"

    print("| method | status | wall s | its stages, s each (reused: computed by an earlier branch) |\n|---|---|---|---|")
    for m in methods:
        done = ", ".join(f"{r.data.tags.get('pomona.stage', r.info.run_name)} "
                         + ("reused" if cached(r) else fmt(r.data.metrics.get("stage_seconds")))
                         for r in sorted(children.get(m.info.run_id, []), key=lambda r: r.info.start_time))
        print(f"| {m.data.tags.get('pomona.method')} | {m.info.status} | {fmt(seconds(m))} | {done} |")
    totals: dict[str, list[float]] = {}
    for r in runs:
        if "stage_seconds" in r.data.metrics and not cached(r):
            totals.setdefault(r.data.tags.get("pomona.stage", r.info.run_name), []).append(r.data.metrics["stage_seconds"])
    print("\n| stage (computed, not reused) | runs | seconds in all | longest |\n|---|---|---|---|")
    for stage, values in sorted(totals.items(), key=lambda kv: -sum(kv[1])):
        print(f"| {stage} | {len(values)} | {sum(values):.0f} | {max(values):.0f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument("kit", type=Path)
    p.add_argument("--wheels", type=Path, required=True)
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--cap-mib", type=float, default=CAP_MIB)
    p.add_argument("recipes", type=Path, nargs="+")
    p = sub.add_parser("check")
    p.add_argument("kit", type=Path)
    p.add_argument("part", type=int)
    p = sub.add_parser("assemble")
    p.add_argument("kit", type=Path)
    p.add_argument("root", type=Path)
    p = sub.add_parser("overrides")
    p.add_argument("kit", type=Path)
    p.add_argument("recipe")
    p.add_argument("root", type=Path)
    p = sub.add_parser("env-check")
    p.add_argument("site", type=Path)
    p = sub.add_parser("summary")
    p.add_argument("experiment")
    args = parser.parse_args(argv)
    if args.command == "pack":
        parts = pack(args.kit, args.wheels, args.gguf, args.recipes, args.cap_mib)
        for part in parts:
            size = sum(f.stat().st_size for f in part.rglob("*") if f.is_file())
            print(f"{part}: {size / 2**20:.1f} MiB")
        return 0
    if args.command == "check":
        return check(args.kit, args.part)
    if args.command == "assemble":
        return assemble(args.kit, args.root)
    if args.command == "overrides":
        return overrides(args.kit, args.recipe, args.root)
    if args.command == "env-check":
        return env_check(args.site)
    return summary(args.experiment)


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a file: pomona's packages are importable from the repository root
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
