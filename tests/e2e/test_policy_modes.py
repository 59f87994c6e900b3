"""Cluster-wide policy settings reach a running agent: enforcement "always" isolates every pod,
audit mode forwards what policy would drop, and `policy trace` says the same as the kernel."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from membrane.core.config import ClusterConfig
from membrane.store import keys, open_store
from membrane.testing.agentnode import AgentNode
from membrane.testing.netns import wait_until

pytestmark = pytest.mark.e2e

SERVER = "import socket\ns=socket.socket();s.bind(('0.0.0.0',80));s.listen(8)\nwhile True: s.accept()[0].close()"
CONNECT = "import socket,sys\nsocket.create_connection((sys.argv[1],80),timeout=1).close()"

ALLOW = textwrap.dedent("""
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: allow-client, namespace: default}
    spec:
      endpointSelector: {matchLabels: {app: server}}
      ingress:
      - fromEndpoints: [{matchLabels: {app: client}}]
""")

EGRESS = textwrap.dedent("""
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: client-out, namespace: default}
    spec:
      endpointSelector: {matchLabels: {app: client}}
      egress:
      - toEndpoints: [{matchLabels: {app: server}}]
""")


def node_with(settings: dict[str, object]) -> Iterator[AgentNode]:
    with AgentNode("mbpm") as node:
        async def write() -> None:
            store = await open_store(node.store_url)
            try:
                await store.put(keys.CLUSTER_CONFIG, ClusterConfig(**settings).model_dump_json().encode())
            finally:
                await store.close()

        asyncio.run(write())  # before the agent starts: the store's settings win over its defaults
        node.start()
        node.membrane("pod", "run", "server", "-n", "default", "-l", "app=server", "--", sys.executable, "-c", SERVER)
        node.membrane("pod", "run", "client", "-n", "default", "-l", "app=client", "--", "sleep", "600")
        yield node


def connects(node: AgentNode) -> bool:
    server = json.loads(node.membrane("get", "pod", "server", "-n", "default", "-o", "json").stdout)
    ip = server["status"]["podIP"]
    return node.membrane("pod", "exec", "default/client", "--", sys.executable, "-c", CONNECT, ip,
                         check=False).returncode == 0


def trace(node: AgentNode) -> str:
    return node.membrane("policy", "trace", "--from", "default/client", "--to", "default/server",
                         "--port", "80/TCP").stdout


@pytest.fixture
def always() -> Iterator[AgentNode]:
    yield from node_with({"policyEnforcementMode": "always"})


@pytest.fixture
def audit() -> Iterator[AgentNode]:
    yield from node_with({"policyAuditMode": True})


def test_enforcement_always_isolates_pods_until_a_policy_allows(always: AgentNode, tmp_path: Path) -> None:
    assert not connects(always)
    assert "denied" in trace(always).lower()
    manifest = tmp_path / "allow.yaml"
    # "always" enforces both directions everywhere: the client's egress needs a policy too.
    manifest.write_text(ALLOW + "---\n" + EGRESS)
    always.membrane("apply", "-f", str(manifest))
    wait_until(lambda: connects(always), timeout=10, what="the allow policy to take effect")
    assert "allow-client" in trace(always)


def test_audit_mode_forwards_what_policy_would_drop(audit: AgentNode, tmp_path: Path) -> None:
    manifest = tmp_path / "deny.yaml"
    manifest.write_text(ALLOW.replace("app: client", "app: nobody").replace("allow-client", "allow-nobody"))
    audit.membrane("apply", "-f", str(manifest))
    wait_until(lambda: "Enabled" in audit.membrane("endpoint", "list").stdout or
               "Audit" in audit.membrane("endpoint", "list").stdout, timeout=10, what="the policy to select")
    assert connects(audit)  # would be dropped, but audit forwards it
    assert "audit" in audit.membrane("endpoint", "list").stdout.lower()
