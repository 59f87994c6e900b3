"""The README's first look, command by command as written there, on a one-node lab."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def first_look_commands() -> list[list[str]]:
    """The lines of the code block under "## A first look", comments dropped, split as a shell would."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"^## A first look\n.*?^```\n(.*?)^```", text, re.S | re.M)
    assert block is not None, "README.md has no code block under '## A first look'"
    return [shlex.split(line, comments=True) for line in block.group(1).splitlines() if line.strip()]


SERVER_IP = "SERVER_IP"  # the README's placeholder, read off `get pods -o wide` by a reader


def test_readme_first_look_commands_work_as_written(tmp_path: Path) -> None:
    name = "t" + "".join(random.choices(string.ascii_lowercase + string.digits, k=7))
    env = {**os.environ, "MEMBRANE_LAB_STATE_DIR": str(tmp_path / "state"),
           "MEMBRANE_LAB_RUN_DIR": str(tmp_path / "run")}
    env.pop("MEMBRANE_STORE", None)

    def membrane(*args: str) -> subprocess.CompletedProcess[str]:
        # --lab keeps this run on its own lab whatever else runs on the machine.
        return subprocess.run([sys.executable, "-m", "membrane", "--lab", name, *args], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=120)

    commands = first_look_commands()
    assert commands[0][:3] == ["membrane", "lab", "up"] and commands[-1][:3] == ["membrane", "lab", "down"]
    outputs: dict[str, str] = {}
    try:
        for argv in commands:
            assert argv[0] == "membrane", argv
            args = argv[1:]
            if args[:2] == ["get", "pods"]:
                # apply returns once the objects are written; a reader looks again until both run.
                deadline = time.monotonic() + 30
                while (result := membrane(*args)).stdout.count("Running") < 2 and time.monotonic() < deadline:
                    time.sleep(0.1)
            elif any(SERVER_IP in a for a in args):
                pod = json.loads(membrane("get", "pod", "server", "-n", "demo", "-o", "json").stdout)
                server_ip = pod["status"]["podIP"]
                args = [a.replace(SERVER_IP, server_ip) for a in args]
                # The pod is Running once its process started; httpd may need a moment to listen.
                deadline = time.monotonic() + 10
                while (result := membrane(*args)).returncode != 0 and time.monotonic() < deadline:
                    time.sleep(0.1)
            else:
                result = membrane(*args)
            assert result.returncode == 0, f"membrane {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
            outputs[" ".join(args[:2])] = result.stdout
        created = ["namespace/demo created", "pod/server created", "pod/client created"]
        assert outputs["apply -f"].splitlines() == created
        assert "hello from server" in outputs["pod exec"]
        assert re.search(r"client\s+1/1\s+Running", outputs["get pods"])
        assert "demo/server" in outputs["endpoint list"] and "demo/client" in outputs["endpoint list"]
        assert "k8s:app=server" in outputs["identity list"]
    finally:
        membrane("lab", "down")
    assert f"{name}-" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
