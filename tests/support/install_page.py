"""The shell steps of the page "Installing into an existing Airflow" (docs/installing-into-airflow.md), in page
order, so that the test that follows the page runs exactly its commands; and a runner that carries the shell's
environment from one step to the next."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

PAGE = Path(__file__).resolve().parents[2] / "docs" / "installing-into-airflow.md"
SECTION = "# Installing into an existing Airflow"
# The page's example server, and what the test puts in its place (the HAPI server of the session speaks plain HTTP).
EXAMPLE_HOST, EXAMPLE_PORT = "fhir.hospital.example", "443"


def steps(page: Path = PAGE) -> dict[str, str]:
    """{title: commands}: every ```sh block of the section, titled by its first line (a `# ...` comment)."""
    text = page.read_text(encoding="utf-8")
    start = text.index(SECTION + "\n")
    end = text.find("\n## ", start + len(SECTION))
    blocks = re.findall(r"^```sh\n(.*?)^```$", text[start : end if end != -1 else None], flags=re.M | re.S)
    titled = {}
    for block in blocks:
        first, _, rest = block.partition("\n")
        assert first.startswith("# "), f"a shell block of {SECTION!r} must open with a `# title` line: {first!r}"
        assert first[2:] not in titled, f"two shell blocks titled {first[2:]!r}"
        titled[first[2:]] = rest
    return titled


def on_server(commands: str, base_url: str) -> str:
    """The commands with the page's example server replaced by `base_url` (http://HOST:PORT/PATH)."""
    scheme, _, rest = base_url.partition("://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    assert scheme == "http" and path == "fhir", base_url
    return (
        commands.replace(f"https://{EXAMPLE_HOST}/fhir", base_url)
        .replace(f"{EXAMPLE_HOST}:{EXAMPLE_PORT}", f"{host}:{port}")
        .replace(f"--conn-port {EXAMPLE_PORT}", f"--conn-port {port}")
        .replace(EXAMPLE_HOST, host)
        .replace("scheme=https", "scheme=http")
        .replace('"scheme": "https"', '"scheme": "http"')
    )


class Shell:
    """Runs steps one after another as one shell session would: each step starts with the environment (exports,
    unsets) the previous one left."""

    def __init__(self, env: dict[str, str], cwd: Path, state: Path):
        self.env, self.cwd, self.state = dict(env), cwd, state

    def run(self, commands: str, timeout: float = 900) -> subprocess.CompletedProcess:
        script = f"set -euo pipefail\n{commands}\nenv -0 > {self.state}\n"
        done = subprocess.run(
            ["bash", "-c", script], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if done.returncode == 0:
            pairs = (item.partition("=") for item in self.state.read_text().split("\0") if item)
            self.env = {k: v for k, _, v in pairs if k not in ("_", "SHLVL", "PWD", "OLDPWD")}
        return done


def clean_environ(**extra: str) -> dict[str, str]:
    """This process's environment without what would leak into a site's shell: the project's venv, Airflow and
    leukofhir settings of the test session."""
    keep = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AIRFLOW", "LEUKOFHIR_", "PYTHON", "VIRTUAL_ENV", "FHIR_"))
    }
    return dict(keep, **extra)
