"""The manifests under examples/ stay valid, and the paths the README and docs name exist."""

from __future__ import annotations

import re
from pathlib import Path

from membrane.api import k8s
from membrane.api.manifest import load_objects
from membrane.api.registry import ObjectRef

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "examples" / "hello.yaml"


def test_hello_yaml_is_a_namespace_and_two_pods_the_runner_can_start() -> None:
    manifests = load_objects([str(HELLO)])
    assert [m.ref for m in manifests] == [
        ObjectRef("Namespace", None, "demo"),
        ObjectRef("Pod", "demo", "server"),
        ObjectRef("Pod", "demo", "client"),
    ]
    pods = {m.ref.name: m.obj for m in manifests if isinstance(m.obj, k8s.Pod)}
    for pod in pods.values():
        # The built-in runner starts only containers that have a command.
        for container in pod.spec.containers:
            assert container.command, f"{pod.name}/{container.name} has no command"
    server = pods["server"].spec.containers[0]
    assert [p.containerPort for p in server.ports or ()] == [8080]
    assert "-p 8080" in " ".join(server.command or ())


def test_every_examples_path_named_in_the_readme_and_docs_exists() -> None:
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    named = {m for path in texts for m in re.findall(r"examples/[\w./-]+\.ya?ml", path.read_text())}
    assert "examples/hello.yaml" in named
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert missing == []
