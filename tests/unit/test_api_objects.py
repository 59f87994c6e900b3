"""The resource API over the store: all-or-nothing apply, Kubernetes' metadata rules, labels, namespaces."""

from __future__ import annotations

import ipaddress
import itertools
import json
from collections.abc import Callable, Sequence

import pytest

from membrane.api import cilium, k8s
from membrane.api.manifest import parse_manifest_text
from membrane.api.meta import ApiObject
from membrane.core.errors import InvalidInput, MembraneError, NotFound
from membrane.store import keys
from membrane.store.base import Compare, Op, TxnResult
from membrane.store.memory import MemoryStore
from membrane.store.objects import ApplyRejected, Conflict, ObjectClient

NAMESPACE = "apiVersion: v1\nkind: Namespace\nmetadata: {name: prod, labels: {team: a}}\n"
POD = """
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: prod, labels: {app: web}}
spec:
  containers:
  - name: web
    image: nginx:1
    command: [httpd, -f]
    ports: [{containerPort: 80, name: http}]
"""
SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: prod}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, name: http}]
"""
POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allow, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress: [{fromEntities: [cluster]}]
"""


def objs(*texts: str) -> list[ApiObject]:
    return parse_manifest_text("---\n".join(texts))


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def client(store: MemoryStore) -> ObjectClient:
    stamps = (f"2024-05-01T10:00:{i:02d}Z" for i in itertools.count())
    uids = (f"uid-{i}" for i in itertools.count(1))
    return ObjectClient(store, clock=lambda: next(stamps), new_uid=lambda: next(uids))


async def test_create_sets_system_metadata_and_initial_status(client: ObjectClient, store: MemoryStore) -> None:
    results = await client.apply(objs(NAMESPACE, POD))
    assert [(r.ref.slash_name(), r.action) for r in results] == [("namespace/prod", "created"), ("pod/web", "created")]
    pod = await client.get("Pod", "prod", "web")
    assert isinstance(pod, k8s.Pod)
    assert pod.metadata.uid == "uid-2"
    assert pod.metadata.creationTimestamp == "2024-05-01T10:00:01Z"
    assert pod.metadata.generation == 1
    assert pod.metadata.resourceVersion == str(await store.revision())
    assert pod.status == k8s.PodStatus(phase="Pending")
    assert results[1].object.metadata.resourceVersion == pod.metadata.resourceVersion
    # Stored as the normalized JSON, without resourceVersion, where the agents look for it.
    raw = await store.get(keys.object_key("pods", "prod", "web"))
    assert raw is not None
    stored = json.loads(raw.value)
    assert "resourceVersion" not in stored["metadata"]
    assert stored["spec"]["containers"][0]["ports"] == [{"containerPort": 80, "name": "http", "protocol": "TCP"}]


async def test_namespaces_get_the_name_label_and_are_active(client: ObjectClient) -> None:
    await client.apply(objs(NAMESPACE))
    ns = await client.get("Namespace", None, "prod")
    assert ns.labels == {"team": "a", "kubernetes.io/metadata.name": "prod"}
    assert isinstance(ns, k8s.Namespace) and ns.status is not None and ns.status.phase == "Active"


async def test_reapplying_the_same_manifest_is_unchanged_and_writes_nothing(
    client: ObjectClient, store: MemoryStore
) -> None:
    await client.apply(objs(NAMESPACE, POD, SERVICE, POLICY))
    revision = await store.revision()
    results = await client.apply(objs(NAMESPACE, POD, SERVICE, POLICY))
    assert [r.action for r in results] == ["unchanged"] * 4
    assert await store.revision() == revision


async def test_update_bumps_generation_only_for_spec_changes(client: ObjectClient) -> None:
    await client.apply(objs(NAMESPACE, POLICY))
    created = await client.get("CiliumNetworkPolicy", "prod", "allow")

    relabelled = POLICY.replace("name: allow, namespace: prod", "name: allow, namespace: prod, labels: {v: '2'}")
    (result,) = await client.apply(objs(relabelled))
    assert result.action == "configured"
    assert result.object.metadata.generation == 1

    changed = relabelled.replace("fromEntities: [cluster]", "fromEntities: [world]")
    (result,) = await client.apply(objs(changed))
    assert result.action == "configured"
    updated = await client.get("CiliumNetworkPolicy", "prod", "allow")
    assert updated.metadata.generation == 2
    assert updated.metadata.uid == created.metadata.uid
    assert updated.metadata.creationTimestamp == created.metadata.creationTimestamp
    assert int(updated.metadata.resourceVersion or 0) > int(created.metadata.resourceVersion or 0)


async def test_apply_keeps_the_status_the_system_wrote(client: ObjectClient) -> None:
    await client.apply(objs(NAMESPACE, POLICY))
    await client.update_status(
        "CiliumNetworkPolicy", "prod", "allow", {"conditions": [{"type": "Valid", "status": "True"}]}
    )
    await client.apply(objs(POLICY.replace("[cluster]", "[host]")))
    policy = await client.get("CiliumNetworkPolicy", "prod", "allow")
    assert isinstance(policy, cilium.CiliumNetworkPolicy) and policy.status is not None
    assert policy.status.conditions is not None and policy.status.conditions[0].status == "True"


async def test_one_bad_object_means_nothing_is_written(client: ObjectClient, store: MemoryStore) -> None:
    revision = await store.revision()
    other = POD.replace("name: web, namespace: prod", "name: db, namespace: staging")
    with pytest.raises(ApplyRejected) as caught:
        await client.apply(objs(SERVICE.replace("namespace: prod", "namespace: default"), POD, other))
    assert caught.value.problems == ['Pod/web: namespaces "prod" not found', 'Pod/db: namespaces "staging" not found']
    assert [r.index for r in caught.value.rejections] == [1, 2]
    assert await store.revision() == revision
    assert await client.list("Service", None) == []


async def test_namespace_applied_together_with_its_objects(client: ObjectClient) -> None:
    results = await client.apply(objs(POD, SERVICE, NAMESPACE))
    assert [r.action for r in results] == ["created"] * 3


async def test_default_namespace_always_exists(client: ObjectClient) -> None:
    pod = POD.replace("namespace: prod", "namespace: default")
    assert [r.action for r in await client.apply(objs(pod))] == ["created"]
    default = await client.get("Namespace", None, "default")
    assert default.labels == {"kubernetes.io/metadata.name": "default"}
    assert [ns.name for ns in await client.list("Namespace")] == ["default"]
    with pytest.raises(MembraneError, match=r'namespaces "default" is forbidden: this namespace may not be deleted'):
        await client.delete("Namespace", None, "default")


async def test_deleting_a_namespace_deletes_what_is_in_it(client: ObjectClient) -> None:
    elsewhere = POD.replace("namespace: prod", "namespace: default")
    await client.apply(objs(NAMESPACE, POD, SERVICE, POLICY, elsewhere))
    deleted = await client.delete("Namespace", None, "prod")
    assert deleted.name == "prod"
    assert await client.list("Pod") == [await client.get("Pod", "default", "web")]
    assert await client.list("Service") == []
    assert await client.list("CiliumNetworkPolicy") == []


async def test_delete_reports_missing_objects_like_kubectl(client: ObjectClient) -> None:
    await client.apply(objs(NAMESPACE, POD))
    with pytest.raises(NotFound, match=r'^services "web" not found$'):
        await client.delete("Service", "prod", "web")
    with pytest.raises(NotFound, match=r'^ciliumnetworkpolicies "allow" not found$'):
        await client.get("cnp", "prod", "allow")
    pods = objs(POD)
    deleted, missing = await client.delete_objects([*pods, *objs(SERVICE)])
    assert [o.name for o in deleted] == ["web"]
    assert [str(ref) for ref in missing] == ["Service/web"]
    assert await client.find("Pod", "prod", "web") is None


async def test_labels_follow_kubectl_label(client: ObjectClient) -> None:
    await client.apply(objs(NAMESPACE, POD))
    obj, verdict, warnings = await client.set_labels("Pod", "prod", "web", {"tier": "front"})
    assert (verdict, warnings, obj.labels) == ("labeled", [], {"app": "web", "tier": "front"})
    assert obj.metadata.generation == 1

    with pytest.raises(InvalidInput, match=r"'app' already has a value \(web\), and --overwrite is false"):
        await client.set_labels("Pod", "prod", "web", {"app": "api"})
    obj, verdict, _ = await client.set_labels("Pod", "prod", "web", {"app": "api"}, overwrite=True)
    assert (verdict, obj.labels["app"]) == ("labeled", "api")

    obj, verdict, warnings = await client.set_labels("Pod", "prod", "web", remove=["tier", "gone"])
    assert (verdict, warnings, obj.labels) == ("unlabeled", ['label "gone" not found.'], {"app": "api"})
    _, verdict, _ = await client.set_labels("Pod", "prod", "web", {"app": "api"})
    assert verdict == "not labeled"

    with pytest.raises(InvalidInput, match=r'invalid label key "bad key"'):
        await client.set_labels("Pod", "prod", "web", {"bad key": "x"})
    with pytest.raises(NotFound, match=r'pods "nope" not found'):
        await client.set_labels("Pod", "prod", "nope", {"a": "b"})


async def test_namespace_name_label_cannot_be_removed(client: ObjectClient) -> None:
    await client.apply(objs(NAMESPACE))
    obj, verdict, _ = await client.set_labels("ns", None, "prod", remove=["kubernetes.io/metadata.name"])
    assert verdict == "not labeled"
    assert obj.labels["kubernetes.io/metadata.name"] == "prod"
    obj, verdict, _ = await client.set_labels("ns", None, "default", {"env": "dev"})
    assert verdict == "labeled" and obj.labels == {"env": "dev", "kubernetes.io/metadata.name": "default"}


async def test_system_allocated_service_fields_survive_a_reapply(client: ObjectClient) -> None:
    (created,) = (await client.apply(objs(NAMESPACE, SERVICE)))[1:]
    # The API allocates a cluster IP and node ports the manifest leaves out.
    assert isinstance(created.object, k8s.Service) and created.object.spec.ports is not None
    allocated = (created.object.spec.clusterIP, created.object.spec.ports[0].nodePort)
    assert allocated == ("10.96.0.2", 30000)
    (result,) = await client.apply(objs(SERVICE))
    assert result.action == "unchanged"
    service = await client.get("svc", "prod", "web")
    assert isinstance(service, k8s.Service) and service.spec.ports is not None
    assert (service.spec.clusterIP, service.spec.ports[0].nodePort) == allocated

    changed = SERVICE.replace("type: NodePort", "type: NodePort\n  clusterIP: 10.96.0.11")
    with pytest.raises(ApplyRejected, match=r'spec.clusterIP: invalid value "10.96.0.11": field is immutable'):
        await client.apply(objs(changed))


async def test_pod_spec_is_immutable_but_placement_and_image_may_change(client: ObjectClient) -> None:
    await client.apply(objs(NAMESPACE, POD))
    placed = POD.replace("spec:\n", "spec:\n  nodeName: node1\n")
    assert (await client.apply(objs(placed)))[0].action == "configured"
    # The original manifest leaves nodeName out: the placement is kept.
    assert (await client.apply(objs(POD)))[0].action == "unchanged"
    assert (await client.apply(objs(POD.replace("nginx:1", "nginx:2"))))[0].action == "configured"
    with pytest.raises(ApplyRejected, match=r"spec: forbidden: pod updates may not change fields other than"):
        await client.apply(objs(POD.replace("[httpd, -f]", "[sleep, '1']")))
    with pytest.raises(ApplyRejected, match=r'spec.nodeName: invalid value "node2": field is immutable once set'):
        await client.apply(objs(placed.replace("node1", "node2")))


async def test_status_update_with_stale_resource_version_conflicts(client: ObjectClient) -> None:
    await client.apply(objs(NAMESPACE, POD))
    pod = await client.get("Pod", "prod", "web")
    updated = await client.update_status(
        "Pod", "prod", "web", k8s.PodStatus(phase="Running", podIP="10.244.1.5"),
        resource_version=pod.metadata.resourceVersion,
    )  # fmt: skip
    assert isinstance(updated, k8s.Pod) and updated.status is not None and updated.status.podIP == "10.244.1.5"
    assert updated.metadata.generation == 1
    with pytest.raises(Conflict, match=r'Operation cannot be fulfilled on pods "web": the object has been modified'):
        await client.update_status(
            "Pod", "prod", "web", {"phase": "Failed"}, resource_version=pod.metadata.resourceVersion
        )
    with pytest.raises(InvalidInput, match=r'Pod/web: status.phase: unsupported value "Done"'):
        await client.update_status("Pod", "prod", "web", {"phase": "Done"})


class RacingStore(MemoryStore):
    """A store where another writer gets in before each of the first ``races`` transactions."""

    def __init__(self, interfere: Callable[[MemoryStore], object], races: int = 1) -> None:
        super().__init__()
        self.interfere = interfere
        self.races = races
        self.txns = 0

    async def txn(self, compares: Sequence[Compare], ops: Sequence[Op]) -> TxnResult:
        self.txns += 1
        if self.races > 0:
            self.races -= 1
            await self.interfere(self)  # type: ignore[misc]
        return await super().txn(compares, ops)


async def test_apply_retries_when_another_writer_wins_the_race() -> None:
    async def someone_labels_the_pod(store: MemoryStore) -> None:
        other = ObjectClient(store)
        if await other.find("Pod", "prod", "web") is not None:
            await other.update_status("Pod", "prod", "web", {"phase": "Running"})

    store = RacingStore(someone_labels_the_pod, races=0)
    client = ObjectClient(store)
    await client.apply(objs(NAMESPACE, POD))
    store.races = 1
    (result,) = await client.apply(objs(POD.replace("nginx:1", "nginx:2")))
    assert result.action == "configured"
    assert store.txns == 1 + 2 + 1  # first apply, the lost race and its retry, plus the racer's own write
    pod = await client.get("Pod", "prod", "web")
    assert isinstance(pod, k8s.Pod) and pod.status is not None and pod.status.phase == "Running"
    assert pod.spec.containers[0].image == "nginx:2"


async def test_objects_written_by_agents_with_extra_status_fields_decode(
    client: ObjectClient, store: MemoryStore
) -> None:
    node = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNode",
        "metadata": {"name": "node1", "uid": "u", "creationTimestamp": "2024-05-01T10:00:00Z", "generation": 1},
        "spec": {"addresses": [{"type": "InternalIP", "ip": "172.31.0.11"}], "ipam": {"podCIDRs": ["10.244.1.0/24"]}},
        "status": {"routing": "vxlan", "mtu": 1450},
    }
    await store.put(keys.object_key("ciliumnodes", None, "node1"), json.dumps(node).encode())
    (got,) = await client.list("cn")
    assert isinstance(got, cilium.CiliumNode)
    assert got.address("InternalIP") == "172.31.0.11"
    assert got.to_dict()["status"] == {"routing": "vxlan", "mtu": 1450}
    assert got.internal_ip() == ipaddress.IPv4Address("172.31.0.11")
    assert got.pod_cidr() == ipaddress.IPv4Network("10.244.1.0/24")


def test_a_nodes_ipv4_address_and_pod_cidr_skip_what_is_not_ipv4() -> None:
    node = cilium.CiliumNode.model_validate({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": "node1"},
        "spec": {"addresses": [{"type": "ExternalIP", "ip": "198.51.100.9"}, {"type": "InternalIP", "ip": "fd00::11"},
                               {"type": "InternalIP", "ip": "172.31.0.11"}],
                 "ipam": {"podCIDRs": ["fd00:10:244::/64", "10.244.1.0/24"]}},
    })
    assert node.internal_ip() == ipaddress.IPv4Address("172.31.0.11")
    assert node.pod_cidr() == ipaddress.IPv4Network("10.244.1.0/24")
    bare = cilium.CiliumNode.model_validate({"apiVersion": "cilium.io/v2", "kind": "CiliumNode",
                                             "metadata": {"name": "node2"}})
    assert bare.internal_ip() is None and bare.pod_cidr() is None


async def test_list_with_revision_gives_a_watch_start(client: ObjectClient, store: MemoryStore) -> None:
    await client.apply(objs(NAMESPACE, POD))
    pods, revision = await client.list_with_revision("pods", "prod")
    assert [p.name for p in pods] == ["web"]
    assert revision == await store.revision()
    assert await client.list("pods", "other") == []


async def test_applying_default_namespace_updates_the_implicit_one(client: ObjectClient, store: MemoryStore) -> None:
    default = "apiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n"
    revision = await store.revision()
    assert [r.action for r in await client.apply(objs(default))] == ["unchanged"]
    assert await store.revision() == revision
    labelled = default.replace("{name: default}", "{name: default, labels: {env: dev}}")
    assert [r.action for r in await client.apply(objs(labelled))] == ["configured"]
    stored = await client.get("ns", None, "default")
    assert stored.labels == {"env": "dev", "kubernetes.io/metadata.name": "default"}
    assert stored.metadata.uid is not None


async def test_objects_built_in_code_are_checked_too(client: ObjectClient, store: MemoryStore) -> None:
    nameless = k8s.Pod(apiVersion="v1", spec=k8s.PodSpec(containers=(k8s.Container(name="c"),)))
    bad_port = k8s.Pod(
        apiVersion="v1",
        metadata={"name": "p"},  # type: ignore[arg-type]
        spec=k8s.PodSpec(containers=(k8s.Container(name="c", ports=(k8s.ContainerPort(containerPort=0),)),)),
    )
    with pytest.raises(ApplyRejected) as caught:
        await client.apply([nameless, bad_port])
    assert caught.value.problems == [
        "Pod/: metadata.name: required value",
        "Pod/p: spec.containers[0].ports[0].containerPort: invalid value 0: must be between 1 and 65535, inclusive",
    ]
    assert await store.revision() == 1


async def test_deleting_a_bound_pod_marks_it_terminating_for_its_grace_period(store: MemoryStore) -> None:
    client = ObjectClient(store, clock=lambda: "2026-05-01T10:00:00Z")
    bound = POD.replace("spec:\n", "spec:\n  nodeName: node1\n")
    other = bound.replace("name: web,", "name: api,").replace("spec:\n", "spec:\n  terminationGracePeriodSeconds: 5\n")
    await client.apply(objs(NAMESPACE, bound, other, SERVICE))

    deleted = await client.delete("Pod", "prod", "web")
    assert (deleted.metadata.deletionTimestamp, deleted.metadata.deletionGracePeriodSeconds) == (
        "2026-05-01T10:00:30Z", 30)
    stored = await client.get("Pod", "prod", "web")
    assert stored.metadata.deletionTimestamp == "2026-05-01T10:00:30Z"  # still there, terminating
    # Deleting again can shorten the grace period, never lengthen it.
    assert (await client.delete("Pod", "prod", "web", grace_period=60)).metadata.deletionGracePeriodSeconds == 30
    again = await client.delete("Pod", "prod", "web", grace_period=2)
    assert (again.metadata.deletionTimestamp, again.metadata.deletionGracePeriodSeconds) == ("2026-05-01T10:00:02Z", 2)
    # Applying the pod again keeps the marks (the node is stopping it).
    await client.apply(objs(bound))
    assert (await client.get("Pod", "prod", "web")).metadata.deletionGracePeriodSeconds == 2

    # The pod's own terminationGracePeriodSeconds, in one transaction with a service.
    deleted_objs, _ = await client.delete_objects([*objs(other), *objs(SERVICE)])
    assert [o.metadata.deletionGracePeriodSeconds for o in deleted_objs] == [5, None]
    assert await client.find("Service", "prod", "web") is None

    # Only the node finishes the deletion, and only of the uid it stopped.
    assert not await client.finish_deletion("Pod", "prod", "web", "another-uid")
    assert await client.finish_deletion("Pod", "prod", "web", stored.metadata.uid or "")
    assert await client.find("Pod", "prod", "web") is None

    # A namespace takes its terminating pods with it at once.
    await client.delete("Namespace", None, "prod")
    assert await client.list("Pod") == []


async def test_an_unbound_pod_or_grace_period_zero_deletes_at_once(store: MemoryStore) -> None:
    client = ObjectClient(store)
    bound = POD.replace("spec:\n", "spec:\n  nodeName: node1\n")
    await client.apply(objs(NAMESPACE, POD))
    await client.delete("Pod", "prod", "web")
    assert await client.find("Pod", "prod", "web") is None
    await client.apply(objs(bound))
    await client.delete("Pod", "prod", "web", grace_period=0)
    assert await client.find("Pod", "prod", "web") is None
