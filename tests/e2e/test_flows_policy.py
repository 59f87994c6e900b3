"""Which policy allowed or denied a flow, as a user sees it: a real agent, real pods and policies,
``membrane observe -o json`` naming the policies in ``ingress_allowed_by`` / ``ingress_denied_by``,
and the compact output saying why a packet was dropped.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from membrane.testing.agentnode import AgentNode
from membrane.testing.netns import kernel_test_skip_reason, wait_until
from membrane.testing.probes import CONNECT

pytestmark = pytest.mark.e2e

PORT = 7000
SERVER = textwrap.dedent(f"""
    import socket
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", {PORT})); srv.listen(16)
    while True:
        conn, _ = srv.accept(); conn.close()
""")
POLICIES = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: server-in, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: server}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: client}}}}]
    toPorts: [{{ports: [{{port: "{PORT}", protocol: TCP}}]}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: no-intruders, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: server}}}}
  ingressDeny:
  - fromEndpoints: [{{matchLabels: {{app: intruder}}}}]
"""


@pytest.fixture
def node() -> Iterator[AgentNode]:
    if (reason := kernel_test_skip_reason("nft", "nsenter", "ss")) is not None:
        pytest.skip(reason)
    with AgentNode("mbfp-") as agent_node:
        agent_node.start()
        yield agent_node


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def enforcing(node: AgentNode, name: str) -> bool:
    obj = json.loads(node.membrane("get", "cnp", name, "-n", "default", "-o", "json").stdout)
    return bool(((obj.get("status") or {}).get("nodes") or {}).get(node.node_name, {}).get("enforcing"))


def test_observe_names_the_policy_that_allowed_or_denied_a_flow(node: AgentNode, tmp_path: Path) -> None:
    for pod in ("server", "client", "intruder"):
        command = [sys.executable, "-c", SERVER] if pod == "server" else ["sleep", "3600"]
        node.membrane("pod", "run", pod, "-n", "default", "-l", f"app={pod}", "--", *command)
    server_ip = json.loads(node.membrane("get", "pod", "server", "-n", "default", "-o", "json").stdout)["status"][
        "podIP"]
    wait_until(lambda: f":{PORT} " in node.membrane("pod", "exec", "default/server", "--", "ss", "-Htln").stdout,
               timeout=15, what="the server listening")
    manifest = tmp_path / "policies.yaml"
    manifest.write_text(POLICIES)
    node.membrane("apply", "-f", str(manifest))
    wait_until(lambda: enforcing(node, "server-in") and enforcing(node, "no-intruders"), timeout=15,
               what="both policies enforced on the node")

    def connect(pod: str, port: int) -> str:
        return node.membrane("pod", "exec", f"default/{pod}", "--", sys.executable, "-c", CONNECT, server_ip,
                             str(port)).stdout.strip()

    assert connect("client", PORT) == "ok"
    assert connect("intruder", PORT) == "blocked"  # the deny rule
    assert connect("client", PORT + 1) == "blocked"  # no rule allows it: default deny

    sock = str(node.run_dir / "observer.sock")

    def flows() -> list[dict[str, Any]]:
        return [line["flow"] for line in json_lines(node.membrane("observe", "--server", sock, "--all",
                                                                  "-o", "json").stdout) if "flow" in line]

    def pods(flow: dict[str, Any]) -> tuple[str, str]:
        return flow["source"].get("pod_name", ""), flow["destination"].get("pod_name", "")

    def allowed_syn(flow: dict[str, Any]) -> bool:
        return (flow["verdict"] == "FORWARDED" and pods(flow) == ("client", "server")
                and not flow.get("is_reply") and flow.get("l4", {}).get("TCP", {}).get("flags") == {"SYN": True})

    seen = wait_until(lambda: (found := flows()) and any(allowed_syn(f) for f in found)
                      and any(f["verdict"] == "DROPPED" and pods(f)[0] == "intruder" for f in found)
                      and any(f["verdict"] == "DROPPED" and pods(f)[0] == "client" for f in found) and found,
                      timeout=10, what="the allowed and the dropped flows")

    [allowed] = [f for f in seen if allowed_syn(f)]
    assert [p["name"] for p in allowed["ingress_allowed_by"]] == ["server-in"]
    policy = allowed["ingress_allowed_by"][0]
    assert policy["kind"] == "CiliumNetworkPolicy" and policy["namespace"] == "default"
    assert "k8s:io.cilium.k8s.policy.name=server-in" in policy["labels"]
    assert any(label.startswith("k8s:io.cilium.k8s.policy.uid=") for label in policy["labels"])
    assert "egress_allowed_by" not in allowed  # the client's egress is not enforced

    denied = [f for f in seen if f["verdict"] == "DROPPED" and pods(f)[0] == "intruder"]
    assert {f["drop_reason_desc"] for f in denied} == {"POLICY_DENY"}
    assert {tuple(p["name"] for p in f["ingress_denied_by"]) for f in denied} == {("no-intruders",)}

    default_denied = [f for f in seen if f["verdict"] == "DROPPED" and pods(f)[0] == "client"]
    assert {f["drop_reason_desc"] for f in default_denied} == {"POLICY_DENIED"}
    assert all("ingress_denied_by" not in f for f in default_denied)

    compact = node.membrane("observe", "--server", sock, "--all", "--verdict", "DROPPED").stdout
    assert "default/client:" in compact and f"default/server:{PORT + 1} " in compact
    assert any(f"default/server:{PORT + 1} " in line and "Policy denied DROPPED" in line
               for line in compact.splitlines())
    assert any("default/intruder:" in line and "Policy denied by denylist DROPPED" in line
               for line in compact.splitlines())
