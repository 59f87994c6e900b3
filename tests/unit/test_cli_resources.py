"""`membrane apply | get | delete | label` as a user sees them: kubectl's output, errors and exit codes.

Outputs are compared with the golden files in ``golden/api``; regenerate them after an intended
change with ``MEMBRANE_UPDATE_GOLDEN=1 pytest tests/unit/test_cli_resources.py`` and review the diff.
"""

from __future__ import annotations

import asyncio
import difflib
import itertools
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from membrane.cli import resources
from membrane.cli.main import cli
from membrane.store import keys, objects
from membrane.store.objects import ObjectClient
from membrane.store.sqlite import SqliteStore

GOLDEN = Path(__file__).parent / "golden" / "api"
CREATED = datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC)
NOW = datetime(2024, 5, 1, 12, 30, 0, tzinfo=UTC)

for command in resources.COMMANDS:
    cli.add_command(command)

CLUSTER = """
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: demo, labels: {app: web, tier: front}}
spec:
  nodeName: node1
  containers:
  - {name: web, image: nginx, command: [httpd, -f, -p, "80"], ports: [{containerPort: 80, name: http}]}
  - {name: sidecar, image: busybox, command: [sleep, infinity]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo, labels: {app: client}}
spec:
  containers: [{name: client, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: db, labels: {app: db}}
spec:
  containers: [{name: db, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIP: 10.96.0.20
  selector: {app: web, tier: front}
  ports: [{port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: demo}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.21
  selector: {app: web}
  ports: [{name: http, port: 80, nodePort: 30080}, {name: dns, port: 53, protocol: UDP, nodePort: 30053}]
---
apiVersion: v1
kind: Service
metadata: {name: pending, namespace: demo}
spec:
  type: LoadBalancer
  selector: {app: web}
  ports: [{port: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: outside, namespace: demo}
spec: {type: ExternalName, externalName: db.example.com}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: demo}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-web, namespace: demo}
spec:
  podSelector:
    matchLabels: {app: web}
    matchExpressions: [{key: tier, operator: In, values: [front, edge]}]
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rule1, namespace: demo}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {http: [{method: GET, path: /}]}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rule2, namespace: demo}
spec:
  endpointSelector: {}
  egress: [{toEntities: [cluster]}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: host-fw}
spec:
  nodeSelector: {}
  ingress: [{fromEntities: [cluster]}]
---
apiVersion: cilium.io/v2
kind: CiliumLoadBalancerIPPool
metadata: {name: blue}
spec:
  blocks: [{cidr: 10.96.100.0/24}]
---
apiVersion: cilium.io/v2alpha1
kind: CiliumLoadBalancerIPPool
metadata: {name: red}
spec:
  blocks: [{start: 10.96.200.10, stop: 10.96.200.20}]
  disabled: true
"""


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("MEMBRANE_UPDATE_GOLDEN"):
        path.write_text(text)
    expected = path.read_text() if path.exists() else ""
    if text != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True), text.splitlines(keepends=True), f"golden/api/{name}", "actual"
            )
        )
        pytest.fail(f"output differs from golden/api/{name} (MEMBRANE_UPDATE_GOLDEN=1 rewrites it):\n{diff}")


class Cluster:
    """A store file and a way to run `membrane --store ... ARGS` against it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite://{path}"

    def run(self, *args: str, input: str | None = None) -> Result:
        return CliRunner().invoke(cli, ["--store", self.url, *args], input=input, catch_exceptions=False)

    def client_call(self, fn: str, *args: object, **kwargs: object) -> object:
        async def call() -> object:
            store = SqliteStore(str(self.path))
            try:
                return await getattr(ObjectClient(store), fn)(*args, **kwargs)
            finally:
                await store.close()

        return asyncio.run(call())

    def put_raw(self, key: str, value: dict[str, object]) -> None:
        async def put() -> None:
            store = SqliteStore(str(self.path))
            try:
                await store.put(key, json.dumps(value).encode())
            finally:
                await store.close()

        asyncio.run(put())


@pytest.fixture
def pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Creation times 10:00:00, 10:01:37, ... and uids uid-1, uid-2, ...; AGE measured at 12:30."""
    stamps = (CREATED + timedelta(seconds=97 * i) for i in itertools.count())
    uids = (f"00000000-0000-4000-8000-{i:012d}" for i in itertools.count(1))
    monkeypatch.setattr(objects, "now_rfc3339", lambda: next(stamps).strftime("%Y-%m-%dT%H:%M:%SZ"))
    monkeypatch.setattr(objects, "new_object_uid", lambda: next(uids))
    monkeypatch.setattr(resources, "now", lambda: NOW)


@pytest.fixture
def empty(tmp_path: Path, pinned: None) -> Cluster:
    return Cluster(tmp_path / "store.db")


@pytest.fixture
def cluster(empty: Cluster, tmp_path: Path) -> Cluster:
    manifest = tmp_path / "cluster.yaml"
    manifest.write_text(CLUSTER)
    result = empty.run("apply", "-f", str(manifest))
    assert result.exit_code == 0, result.output
    # What the agents write back.
    empty.client_call(
        "update_status",
        "Pod",
        "demo",
        "web",
        {
            "phase": "Running",
            "podIP": "10.244.1.12",
            "hostIP": "172.31.0.11",
            "containerStatuses": [
                {"name": "web", "ready": True, "restartCount": 2},
                {"name": "sidecar", "ready": True, "restartCount": 1},
            ],
        },
    )
    empty.client_call(
        "update_status",
        "Pod",
        "demo",
        "client",
        {
            "phase": "Running",
            "containerStatuses": [
                {
                    "name": "client",
                    "ready": False,
                    "restartCount": 4,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                }
            ],
        },
    )
    empty.client_call("update_status", "svc", "demo", "lb", {"loadBalancer": {"ingress": [{"ip": "10.96.100.10"}]}})
    empty.client_call("update_status", "cnp", "demo", "rule1", {"conditions": [{"type": "Valid", "status": "True"}]})
    empty.client_call(
        "update_status",
        "ippools",
        None,
        "blue",
        {
            "conditions": [
                {"type": "cilium.io/PoolConflict", "status": "False", "reason": "resolved", "message": ""},
                {"type": "cilium.io/IPsAvailable", "status": "Unknown", "reason": "noreason", "message": "253"},
            ]
        },
    )
    node = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNode",
        "metadata": {"name": "node1", "uid": "n1", "creationTimestamp": "2024-04-28T09:00:00Z", "generation": 1},
        "spec": {
            "addresses": [
                {"type": "InternalIP", "ip": "172.31.0.11"},
                {"type": "CiliumInternalIP", "ip": "10.244.1.1"},
            ],
            "ipam": {"podCIDRs": ["10.244.1.0/24"]},
        },
    }
    empty.put_raw(keys.object_key("ciliumnodes", None, "node1"), node)
    return empty


# --- apply ---------------------------------------------------------------------------------------------


def test_apply_prints_what_happened_to_each_object(empty: Cluster, tmp_path: Path) -> None:
    manifest = tmp_path / "cluster.yaml"
    manifest.write_text(CLUSTER)
    first = empty.run("apply", "-f", str(manifest))
    second = empty.run("apply", "-f", str(manifest))
    manifest.write_text(CLUSTER.replace("[{toEntities: [cluster]}]", "[{toEntities: [world]}]"))
    third = empty.run("apply", "-f", str(manifest))
    assert (first.exit_code, second.exit_code, third.exit_code) == (0, 0, 0)
    assert_golden("apply.txt", first.stdout + "---\n" + second.stdout + "---\n" + third.stdout)


def test_apply_reads_stdin(empty: Cluster) -> None:
    result = empty.run("apply", "-f", "-", input="apiVersion: v1\nkind: Namespace\nmetadata: {name: piped}\n")
    assert (result.exit_code, result.stdout) == (0, "namespace/piped created\n")


def test_apply_with_namespace_flag(empty: Cluster) -> None:
    pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c}]}\n"
    assert (
        empty.run("apply", "-f", "-", input="apiVersion: v1\nkind: Namespace\nmetadata: {name: ns1}\n").exit_code == 0
    )
    assert empty.run("apply", "-n", "ns1", "-f", "-", input=pod).stdout == "pod/p created\n"
    assert empty.run("get", "pods", "-n", "ns1", "-o", "name").stdout == "pod/p\n"


def test_invalid_manifest_writes_nothing_and_names_every_problem(empty: Cluster, tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    bad = tmp_path / "bad.yaml"
    good.write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: team}\n")
    bad.write_text(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r, namespace: team}\n"
        "spec:\n  endpointSelector: {}\n  ingress:\n  - toPorts: [{ports: [{port: '99999'}]}]\n"
        "---\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, ports: [{port: 80}]}]}\n"
    )
    result = empty.run("apply", "-f", str(good), "-f", str(bad))
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (
        f'Error: {bad}: CiliumNetworkPolicy/r: spec.ingress[0].toPorts[0].ports[0].port: invalid value "99999": '
        "must be between 0 and 65535, inclusive\n"
        f"Error: {bad}: Pod/p: spec.containers[0].ports[0].containerPort: required value\n"
        f"Error: {bad}: Pod/p: spec.containers[0].ports[0].port: unknown field\n"
    )
    assert empty.run("get", "ns", "-o", "name").stdout == "namespace/default\n"


def test_apply_into_a_missing_namespace_is_refused(empty: Cluster, tmp_path: Path) -> None:
    manifest = tmp_path / "app.yaml"
    manifest.write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: ok}\n---\n"
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: nope}\nspec: {ports: [{port: 80}]}\n"
    )
    result = empty.run("apply", "-f", str(manifest))
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == f'Error: {manifest}: Service/web: namespaces "nope" not found\n'
    assert empty.run("get", "ns", "ok").exit_code == 1


# --- get -------------------------------------------------------------------------------------------------

GET_CASES = [
    ("get-pods.txt", ["get", "pods", "-n", "demo"]),
    ("get-pods-wide.txt", ["get", "po", "-n", "demo", "-o", "wide"]),
    ("get-pods-all-namespaces.txt", ["get", "pods", "-A"]),
    ("get-pods-selector.txt", ["get", "pods", "-A", "-l", "app in (web,db)"]),
    ("get-pod.yaml", ["get", "pod", "web", "-n", "demo", "-o", "yaml"]),
    ("get-pod.json", ["get", "pods/web", "-n", "demo", "-o", "json"]),
    ("get-pods-list.yaml", ["get", "pods", "-n", "demo", "-o", "yaml"]),
    ("get-pods-list.json", ["get", "pods", "-n", "demo", "-o", "json"]),
    ("get-pods-name.txt", ["get", "pods", "-A", "-o", "name"]),
    ("get-services.txt", ["get", "svc", "-n", "demo"]),
    ("get-services-wide.txt", ["get", "services", "-n", "demo", "-o", "wide"]),
    ("get-service.yaml", ["get", "svc", "lb", "-n", "demo", "-o", "yaml"]),
    ("get-networkpolicies.txt", ["get", "netpol", "-n", "demo"]),
    ("get-networkpolicy.yaml", ["get", "netpol", "allow-web", "-n", "demo", "-o", "yaml"]),
    ("get-cnp.txt", ["get", "cnp", "-n", "demo"]),
    ("get-cnp.yaml", ["get", "cnp", "rule1", "-n", "demo", "-o", "yaml"]),
    ("get-ccnp.txt", ["get", "ccnp"]),
    ("get-ippools.txt", ["get", "ippools"]),
    ("get-ippools.json", ["get", "ippool", "-o", "json"]),
    ("get-namespaces.txt", ["get", "ns"]),
    ("get-ciliumnodes.txt", ["get", "ciliumnodes"]),
    ("get-ciliumnode.yaml", ["get", "cn", "node1", "-o", "yaml"]),
]


@pytest.mark.parametrize(("golden", "args"), GET_CASES, ids=[c[0] for c in GET_CASES])
def test_get_prints_like_kubectl(cluster: Cluster, golden: str, args: list[str]) -> None:
    result = cluster.run(*args)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert_golden(golden, result.stdout)


def test_get_of_nothing_says_so_on_stderr(cluster: Cluster) -> None:
    result = cluster.run("get", "pods", "-n", "empty")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "No resources found in empty namespace.\n")
    result = cluster.run("get", "bgpp")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "No resources found.\n")
    result = cluster.run("get", "bgpp", "-o", "json")
    assert result.exit_code == 0 and result.stderr == ""
    assert json.loads(result.stdout) == {
        "apiVersion": "v1",
        "items": [],
        "kind": "List",
        "metadata": {"resourceVersion": ""},
    }


def test_get_missing_object_fails_with_kubectl_message(cluster: Cluster) -> None:
    result = cluster.run("get", "pod", "nope", "-n", "demo")
    assert (result.exit_code, result.stdout, result.stderr) == (1, "", 'Error: pods "nope" not found\n')
    result = cluster.run("get", "pods", "web", "nope", "-n", "demo", "-o", "name")
    assert (result.exit_code, result.stdout, result.stderr) == (1, "pod/web\n", 'Error: pods "nope" not found\n')


def test_get_refuses_what_it_cannot_do(cluster: Cluster) -> None:
    unknown = cluster.run("get", "deployments")
    assert (unknown.exit_code, unknown.stderr) == (1, "Error: unknown resource type 'deployments'\n")
    both = cluster.run("get", "pods", "-n", "demo", "-A")
    assert both.exit_code == 2
    assert "-n/--namespace and -A/--all-namespaces are mutually exclusive" in both.stderr
    by_name = cluster.run("get", "pods", "web", "-A")
    assert by_name.exit_code == 2
    assert "a resource cannot be retrieved by name across all namespaces" in by_name.stderr
    bad_format = cluster.run("get", "pods", "-o", "xml")
    assert bad_format.exit_code == 2
    bad_selector = cluster.run("get", "pods", "-l", "a b")
    assert (bad_selector.exit_code, bad_selector.stderr) == (
        1,
        'Error: invalid label selector "a b": unexpected text at "a b"\n',
    )


# --- delete ---------------------------------------------------------------------------------------------


def test_delete_by_name_and_by_file(cluster: Cluster, tmp_path: Path) -> None:
    result = cluster.run("delete", "cnp", "rule1", "rule2", "-n", "demo")
    assert (result.exit_code, result.stdout) == (0, 'ciliumnetworkpolicy.cilium.io "rule1" deleted\n'
                                                    'ciliumnetworkpolicy.cilium.io "rule2" deleted\n')  # fmt: skip
    manifest = tmp_path / "pods.yaml"
    # delete -f needs only kind, namespace and name: a body that would not validate is fine.
    manifest.write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: db}\nspec: {bogus: true}\n---\n"
        "apiVersion: v1\nkind: Pod\nmetadata: {name: gone}\n"
    )
    result = cluster.run("delete", "-f", str(manifest))
    assert (result.exit_code, result.stdout, result.stderr) == (
        1,
        'pod "db" deleted\n',
        'Error: pods "gone" not found\n',
    )
    result = cluster.run("delete", "-f", str(manifest), "--ignore-not-found")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "")


def test_deleting_a_namespace_removes_its_objects(cluster: Cluster) -> None:
    result = cluster.run("delete", "ns", "demo")
    assert (result.exit_code, result.stdout) == (0, 'namespace "demo" deleted\n')
    assert cluster.run("get", "pods", "-A", "-o", "name").stdout == "pod/db\n"
    assert cluster.run("get", "svc", "-A", "-o", "name").stdout == ""
    refused = cluster.run("delete", "namespace", "default")
    assert (refused.exit_code, refused.stderr) == (
        1,
        'Error: namespaces "default" is forbidden: this namespace may not be deleted\n',
    )


def test_delete_usage_errors(cluster: Cluster) -> None:
    assert cluster.run("delete").exit_code == 2
    assert cluster.run("delete", "pods").exit_code == 2
    assert cluster.run("delete", "pods", "web", "-f", "x.yaml").exit_code == 2


# --- label -------------------------------------------------------------------------------------------------


def test_label_like_kubectl(cluster: Cluster) -> None:
    result = cluster.run("label", "pod", "web", "-n", "demo", "env=prod", "tier-")
    assert (result.exit_code, result.stdout) == (0, "pod/web labeled\n")
    result = cluster.run("label", "pods/web", "-n", "demo", "app=api")
    assert (result.exit_code, result.stdout, result.stderr) == (
        1,
        "",
        "Error: 'app' already has a value (web), and --overwrite is false\n",
    )
    result = cluster.run("label", "po", "web", "-n", "demo", "app=api", "--overwrite")
    assert (result.exit_code, result.stdout) == (0, "pod/web labeled\n")
    result = cluster.run("label", "po", "web", "-n", "demo", "env-", "nothere-")
    assert (result.exit_code, result.stdout, result.stderr) == (
        0,
        "pod/web unlabeled\n",
        'label "nothere" not found.\n',
    )
    assert cluster.run("get", "pods", "-n", "demo", "-l", "app=api", "-o", "name").stdout == "pod/web\n"
    result = cluster.run("label", "ns", "demo", "team=blue")
    assert (result.exit_code, result.stdout) == (0, "namespace/demo labeled\n")


def test_label_usage_errors(cluster: Cluster) -> None:
    assert cluster.run("label", "pod", "web").exit_code == 2
    invalid = cluster.run("label", "pod", "web", "-n", "demo", "novalue")
    assert invalid.exit_code == 2 and "invalid label spec: novalue" in invalid.stderr
    missing = cluster.run("label", "pod", "nope", "-n", "demo", "a=b")
    assert (missing.exit_code, missing.stderr) == (1, 'Error: pods "nope" not found\n')
    bad_value = cluster.run("label", "pod", "web", "-n", "demo", "a=-b")
    assert bad_value.exit_code == 1
    assert bad_value.stderr.startswith('Error: invalid label value "-b": must be empty or consist of')


def test_get_output_applies_back_unchanged(cluster: Cluster) -> None:
    for kind in ("pods", "svc", "netpol", "cnp", "ccnp", "ippools", "ns"):
        listed = cluster.run("get", kind, "-A", "-o", "yaml")
        assert listed.exit_code == 0
        reapplied = cluster.run("apply", "-f", "-", input=listed.stdout)
        assert reapplied.exit_code == 0, reapplied.output
        assert reapplied.stdout and all(line.endswith(" unchanged") for line in reapplied.stdout.splitlines())


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (-5, "<invalid>"),
        (-1, "0s"),
        (59, "59s"),
        (119, "119s"),
        (120, "2m"),
        (185, "3m5s"),
        (600, "10m"),
        (179 * 60, "179m"),
        (3 * 3600, "3h"),
        (7 * 3600 + 59 * 60, "7h59m"),
        (8 * 3600, "8h"),
        (47 * 3600, "47h"),
        (48 * 3600, "2d"),
        (7 * 86400 + 23 * 3600, "7d23h"),
        (8 * 86400, "8d"),
        (2 * 365 * 86400 + 86400, "2y1d"),
        (9 * 365 * 86400, "9y"),
    ],
)
def test_age_is_rendered_like_kubectl(seconds: int, shown: str) -> None:
    from membrane.cli.printers import human_duration

    assert human_duration(seconds) == shown


def test_table_printer_pads_like_kubectl_tabwriter() -> None:
    from membrane.cli.printers import format_table

    assert format_table(["NAME", "IP", "X"], [["a", "10.0.0.1", "y"], ["long-name", "-", ""]]) == (
        "NAME        IP         X\na           10.0.0.1   y\nlong-name   -          \n"
    )
    assert format_table(["A", "B"], [["x", "y"]]) == "A     B\nx     y\n"


def test_a_deleted_pod_on_a_node_is_terminating_until_forced(empty: Cluster, tmp_path: Path) -> None:
    manifest = tmp_path / "pod.yaml"
    manifest.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec: {nodeName: node1, "
                        "terminationGracePeriodSeconds: 45, containers: [{name: c, image: i}]}\n")
    assert empty.run("apply", "-f", str(manifest)).exit_code == 0
    result = empty.run("delete", "pod", "web")
    assert (result.exit_code, result.stdout) == (0, 'pod "web" deleted\n')
    assert empty.run("get", "pods").stdout.splitlines()[1].split()[:3] == ["web", "0/1", "Terminating"]
    meta = json.loads(empty.run("get", "pod", "web", "-o", "json").stdout)["metadata"]
    assert meta["deletionGracePeriodSeconds"] == 45
    assert meta["deletionTimestamp"] > meta["creationTimestamp"]
    result = empty.run("delete", "pod", "web", "--force")
    assert (result.exit_code, result.stdout) == (0, 'pod "web" deleted\n')
    assert empty.run("get", "pods").stderr == "No resources found in default namespace.\n"
