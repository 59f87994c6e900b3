"""Cluster-wide policy settings reach a running agent: enforcement "always" isolates every pod,
"never" enforces nothing (deny rules included), audit mode forwards what policy would drop (also
when limited to some namespaces: the others still drop), policies with ``enableDefaultDeny`` off
add allows and denies without isolating, and `policy trace` says the same as the kernel.

Where the expected outcome is "connects", the test first waits until the agent reports the
policies' store revisions synced into its datapath, so a pass never means "not applied yet"."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from membrane.api.manifest import parse_manifest_text
from membrane.api.registry import ObjectRef
from membrane.cni.client import AgentClient
from membrane.core.config import ClusterConfig
from membrane.store import keys, open_store
from membrane.store.objects import ref_key
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


def node_with(settings: dict[str, object], prefix: str = "mbpm", namespaces: tuple[str, ...] = ("default",)
              ) -> Iterator[AgentNode]:
    with AgentNode(prefix) as node:
        async def write() -> None:
            store = await open_store(node.store_url)
            try:
                await store.put(keys.CLUSTER_CONFIG, ClusterConfig(**settings).model_dump_json().encode())
            finally:
                await store.close()

        asyncio.run(write())  # before the agent starts: the store's settings win over its defaults
        node.start()
        if others := [ns for ns in namespaces if ns != "default"]:
            manifest = node.dir / "namespaces.yaml"
            manifest.write_text("---\n".join(f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n"
                                             for ns in others))
            node.membrane("apply", "-f", str(manifest))
        for namespace in namespaces:  # a server per namespace, one client
            node.membrane("pod", "run", "server", "-n", namespace, "-l", "app=server", "--",
                          sys.executable, "-c", SERVER)
        node.membrane("pod", "run", "client", "-n", "default", "-l", "app=client", "--", "sleep", "600")
        yield node


def connects(node: AgentNode, namespace: str = "default") -> bool:
    server = json.loads(node.membrane("get", "pod", "server", "-n", namespace, "-o", "json").stdout)
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


def apply_synced(node: AgentNode, path: Path, manifest: str) -> None:
    """``membrane apply``, then wait until the agent's datapath reflects the objects' store revisions."""
    path.write_text(manifest)
    node.membrane("apply", "-f", str(path))
    objects = parse_manifest_text(manifest)

    async def revisions() -> dict[str, int]:
        store = await open_store(node.store_url)
        try:
            wanted: dict[str, int] = {}
            for obj in objects:
                ref = ObjectRef.of(obj)
                kv = await store.get(ref_key(ref))
                assert kv is not None
                wanted[ref.info.plural] = max(wanted.get(ref.info.plural, 0), kv.mod_revision)
            return wanted
        finally:
            await store.close()

    wanted = asyncio.run(revisions())

    def synced() -> bool:
        revisions = AgentClient(str(node.socket), timeout=5).status()["policy"]["syncedRevisions"]
        have = {prefix.rstrip("/").rsplit("/", 1)[1]: rev for prefix, rev in revisions.items()}
        return all(have.get(plural, 0) >= rev for plural, rev in wanted.items())

    wait_until(synced, timeout=15, what=f"the agent to sync {wanted}")


DENY_CLIENT = textwrap.dedent("""
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: no-client, namespace: NS}
    spec:
      endpointSelector: {matchLabels: {app: server}}
      enableDefaultDeny: {ingress: DEFAULT_DENY}
      ingressDeny:
      - fromEndpoints: [{matchLabels: {app: client, k8s:io.kubernetes.pod.namespace: default}}]
""")

ISOLATE = textwrap.dedent("""
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: isolate-servers, namespace: NS}
    spec:
      podSelector: {matchLabels: {app: server}}
      policyTypes: [Ingress]
""")


@pytest.fixture
def never() -> Iterator[AgentNode]:
    yield from node_with({"policyEnforcementMode": "never"}, prefix="mbipb")


@pytest.fixture
def audit_one_namespace() -> Iterator[AgentNode]:
    yield from node_with({"policyAuditNamespaces": ["audited"]}, prefix="mbipb", namespaces=("default", "audited"))


@pytest.fixture
def default_mode() -> Iterator[AgentNode]:
    yield from node_with({}, prefix="mbipb")


def test_enforcement_never_enforces_nothing_deny_rules_included(never: AgentNode, tmp_path: Path) -> None:
    policies = ISOLATE.replace("NS", "default") + "---\n" + DENY_CLIENT.replace("NS", "default").replace(
        "DEFAULT_DENY", "true")
    apply_synced(never, tmp_path / "deny.yaml", policies)
    assert connects(never)
    assert "policy enforcement is disabled (mode never)" in trace(never)
    assert "Disabled" in never.membrane("endpoint", "list").stdout


def test_audit_limited_to_some_namespaces_drops_in_the_others(audit_one_namespace: AgentNode, tmp_path: Path
                                                              ) -> None:
    node = audit_one_namespace
    assert connects(node, "default") and connects(node, "audited")
    apply_synced(node, tmp_path / "isolate.yaml", ISOLATE.replace("NS", "default") + "---\n" + ISOLATE.replace(
        "NS", "audited"))
    assert connects(node, "audited")  # would be dropped: audited, forwarded
    assert not connects(node, "default")  # not audited here: dropped
    listing = node.membrane("endpoint", "list").stdout
    assert "Disabled (Audit)" in listing and "Enabled" in listing


def test_enable_default_deny_off_adds_rules_without_isolating(default_mode: AgentNode, tmp_path: Path) -> None:
    node = default_mode
    # An allow for somebody else does not isolate the server when its policy turns default deny off.
    apply_synced(node, tmp_path / "allow.yaml", ALLOW.replace("app: client", "app: nobody").replace(
        "allow-client", "allow-nobody").replace("ingress:\n", "enableDefaultDeny: {ingress: false}\n  ingress:\n"))
    assert connects(node)
    assert "do not isolate it (enableDefaultDeny: false)" in trace(node)
    # A deny of the same kind still denies.
    apply_synced(node, tmp_path / "deny.yaml", DENY_CLIENT.replace("NS", "default").replace("DEFAULT_DENY", "false"))
    assert not connects(node)
    assert "denied by" in trace(node) and "no-client" in trace(node)
