"""The resource API over the store: apply, get, list, delete, label, status -- with Kubernetes' rules.

Objects live under :func:`ref_key` (``keys.object_key(plural, namespace, name)``) as the JSON of the
normalized object (defaults filled, unset fields omitted, no ``resourceVersion``); the
``resourceVersion`` a reader sees is the key's ``mod_revision``. Watchers decode values with
:func:`decode`.

Rules (as the Kubernetes API server applies them):

- :meth:`ObjectClient.apply` is all-or-nothing: every object is checked first, then everything is
  written in one transaction that compares the revision of every key it read; a lost race is
  retried from scratch. Create sets ``uid``, ``creationTimestamp``, ``generation: 1`` and the
  initial status; update keeps ``uid``, ``creationTimestamp`` and ``status`` and bumps
  ``generation`` only when the body (everything but metadata and status) changed. An object that
  would not change is reported ``unchanged`` and not written.
- Fields the system fills in are carried over when a manifest leaves them out: a Service's
  ``clusterIP(s)``, ``ipFamilies``/``ipFamilyPolicy``, ``healthCheckNodePort`` and ``nodePort``\\s,
  and a Pod's ``nodeName``. A Pod's spec is otherwise immutable, as in Kubernetes.
- A namespaced object needs its Namespace to exist or to be applied with it (``default``
  always exists). Deleting a Namespace deletes the objects in it in the same transaction.
- Deleting a Pod bound to a node is graceful: the object gets ``deletionTimestamp`` (now + the
  grace period) and ``deletionGracePeriodSeconds`` (the delete's grace period, else the pod's
  ``terminationGracePeriodSeconds``, else 30) and stays until its node has stopped it and
  removes it (:mod:`membrane.agent.runner`). A grace period of 0, an unbound pod and a finished
  one are removed at once; deleting a terminating pod again can only shorten its grace period.
  The Pods of a deleted Namespace are removed at once, with the Namespace.
- Every Namespace carries the label ``kubernetes.io/metadata.name=<name>``.

Primitives: :class:`ObjectClient`, :class:`ApplyResult`, :class:`Rejection`,
:class:`ApplyRejected`, :func:`encode`, :func:`decode`, :func:`default_namespace`, :func:`ref_key`,
:func:`pod_grace_period`.

The models and their validation are :mod:`membrane.api`'s, which knows nothing of the store; this
module is where the two meet.
"""

from __future__ import annotations

import builtins
import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from membrane.api import k8s
from membrane.api.meta import ApiObject, ObjectMeta, collect_problems, label_key_error, label_value_error, quote
from membrane.api.registry import KINDS, KindInfo, ObjectInvalid, ObjectRef, kind_info, lookup_kind, validate_object
from membrane.core.config import ClusterConfig
from membrane.core.errors import CompareFailed, InvalidInput, MembraneError, NotFound, StoreError
from membrane.store import keys
from membrane.store.base import Compare, Delete, KeyValue, Op, Put, Store
from membrane.store.serviceips import ALLOCATIONS_KEY, ServiceAllocator

#: How often a transaction that lost a compare-and-swap race is recomputed and retried.
MAX_ATTEMPTS = 16
#: The namespace every cluster has, whether or not an object for it was ever applied.
DEFAULT_NAMESPACE = "default"
#: Kubernetes' default ``spec.terminationGracePeriodSeconds``.
DEFAULT_TERMINATION_GRACE_SECONDS = 30
_RFC3339 = "%Y-%m-%dT%H:%M:%SZ"

Action = Literal["created", "configured", "unchanged"]
T = TypeVar("T", bound=ApiObject)


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime(_RFC3339)


def pod_grace_period(pod: k8s.Pod, requested: int | None = None) -> int:
    """The seconds a deleted pod gets to stop (Kubernetes' pod strategy CheckGracefulDelete):
    ``requested`` if given, else its ``terminationGracePeriodSeconds``, else 30; 0 for a pod no
    node runs (unbound, or finished)."""
    if not pod.spec.nodeName or (pod.status is not None and pod.status.phase in ("Succeeded", "Failed")):
        return 0
    if requested is not None:
        return max(requested, 0)
    grace = pod.spec.terminationGracePeriodSeconds
    return DEFAULT_TERMINATION_GRACE_SECONDS if grace is None else grace


def new_object_uid() -> str:
    return str(uuid.uuid4())


# --- encoding --------------------------------------------------------------------------------------------


def encode(obj: ApiObject) -> bytes:
    """The stored form: the object's JSON without ``resourceVersion`` (the store's revision is it)."""
    data = obj.to_dict()
    data.get("metadata", {}).pop("resourceVersion", None)
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def decode(kv: KeyValue) -> ApiObject:
    """A stored object, with ``metadata.resourceVersion`` set to the key's ``mod_revision``."""
    try:
        data = json.loads(kv.value)
        info = kind_info(data["kind"])
        data.setdefault("metadata", {})["resourceVersion"] = str(kv.mod_revision)
        return info.model.model_validate(data)
    except (ValueError, KeyError, TypeError, InvalidInput, ValidationError) as exc:
        raise StoreError(f"stored object {kv.key} cannot be decoded: {exc}") from None


def ref_key(ref: ObjectRef) -> str:
    """The store key of the object ``ref`` names."""
    return keys.object_key(ref.info.plural, ref.namespace, ref.name)


def default_namespace() -> k8s.Namespace:
    """The ``default`` Namespace as it is seen while nobody has applied one."""
    return k8s.Namespace(
        apiVersion="v1",
        metadata=ObjectMeta(name=DEFAULT_NAMESPACE, labels={k8s.NAMESPACE_NAME_LABEL: DEFAULT_NAMESPACE}),
        status=k8s.NamespaceStatus(phase="Active"),
    )


def _is_default_namespace(ref: ObjectRef) -> bool:
    return ref.kind == "Namespace" and ref.name == DEFAULT_NAMESPACE


def _declared(obj: ApiObject) -> tuple[dict[str, str], dict[str, str], dict[str, Any]]:
    """What a manifest declares: labels, annotations and the body."""
    return obj.labels, obj.metadata.annotations, obj.body()


def _with_meta(obj: T, **changes: Any) -> T:
    return obj.model_copy(update={"metadata": obj.metadata.model_copy(update=changes)})


def _revalidated(obj: T) -> T:
    """A copy rebuilt through validation, so defaults and types hold after model_copy updates."""
    return type(obj).model_validate(obj.model_dump(mode="json", exclude_none=True))


# --- results and errors ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApplyResult:
    ref: ObjectRef
    action: Action
    object: ApiObject


@dataclass(frozen=True)
class Rejection:
    """Why the object at ``index`` of an apply was refused."""

    index: int
    ref: ObjectRef
    message: str


class ApplyRejected(InvalidInput):
    """An apply that wrote nothing because some objects were refused (one line per object)."""

    def __init__(self, rejections: list[Rejection]) -> None:
        self.rejections = rejections
        super().__init__([f"{r.ref}: {r.message}" for r in rejections])


class Conflict(CompareFailed):
    """The object changed since the given resourceVersion was read."""


def _conflict(ref: ObjectRef) -> Conflict:
    return Conflict(
        f'Operation cannot be fulfilled on {ref.info.plural} "{ref.name}": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )


# --- carry-over and immutability rules ---------------------------------------------------------------


def _carry_over_service(old: k8s.Service, new: k8s.Service) -> k8s.Service:
    spec, before = new.spec, old.spec
    updates: dict[str, Any] = {}
    if spec.type != "ExternalName" and before.type != "ExternalName":
        for name in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"):
            if getattr(spec, name) is None and getattr(before, name) is not None:
                updates[name] = getattr(before, name)
    if spec.healthCheckNodePort is None and before.healthCheckNodePort and spec.externalTrafficPolicy == "Local":
        updates["healthCheckNodePort"] = before.healthCheckNodePort
    if spec.type in ("NodePort", "LoadBalancer") and spec.ports:
        allocated = {(p.port, p.protocol): p.nodePort for p in before.ports or () if p.nodePort}
        ports = tuple(
            p.model_copy(update={"nodePort": allocated[(p.port, p.protocol)]})
            if not p.nodePort and (p.port, p.protocol) in allocated
            else p
            for p in spec.ports
        )
        if ports != spec.ports:
            updates["ports"] = ports
    if not updates:
        return new
    return _revalidated(new.model_copy(update={"spec": spec.model_copy(update=updates)}))


def _service_problems(old: k8s.Service, new: k8s.Service) -> list[str]:
    before, after = old.spec.clusterIP, new.spec.clusterIP
    if before and after and before != after and "ExternalName" not in (old.spec.type, new.spec.type):
        return [f"spec.clusterIP: invalid value {quote(after)}: field is immutable"]
    return []


def _carry_over_pod(old: k8s.Pod, new: k8s.Pod) -> k8s.Pod:
    if new.spec.nodeName is None and old.spec.nodeName is not None:
        return new.model_copy(update={"spec": new.spec.model_copy(update={"nodeName": old.spec.nodeName})})
    return new


def _pod_problems(old: k8s.Pod, new: k8s.Pod) -> list[str]:
    if old.spec.nodeName and new.spec.nodeName != old.spec.nodeName:
        return [f"spec.nodeName: invalid value {quote(new.spec.nodeName or '')}: field is immutable once set"]

    def mutable_stripped(spec: k8s.PodSpec) -> dict[str, Any]:
        data = spec.model_dump(mode="json", exclude_none=True)
        data.pop("nodeName", None)
        for key in ("containers", "initContainers"):
            for container in data.get(key, []):
                container.pop("image", None)
        return data

    if mutable_stripped(old.spec) != mutable_stripped(new.spec):
        return [
            "spec: forbidden: pod updates may not change fields other than `spec.containers[*].image` "
            "and `spec.initContainers[*].image`; delete the pod and apply it again"
        ]
    return []


def _carry_over(old: ApiObject, new: ApiObject) -> ApiObject:
    if isinstance(old, k8s.Service) and isinstance(new, k8s.Service):
        return _carry_over_service(old, new)
    if isinstance(old, k8s.Pod) and isinstance(new, k8s.Pod):
        return _carry_over_pod(old, new)
    return new


def _update_problems(old: ApiObject, new: ApiObject) -> list[str]:
    if isinstance(old, k8s.Service) and isinstance(new, k8s.Service):
        return _service_problems(old, new)
    if isinstance(old, k8s.Pod) and isinstance(new, k8s.Pod):
        return _pod_problems(old, new)
    return []


def _initial_status(obj: ApiObject) -> BaseModel | None:
    if isinstance(obj, k8s.Namespace):
        return k8s.NamespaceStatus(phase="Active")
    if isinstance(obj, k8s.Pod):
        return k8s.PodStatus(phase="Pending")
    return None


def _forced_labels(obj: T) -> T:
    if isinstance(obj, k8s.Namespace) and obj.labels.get(k8s.NAMESPACE_NAME_LABEL) != obj.name:
        return _with_meta(obj, labels={**obj.labels, k8s.NAMESPACE_NAME_LABEL: obj.name})
    return obj


# --- the client ----------------------------------------------------------------------------------------


@dataclass
class _Plan:
    compares: dict[str, int] = field(default_factory=dict)
    ops: list[Op] = field(default_factory=list)

    def compare(self, key: str, kv: KeyValue | None) -> None:
        self.compares[key] = kv.mod_revision if kv is not None else 0


class ObjectClient:
    """Typed access to API objects in a :class:`~membrane.store.base.Store`.

    ``kind`` arguments accept whatever ``membrane get`` accepts: the kind, its plural or a short name.

    ``clock`` returns the RFC 3339 time stamped on new objects and ``new_uid`` their uid (defaults:
    :func:`now_rfc3339`, :func:`new_object_uid`); both are injectable so tests get stable output.
    """

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], str] | None = None,
        new_uid: Callable[[], str] | None = None,
    ) -> None:
        self.store = store
        self._clock = clock or now_rfc3339
        self._new_uid = new_uid or new_object_uid

    # -- reads

    async def get(self, kind: str, namespace: str | None, name: str) -> ApiObject:
        """The object, or NotFound (``pods "web" not found``)."""
        ref = self._ref(kind, namespace, name)
        kv = await self.store.get(ref_key(ref))
        if kv is None:
            if _is_default_namespace(ref):
                return default_namespace()
            raise NotFound(ref.not_found())
        return decode(kv)

    async def find(self, kind: str, namespace: str | None, name: str) -> ApiObject | None:
        try:
            return await self.get(kind, namespace, name)
        except NotFound:
            return None

    async def list(self, kind: str, namespace: str | None = None) -> builtins.list[ApiObject]:
        """Objects of ``kind`` (in ``namespace``, or in all namespaces when None), sorted by namespace and name."""
        return (await self.list_with_revision(kind, namespace))[0]

    async def list_with_revision(self, kind: str, namespace: str | None = None) -> tuple[builtins.list[ApiObject], int]:
        """Like :meth:`list`, plus the store revision of the snapshot (watch from ``revision + 1``)."""
        info = lookup_kind(kind)
        prefix = keys.objects_prefix(info.plural, namespace if info.namespaced else None)
        kvs, revision = await self.store.list(prefix)
        objects = [decode(kv) for kv in kvs]
        if info.kind == "Namespace" and not any(o.name == DEFAULT_NAMESPACE for o in objects):
            objects.append(default_namespace())
        objects.sort(key=lambda o: (o.metadata.namespace or "", o.name))
        return objects, revision

    # -- apply

    async def apply(self, objects: Sequence[ApiObject]) -> builtins.list[ApplyResult]:
        """Create or update every object in one transaction, or nothing (:class:`ApplyRejected`)."""
        objects = [self._normalized(obj) for obj in objects]
        self._check(objects)
        for _ in range(MAX_ATTEMPTS):
            plan, results = await self._plan_apply(objects)
            if not plan.ops:
                return results
            txn = await self.store.txn([Compare(k, r) for k, r in plan.compares.items()], plan.ops)
            if txn.succeeded:
                return [
                    r
                    if r.action == "unchanged"
                    else ApplyResult(r.ref, r.action, _with_meta(r.object, resourceVersion=str(txn.revision)))
                    for r in results
                ]
        raise CompareFailed("apply lost the race for the store too many times; try again")

    def _normalized(self, obj: ApiObject) -> ApiObject:
        info = kind_info(obj.kind)
        if info.namespaced and not obj.metadata.namespace:
            obj = _with_meta(obj, namespace=DEFAULT_NAMESPACE)
        elif not info.namespaced and obj.metadata.namespace is not None:
            obj = _with_meta(obj, namespace=None)
        return _forced_labels(obj)

    @staticmethod
    def _check(objects: Sequence[ApiObject]) -> None:
        """The cross-field rules (objects built in code skip them otherwise) and duplicates."""
        seen: set[ObjectRef] = set()
        rejections: builtins.list[Rejection] = []
        for index, obj in enumerate(objects):
            ref = ObjectRef.of(obj)
            rejections.extend(Rejection(index, ref, f"{path}: {message}") for path, message in collect_problems(obj))
            if ref in seen:
                rejections.append(Rejection(index, ref, "given more than once in one apply"))
            seen.add(ref)
        if rejections:
            raise ApplyRejected(rejections)

    async def _plan_apply(self, objects: Sequence[ApiObject]) -> tuple[_Plan, builtins.list[ApplyResult]]:
        plan = _Plan()
        results: builtins.list[ApplyResult] = []
        rejections: builtins.list[Rejection] = []
        applied_namespaces = {o.name for o in objects if o.kind == "Namespace"}
        namespace_kvs: dict[str, KeyValue | None] = {}
        allocator: ServiceAllocator | None = None
        for index, obj in enumerate(objects):
            ref = ObjectRef.of(obj)
            info = ref.info
            if info.namespaced:
                ns = obj.metadata.namespace or DEFAULT_NAMESPACE
                if ns not in applied_namespaces and ns != DEFAULT_NAMESPACE:
                    if ns not in namespace_kvs:
                        namespace_kvs[ns] = await self.store.get(keys.object_key("namespaces", None, ns))
                    if namespace_kvs[ns] is None:
                        rejections.append(Rejection(index, ref, f'namespaces "{ns}" not found'))
                        continue
            key = ref_key(ref)
            kv = await self.store.get(key)
            plan.compare(key, kv)
            if kv is None and _is_default_namespace(ref):
                # `default` exists even when no object for it is stored: applying it is an update.
                if _declared(obj) == _declared(default_namespace()):
                    results.append(ApplyResult(ref, "unchanged", default_namespace()))
                else:
                    created = self._created(obj)
                    plan.ops.append(Put(key, encode(created)))
                    results.append(ApplyResult(ref, "configured", created))
                continue
            if kv is None:
                created = self._created(obj)
                if isinstance(created, k8s.Service):
                    allocator = allocator or await self._service_allocator(plan)
                    created, problems = allocator.allocate(created)
                    if problems:
                        rejections.extend(Rejection(index, ref, p) for p in problems)
                        continue
                plan.ops.append(Put(key, encode(created)))
                results.append(ApplyResult(ref, "created", created))
                continue
            old = decode(kv)
            new = _carry_over(old, obj)
            problems = _update_problems(old, new)
            if problems:
                rejections.extend(Rejection(index, ref, p) for p in problems)
                continue
            updated = self._updated(old, new)
            if isinstance(updated, k8s.Service) and isinstance(old, k8s.Service):
                allocator = allocator or await self._service_allocator(plan)
                allocator.release(old)
                updated, problems = allocator.allocate(updated)
                if problems:
                    rejections.extend(Rejection(index, ref, p) for p in problems)
                    continue
            if encode(updated) == encode(old):
                results.append(ApplyResult(ref, "unchanged", old))
                continue
            plan.ops.append(Put(key, encode(updated)))
            results.append(ApplyResult(ref, "configured", updated))
        if rejections:
            raise ApplyRejected(rejections)
        if allocator is not None and allocator.changed:
            # Rewritten under the compare taken when the allocator was loaded: a concurrent
            # allocation makes this transaction fail and recompute.
            plan.ops.append(Put(ALLOCATIONS_KEY, str(len(allocator.ips) + len(allocator.node_ports)).encode()))
        for ns, kv in namespace_kvs.items():
            # The namespace must still be there when the transaction lands.
            key = keys.object_key("namespaces", None, ns)
            if key not in plan.compares:
                plan.compare(key, kv)
        return plan, results

    async def _service_allocator(self, plan: _Plan) -> ServiceAllocator:
        """The cluster IPs and node ports the stored services hold (the allocation key compared)."""
        plan.compare(ALLOCATIONS_KEY, await self.store.get(ALLOCATIONS_KEY))
        config_kv = await self.store.get(keys.CLUSTER_CONFIG)
        config = ClusterConfig.model_validate_json(config_kv.value) if config_kv is not None else ClusterConfig()
        stored, _ = await self.store.list(keys.objects_prefix("services"))
        return ServiceAllocator(config, [obj for obj in (decode(kv) for kv in stored) if isinstance(obj, k8s.Service)])

    def _created(self, obj: ApiObject) -> ApiObject:
        created = _with_meta(
            obj,
            uid=self._new_uid(),
            creationTimestamp=self._clock(),
            generation=1,
            resourceVersion=None,
            deletionTimestamp=None,
            deletionGracePeriodSeconds=None,
            managedFields=None,
            selfLink=None,
        )
        if "status" not in type(created).model_fields:
            return created
        return created.model_copy(update={"status": _initial_status(created)})

    @staticmethod
    def _updated(old: ApiObject, new: ApiObject) -> ApiObject:
        generation = old.metadata.generation or 1
        if new.body() != old.body():
            generation += 1
        updated = _with_meta(
            new,
            uid=old.metadata.uid,
            creationTimestamp=old.metadata.creationTimestamp,
            generation=generation,
            resourceVersion=None,
            deletionTimestamp=old.metadata.deletionTimestamp,
            deletionGracePeriodSeconds=old.metadata.deletionGracePeriodSeconds,
            managedFields=None,
            selfLink=None,
        )
        if "status" not in type(updated).model_fields:
            return updated
        return updated.model_copy(update={"status": getattr(old, "status", None)})

    # -- status, labels

    async def update_status(
        self, kind: str, namespace: str | None, name: str, status: Any, *, resource_version: str | None = None
    ) -> ApiObject:
        """Replace the object's status (a model or a mapping), leaving its spec and generation alone.

        With ``resource_version`` the write happens only if the object is still at that version
        (:class:`Conflict` otherwise); without it the current object is read and written by
        compare-and-swap, retrying when another writer got in between."""
        return await self.modify_status(kind, namespace, name, lambda _obj: status, resource_version=resource_version)

    async def modify_status(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        compute: Callable[[ApiObject], Any],
        *,
        resource_version: str | None = None,
    ) -> ApiObject:
        """Set the status to ``compute(current object)``; recomputed on every compare-and-swap retry."""
        ref = self._ref(kind, namespace, name)
        key = ref_key(ref)
        for _ in range(MAX_ATTEMPTS):
            kv = await self.store.get(key)
            if kv is None:
                raise NotFound(ref.not_found())
            if resource_version is not None and str(kv.mod_revision) != resource_version:
                raise _conflict(ref)
            current = decode(kv)
            status = compute(current)
            if isinstance(status, BaseModel):
                status = status.model_dump(mode="json", exclude_none=True)
            data = current.to_dict()
            if status is None:
                data.pop("status", None)
            else:
                data["status"] = status
            try:
                updated = validate_object(data, ref.info)
            except ObjectInvalid as exc:
                raise InvalidInput([f"{ref}: {line}" for line in exc.problems]) from None
            if encode(updated) == encode(current):
                return current
            txn = await self.store.txn([Compare(key, kv.mod_revision)], [Put(key, encode(updated))])
            if txn.succeeded:
                return _with_meta(updated, resourceVersion=str(txn.revision))
            if resource_version is not None:
                raise _conflict(ref)
        raise CompareFailed(f"{ref}: status update lost the race for the store too many times")

    async def set_labels(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        add: Mapping[str, str] | None = None,
        remove: Iterable[str] = (),
        *,
        overwrite: bool = False,
    ) -> tuple[ApiObject, Literal["labeled", "unlabeled", "not labeled"], builtins.list[str]]:
        """``membrane label``: add/change and remove labels, by compare-and-swap.

        Returns the object, kubectl's verdict and warnings (labels asked to be removed that were not set).
        Changing an existing label's value needs ``overwrite``, as in kubectl."""
        add = dict(add or {})
        remove = list(remove)
        problems = [f"invalid label key {quote(k)}: {r}" for k in [*add, *remove] if (r := label_key_error(k))]
        problems += [f"invalid label value {quote(v)}: {r}" for v in add.values() if (r := label_value_error(v))]
        if problems:
            raise InvalidInput(problems)
        ref = self._ref(kind, namespace, name)
        object_key = ref_key(ref)
        for _ in range(MAX_ATTEMPTS):
            kv = await self.store.get(object_key)
            if kv is not None:
                current = decode(kv)
            elif _is_default_namespace(ref):
                # Labelling `default` while it exists only implicitly stores it.
                current = self._created(default_namespace())
            else:
                raise NotFound(ref.not_found())
            labels = dict(current.labels)
            if not overwrite:
                for key, value in add.items():
                    if key in labels and labels[key] != value:
                        raise InvalidInput([f"'{key}' already has a value ({labels[key]}), and --overwrite is false"])
            warnings = [f'label "{key}" not found.' for key in remove if key not in labels]
            for key in remove:
                labels.pop(key, None)
            labels.update(add)
            updated = _forced_labels(_with_meta(current, labels=labels, resourceVersion=None))
            if updated.labels == current.labels:
                return current, "not labeled", warnings
            verdict: Literal["labeled", "unlabeled"] = (
                "unlabeled" if not overwrite and len(updated.labels) < len(current.labels) else "labeled"
            )
            txn = await self.store.txn(
                [Compare(object_key, kv.mod_revision if kv else 0)], [Put(object_key, encode(updated))]
            )
            if txn.succeeded:
                return _with_meta(updated, resourceVersion=str(txn.revision)), verdict, warnings
        raise CompareFailed(f"{ref}: label update lost the race for the store too many times")

    # -- delete

    async def delete(
        self, kind: str, namespace: str | None, name: str, *, grace_period: int | None = None
    ) -> ApiObject:
        """Delete one object (a Namespace takes its objects with it); NotFound if it does not exist.

        A Pod on a node is marked terminating rather than removed (see the module docstring;
        ``grace_period`` overrides its own); the object returned then carries the marks."""
        ref = self._ref(kind, namespace, name)
        deleted, missing = await self._delete_refs([ref], grace_period)
        if missing:
            raise NotFound(ref.not_found())
        return deleted[0]

    async def delete_objects(
        self, refs: Sequence[ObjectRef | ApiObject], *, grace_period: int | None = None
    ) -> tuple[builtins.list[ApiObject], builtins.list[ObjectRef]]:
        """Delete every existing object in one transaction; returns (deleted objects, refs not found)."""
        wanted = [self._normalized_ref(r if isinstance(r, ObjectRef) else ObjectRef.of(r)) for r in refs]
        return await self._delete_refs(wanted, grace_period)

    async def _delete_refs(
        self, refs: Sequence[ObjectRef], grace_period: int | None = None
    ) -> tuple[builtins.list[ApiObject], builtins.list[ObjectRef]]:
        for ref in refs:
            if _is_default_namespace(ref):
                raise MembraneError('namespaces "default" is forbidden: this namespace may not be deleted')
        for _ in range(MAX_ATTEMPTS):
            plan = _Plan()
            deleted: builtins.list[ApiObject] = []
            missing: builtins.list[ObjectRef] = []
            for ref in refs:
                key = ref_key(ref)
                if key in plan.compares:
                    continue
                kv = await self.store.get(key)
                if kv is None:
                    missing.append(ref)
                    continue
                plan.compare(key, kv)
                obj = decode(kv)
                if isinstance(obj, k8s.Pod) and (grace := pod_grace_period(obj, grace_period)) > 0:
                    marked = self._terminating(obj, grace)
                    if marked is not None:
                        plan.ops.append(Put(key, encode(marked)))
                    deleted.append(marked or obj)
                    continue
                plan.ops.append(Delete(key))
                deleted.append(obj)
                if ref.kind == "Namespace":
                    await self._plan_namespace_contents(ref.name, plan)
            if not plan.ops:
                return deleted, missing
            txn = await self.store.txn([Compare(k, r) for k, r in plan.compares.items()], plan.ops)
            if txn.succeeded:
                return deleted, missing
        raise CompareFailed("delete lost the race for the store too many times; try again")

    def _terminating(self, pod: k8s.Pod, grace: int) -> k8s.Pod | None:
        """The pod marked for deletion in ``grace`` seconds; None when already marked for no later."""
        current = pod.metadata.deletionGracePeriodSeconds
        if pod.metadata.deletionTimestamp and current is not None and current <= grace:
            return None  # a second delete may shorten the grace period, never lengthen it
        deadline = datetime.strptime(self._clock(), _RFC3339).replace(tzinfo=UTC) + timedelta(seconds=grace)
        if pod.metadata.deletionTimestamp and pod.metadata.deletionTimestamp < deadline.strftime(_RFC3339):
            deadline = datetime.strptime(pod.metadata.deletionTimestamp, _RFC3339).replace(tzinfo=UTC)
        return _with_meta(pod, deletionTimestamp=deadline.strftime(_RFC3339), deletionGracePeriodSeconds=grace,
                          resourceVersion=None)

    async def finish_deletion(self, kind: str, namespace: str | None, name: str, uid: str) -> bool:
        """Remove an object marked for deletion once whoever had to stop it has (a node, for its
        Pods). Only the object of that ``uid``, and only while it is marked: a pod created again
        under the same name is left alone. True if it is gone."""
        ref = self._ref(kind, namespace, name)
        key = ref_key(ref)
        for _ in range(MAX_ATTEMPTS):
            kv = await self.store.get(key)
            if kv is None:
                return True
            obj = decode(kv)
            if obj.metadata.uid != uid or not obj.metadata.deletionTimestamp:
                return False
            if (await self.store.txn([Compare(key, kv.mod_revision)], [Delete(key)])).succeeded:
                return True
        raise CompareFailed(f"{ref}: removal lost the race for the store too many times")

    async def _plan_namespace_contents(self, namespace: str, plan: _Plan) -> None:
        for info in KINDS:
            if not info.namespaced:
                continue
            kvs, _ = await self.store.list(keys.objects_prefix(info.plural, namespace))
            for kv in kvs:
                if kv.key not in plan.compares:
                    plan.compare(kv.key, kv)
                    plan.ops.append(Delete(kv.key))

    # -- helpers

    def _ref(self, kind: str, namespace: str | None, name: str) -> ObjectRef:
        return self._normalized_ref(ObjectRef(lookup_kind(kind).kind, namespace, name))

    @staticmethod
    def _normalized_ref(ref: ObjectRef) -> ObjectRef:
        info: KindInfo = ref.info
        if info.namespaced:
            return ObjectRef(ref.kind, ref.namespace or DEFAULT_NAMESPACE, ref.name)
        return ObjectRef(ref.kind, None, ref.name)
