"""docker/: no Docker engine runs here, so check what can be checked without one.

The compose file (services, backends, volumes, health-gated start order), the Dockerfiles (what they copy exists,
the entry point is the script), and the entry point itself: every command it would run resolves in this venv and
every option it passes is one the command accepts.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

DOCKER = REPO / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_has_the_production_services(compose):
    services = compose["services"]
    assert {"postgres", "prefect-server", "mlflow", "worker", "worker-gpu"} <= set(services)
    assert services["worker-gpu"]["profiles"] == ["gpu"]  # only with --profile gpu
    gpus = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpus["driver"] == "nvidia" and "gpu" in gpus["capabilities"]


def test_servers_use_postgresql_databases_that_the_init_script_creates(compose):
    services = compose["services"]
    pg = services["postgres"]["environment"]
    created = set(re.findall(r"CREATE DATABASE (\w+);", (DOCKER / "postgres-init.sql").read_text()))
    init_mount = next(v for v in services["postgres"]["volumes"] if "docker-entrypoint-initdb.d" in v)
    assert (DOCKER / init_mount.split(":")[0]).resolve() == DOCKER / "postgres-init.sql"

    prefect_url = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    mlflow_url = services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    for url, driver in ((prefect_url, "postgresql+asyncpg"), (mlflow_url, "postgresql+psycopg2")):
        m = re.fullmatch(r"(?P<driver>[\w+]+)://(?P<user>\w+):(?P<pw>\w+)@postgres:5432/(?P<db>\w+)", url)
        assert m, url
        assert m["driver"] == driver and m["user"] == pg["POSTGRES_USER"] and m["pw"] == pg["POSTGRES_PASSWORD"]
        assert m["db"] in created
    assert services["prefect-server"]["environment"]["PREFECT_UI_API_URL"] == "http://localhost:4200/api"


def test_drivers_named_in_the_urls_are_installed():
    import asyncpg  # noqa: F401  Prefect's PostgreSQL driver
    import psycopg2  # noqa: F401  MLflow's (SQLAlchemy's plain postgresql:// wants psycopg 3, not installed)


def test_state_lives_in_named_volumes(compose):
    services, volumes = compose["services"], set(compose["volumes"])
    mounts = {name: [v.split(":")[0] for v in svc.get("volumes", [])] for name, svc in services.items()}
    assert "postgres-data" in mounts["postgres"]
    assert "mlflow-artifacts" in mounts["mlflow"]
    mlflow_dest = services["mlflow"]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"]
    assert f"mlflow-artifacts:{mlflow_dest}" in services["mlflow"]["volumes"]
    for worker in ("worker", "worker-gpu"):
        home = services[worker]["environment"]["POMONA_HOME"]
        assert f"pomona-data:{home}" in services[worker]["volumes"]
    used = {m for ms in mounts.values() for m in ms if not m.startswith(".")}
    assert used == volumes


def test_start_order_waits_for_health(compose):
    services = compose["services"]
    for name, svc in services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert cond["condition"] == "service_healthy", (name, dep)
            assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no healthcheck"
    assert set(services["worker"]["depends_on"]) == {"prefect-server", "mlflow"}
    assert set(services["prefect-server"]["depends_on"]) == {"postgres"}
    # Each health probe hits the port its server listens on.
    assert "4200/api/health" in " ".join(services["prefect-server"]["healthcheck"]["test"])
    assert "5000/health" in " ".join(services["mlflow"]["healthcheck"]["test"])


def test_ports_are_published_on_localhost_only(compose):
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)


def test_workers_reach_the_servers_by_service_name(compose):
    env = compose["services"]["worker"]["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["POMONA_MLFLOW_UI_URL"] == "http://localhost:5000"  # links a browser on the host can open
    assert "127.0.0.1:5000:5000" in compose["services"]["mlflow"]["ports"]
    gpu_env = compose["services"]["worker-gpu"]["environment"]
    assert gpu_env["POMONA_WORK_POOL"] != env["POMONA_WORK_POOL"]  # separate pools, separate deployments


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_copy_what_exists_and_use_the_entrypoint(dockerfile, compose):
    text = (DOCKER / dockerfile).read_text()
    for src in re.findall(r"^COPY (\S+)", text, flags=re.M):
        assert (REPO / src).exists(), f"{dockerfile} copies {src}, which is not in the repository"
    assert 'ENTRYPOINT ["pomona-entrypoint"]' in text
    assert "COPY docker/entrypoint.sh /usr/local/bin/pomona-entrypoint" in text
    assert '"torch==2.13.0"' in text and "prefect-dask==" in text
    builds = {svc["build"]["dockerfile"] for svc in compose["services"].values() if "build" in svc}
    assert f"docker/{dockerfile}" in builds
    if dockerfile.endswith("cuda"):
        assert "vllm" in text and "DS_BUILD_FUSED_ADAM=1" in text and "ds_report" in text
        assert re.search(r"^FROM \S+-devel-", text, flags=re.M)  # nvcc is needed to compile the DeepSpeed ops


def entrypoint(role: str, **env: str) -> list[str]:
    """The commands the entry point would run for `role`, one argv per line (dry run)."""
    outer = {k: v for k, v in os.environ.items() if k != "POMONA_WORKING_DIR"}
    full = {**outer, "PATH": f"{BIN}:{os.environ['PATH']}", "POMONA_ENTRYPOINT_DRY_RUN": "1", "PWD": str(REPO), **env}
    done = subprocess.run(["sh", str(ENTRYPOINT), role], capture_output=True, text=True, env=full, check=True,
                          cwd=REPO)
    return [shlex.split(line) for line in done.stdout.splitlines()]


def help_text(argv: list[str]) -> str:
    """`--help` of the command's subcommand: the argv up to its first option."""
    words = []
    for word in argv:
        if word.startswith("-"):
            break
        words.append(word)
    done = subprocess.run([str(BIN / words[0]), *words[1:], "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, timeout=120)
    assert done.returncode == 0, f"{' '.join(words)} --help failed: {done.stderr[-2000:]}"
    return done.stdout


ROLES = [
    # Deployed runs start in the image's working folder (/app), not the process worker's temporary one.
    ("worker", {}, [["pomona", "deploy", "--work-pool", "pomona", "--name", "pomona", "--working-dir", str(REPO)],
                    ["prefect", "worker", "start", "--pool", "pomona", "--type", "process", "--with-healthcheck"]]),
    ("worker", {"POMONA_WORKING_DIR": "/srv/project"},
     [["pomona", "deploy", "--work-pool", "pomona", "--name", "pomona", "--working-dir", "/srv/project"],
      ["prefect", "worker", "start", "--pool", "pomona", "--type", "process", "--with-healthcheck"]]),
    ("prefect-server", {}, [["prefect", "server", "start", "--host", "0.0.0.0", "--port", "4200"]]),
    ("mlflow-server", {"MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg2://u:p@postgres:5432/mlflow"},
     [["mlflow", "server", "--host", "0.0.0.0", "--port", "5000", "--workers", "1", "--backend-store-uri",
       "postgresql+psycopg2://u:p@postgres:5432/mlflow", "--artifacts-destination", "/mlartifacts",
       "--allowed-hosts", "mlflow,mlflow:5000,localhost:*,127.0.0.1:*"]]),
    ("serve", {}, [["pomona", "serve"]]),
]


def test_entrypoint_commands_resolve_and_accept_their_options():
    from concurrent.futures import ThreadPoolExecutor

    commands = []
    for role, env, expected in ROLES:
        got = entrypoint(role, **env)
        assert got == expected, role
        commands.extend(got)
    with ThreadPoolExecutor(4) as pool:  # each --help imports a large CLI; run them side by side
        texts = list(pool.map(help_text, commands))
    for argv, text in zip(commands, texts):
        for option in (w for w in argv if w.startswith("--")):
            assert option in text, f"`{' '.join(argv)}`: {option} is not an option of that command"


def test_entrypoint_refuses_mlflow_without_a_backend():
    full = {**os.environ, "POMONA_ENTRYPOINT_DRY_RUN": "1"}
    full.pop("MLFLOW_BACKEND_STORE_URI", None)
    done = subprocess.run(["sh", str(ENTRYPOINT), "mlflow-server"], capture_output=True, text=True, env=full)
    assert done.returncode != 0 and "MLFLOW_BACKEND_STORE_URI" in done.stderr


def test_entrypoint_runs_other_commands_as_given():
    assert entrypoint("pomona") == [["pomona"]]
    assert os.access(ENTRYPOINT, os.X_OK)


def test_images_learn_their_commit_from_the_build(compose, monkeypatch):
    # .git is not in the build context, so the commit that tags MLflow runs and deployments is a build argument
    from tasks.track import git_commit

    for service in ("worker", "worker-gpu"):
        build = compose["services"][service].get("build") or compose["x-pomona-cpu"]["build"]
        assert build["args"]["POMONA_GIT_COMMIT"] == "${POMONA_GIT_COMMIT:-unknown}"
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (DOCKER / name).read_text()
        assert "ARG POMONA_GIT_COMMIT=unknown" in text and "ENV POMONA_GIT_COMMIT=${POMONA_GIT_COMMIT}" in text
    monkeypatch.setenv("POMONA_GIT_COMMIT", "abc123")
    assert git_commit() == "abc123"
    monkeypatch.delenv("POMONA_GIT_COMMIT")
    assert len(git_commit()) == 40  # this checkout's own commit


def image_user(dockerfile: str) -> tuple[str, str]:
    """(the uid the image's `pomona` user gets, with ARG defaults substituted; the useradd line)."""
    text = (DOCKER / dockerfile).read_text().replace("\\\n", " ")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))
    useradd = re.search(r"useradd [^&]*--uid (\S+) pomona", text)
    assert useradd, f"{dockerfile} creates no `pomona` user with an explicit uid"
    uid = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), useradd[1].strip('"'))
    return uid, useradd[0]


def test_cpu_and_gpu_images_run_as_the_same_uid(compose):
    # Both workers write the shared pomona-data volume: a second uid could not write the first one's stage folders.
    users = {name: image_user(name) for name in ("Dockerfile.cpu", "Dockerfile.cuda")}
    assert len({uid for uid, _ in users.values()}) == 1, users
    assert all(uid.isdigit() for uid, _ in users.values()), users
    assert all("${POMONA_UID}" in line for _, line in users.values())  # one build argument sets it
    for service in ("worker", "worker-gpu"):
        build = compose["services"][service].get("build") or compose["x-pomona-cpu"]["build"]
        assert build["args"]["POMONA_UID"] == "${POMONA_UID:-1000}", service
    uid = next(iter(users.values()))[0]
    assert f"${{POMONA_UID:-{uid}}}" == "${POMONA_UID:-1000}"  # compose's default is the images' default
    # ubuntu:24.04 (the CUDA base) already has uid 1000 (`ubuntu`): it must make way, or useradd fails the build
    assert 'userdel --remove "$existing"' in (DOCKER / "Dockerfile.cuda").read_text()


def test_cuda_image_installs_under_the_tested_constraints():
    # Its filter of constraints.txt once named `lm-eval==`, which the file spells `lm_eval==`: lm-eval went unpinned.
    text = (DOCKER / "Dockerfile.cuda").read_text().replace("\\\n", " ")
    found = re.search(r"grep -E '\^\((?P<names>[^)]+)\)==' +constraints\.txt > (?P<out>\S+)", text)
    assert found, "Dockerfile.cuda filters constraints.txt with grep -E '^(name|...)==' constraints.txt > FILE"
    lines = (REPO / "constraints.txt").read_text().splitlines()
    for name in found["names"].split("|"):
        matched = [line for line in lines if re.match(rf"^(?:{name})==", line)]
        assert len(matched) == 1, f"Dockerfile.cuda's constraint filter: {name!r} matches {matched} in constraints.txt"
    for needed in ("torch", "transformers", "trl", "peft", "prefect", "fastapi", "mlflow", "lm_eval"):
        assert needed in found["names"].split("|"), needed
    install = re.search(rf"pip install -c {re.escape(found['out'])} \"\.\[dev,vllm[,\w]*\]\"", text)
    assert install, "pomona and vLLM are installed with -c <the filtered constraints>, like the CPU image"
    assert re.search(r'pip install -c constraints\.txt "\.\[dev\]"', (DOCKER / "Dockerfile.cpu").read_text())


def test_cuda_image_installs_what_the_cuda_only_features_import():
    """QLoRA (`sft.qlora`) loads 4-bit weights through bitsandbytes and runs only on CUDA, so only the CUDA image can
    serve it: without the package there, every QLoRA run on the GPU worker stopped with 'qlora needs the
    bitsandbytes package'."""
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    text = (DOCKER / "Dockerfile.cuda").read_text().replace("\\\n", " ")
    installed = re.search(r'pip install -c \S+ "\.\[(?P<extras>[\w,]+)\]"', text)
    assert installed, "Dockerfile.cuda installs pomona with its extras"
    for extra, package in (("vllm", "vllm"), ("qlora", "bitsandbytes")):
        assert any(re.match(rf"{package}\b", requirement) for requirement in extras[extra]), (extra, package)
        assert extra in installed["extras"].split(","), f"Dockerfile.cuda leaves out the {extra!r} extra"


def test_workers_have_a_healthcheck_on_the_worker_health_server(compose):
    # A hung worker (or one that lost the API) stops polling its pool; without a healthcheck compose shows it healthy.
    services = compose["services"]
    server_check = services["prefect-server"]["healthcheck"]
    for name in ("worker", "worker-gpu"):
        check, env = services[name].get("healthcheck"), services[name]["environment"]
        assert check, f"{name} has no healthcheck"
        probe = " ".join(check["test"])
        assert check["test"][:3] == server_check["test"][:3]  # the same python probe as the servers
        assert f"localhost:{env['PREFECT_WORKER_WEBSERVER_PORT']}/health" in probe, name
        assert {"interval", "timeout", "retries", "start_period"} <= set(check), name
        assert int(check["start_period"].rstrip("s")) >= 60, "pomona deploy runs before the worker starts"
    worker_commands = [argv for argv in entrypoint("worker") if argv[:3] == ["prefect", "worker", "start"]]
    assert worker_commands and "--with-healthcheck" in worker_commands[0]  # the server the probe asks
