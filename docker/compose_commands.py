"""The compose file is the one place the node command lines are written; these helpers read
it so the namespace demo and tests run exactly those commands."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import yaml

COMPOSE_FILE = Path(__file__).resolve().with_name("docker-compose.yml")
DOCKERFILE = Path(__file__).resolve().with_name("Dockerfile")
# Console scripts in the compose commands -> the module that runs the same program.
PROGRAM_MODULES = {"pd-prefill": "pd.prefill", "pd-decode": "pd.decode", "pd-cluster": "pd.cluster",
                   "pd-bench": "pd.bench", "pd-router": "pd.router"}

def load_compose(path: str | os.PathLike = COMPOSE_FILE) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def compose_command(compose: dict, service: str) -> list[str]:
    """The `command:` list of a compose service, as strings."""
    cmd = compose["services"][service]["command"]
    if isinstance(cmd, str):
        raise ValueError(f"service {service!r}: command must be a list (exec form), got a string")
    return [str(a) for a in cmd]


def compose_healthcheck(compose: dict, service: str) -> list[str]:
    """The argv of a service's healthcheck test (["CMD", argv...] form)."""
    test = compose["services"][service]["healthcheck"]["test"]
    if not isinstance(test, list) or test[0] != "CMD":
        raise ValueError(f"service {service!r}: healthcheck test must be [\"CMD\", ...]")
    return [str(a) for a in test[1:]]


def dockerfile_healthcheck(path: str | os.PathLike = DOCKERFILE) -> list[str]:
    """The argv of a Dockerfile's exec-form HEALTHCHECK (`HEALTHCHECK [options] CMD [...]`)."""
    text = Path(path).read_text()
    m = re.search(r"^HEALTHCHECK\b(?:[^\n]*\\\n)*?[^\n]*?\bCMD (\[.*?\])\s*$", text, re.M)
    if not m:
        raise ValueError(f"{path}: no exec-form HEALTHCHECK")
    return json.loads(m.group(1))


def replace_hosts(argv: list[str], hosts: dict[str, str]) -> list[str]:
    """Replaces service hostnames in HOST:PORT arguments (also inside comma lists)."""
    if not hosts:
        return list(argv)
    pattern = re.compile(r"(?<![\w.-])(%s)(?=:\d+)" % "|".join(map(re.escape, hosts)))
    return [pattern.sub(lambda m: hosts[m.group(1)], a) for a in argv]


def node_commands(compose_path: str | os.PathLike = COMPOSE_FILE,
                  hosts: dict[str, str] | None = None) -> dict[str, list[str]]:
    """{"prefill": argv, "decode": argv}: the compose commands with service hostnames replaced.
    This is what the demo runs (before `local_argv` maps the program name)."""
    compose = load_compose(compose_path)
    hosts = hosts or {}
    return {svc: replace_hosts(compose_command(compose, svc), hosts) for svc in ("prefill", "decode")}


def local_argv(argv: list[str]) -> list[str]:
    """Runs a console script as `python -m module` of this interpreter (same environment)."""
    module = PROGRAM_MODULES.get(argv[0])
    return [sys.executable, "-m", module, *argv[1:]] if module else list(argv)


def arg_value(argv: list[str], flag: str) -> str | None:
    """The value of the last `flag VALUE` or `flag=VALUE` in argv (argparse: the last one wins)."""
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


