"""The agent's policy controller: intent → compiled policy → the datapath's policy elements, and
policy status written back to the policy objects.

    intent: policy objects · identities · every node's endpoint records · pods · CiliumNodes
        │  PolicyCompiler (membrane.policy.compiler: pure, incremental)
        ▼
    per local endpoint: EndpointPolicy           the ipcache intervals (IpcacheBuilder)
        │  policy_datapath(records): PolicyRenderer / render_policy (membrane.datapath.policy)
        ▼
    PolicyDatapath: pol_in / pol_out / enforced_* / audited_* / ipcache elements ──▶ NodeDatapath.sync

:class:`PolicyController` is the agent's loop: woken by the intent's reflectors, it waits a short
debounce so bursts of changes (a namespace of pods, an ``apply -f`` of many policies) cost one
recompilation and one nft transaction, then hands the new state to the datapath (an element-only
sync) and writes status back in the background (:func:`membrane.policy.status.desired_status`).

Primitives: :class:`PolicyController`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from membrane.api.endpoint import EndpointRecord
from membrane.api.meta import ApiObject
from membrane.core.errors import InvalidInput, NotFound
from membrane.datapath.policy import PolicyRenderer, render_policy
from membrane.datapath.ruleset import PolicyDatapath
from membrane.identity.labels import parse_labels
from membrane.policy.compiler import ImportedPolicy, IpcacheBuilder, PolicyCompiler, policy_endpoint
from membrane.policy.mapstate import EnforcementConfig
from membrane.policy.status import STATUS_KINDS, desired_status
from membrane.store.objects import now_rfc3339

log = logging.getLogger(__name__)


# --- the controller ------------------------------------------------------------------------------------


StatusWriter = Callable[[str, str | None, str, Callable[[ApiObject], Any]], Awaitable[Any]]


class PolicyController:
    """Keeps this node's policy current: recompiles on wake-ups (debounced), asks the datapath to
    sync, and writes policy status back.

    ``intent`` is the agent's :class:`~membrane.agent.intent.Intent` (read: ``policies``,
    ``identities``, ``endpoints``, ``pods``, ``nodes``). ``sync_datapath`` re-renders the datapath,
    which calls :meth:`policy_datapath`; ``write_status`` is ``ObjectClient.modify_status`` (None:
    no status writes).
    """

    def __init__(
        self,
        intent: Any,
        node_name: str,
        *,
        cluster_name: str = "default",
        config: EnforcementConfig | None = None,
        sync_datapath: Callable[[], Awaitable[None]] | None = None,
        write_status: StatusWriter | None = None,
        wake: asyncio.Event | None = None,
        debounce: float = 0.02,
    ) -> None:
        self.intent = intent
        self.node_name = node_name
        self.compiler = PolicyCompiler(cluster_name=cluster_name, config=config)
        self.renderer = PolicyRenderer()
        self.wake = wake or asyncio.Event()
        self._sync_datapath = sync_datapath
        self._write_status = write_status
        self._debounce = debounce
        self._status_wake = asyncio.Event()
        self._written: dict[str, tuple[str, bool, int]] = {}  # key -> (body, enforcing, revision) written
        self._enforcing: dict[str, bool] = {}
        self._ipcache = IpcacheBuilder(node_name)
        self.last_compile = 0.0
        self.syncs = 0
        #: Store revision of each intent prefix that the last completed datapath sync reflects.
        self.synced_revisions: dict[str, int] = dict(getattr(intent, "revisions", {}))

    # -- computing -------------------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Take the intent as it is now; True when the datapath needs a new rendering."""
        intent = self.intent
        records = list(intent.endpoints.values())
        started = time.perf_counter()
        changed = self.compiler.update(intent.policies, intent.identities, records, intent.pods)
        if changed:
            self.last_compile = time.perf_counter() - started
        return changed

    def policy_datapath(self, records: Iterable[EndpointRecord]) -> PolicyDatapath:
        """The ruleset's policy inputs for this node's (ready) endpoint records. Records the intent
        has not caught up with yet (an endpoint added a moment ago) are included as given."""
        local = [r for r in records if r.host_ifindex]
        pods = self.intent.pods
        endpoints = [(policy_endpoint(r, pods), parse_labels(r.labels)) for r in local]
        policies = self.compiler.endpoint_policies(endpoints)
        by_ifindex = {r.host_ifindex: policies[f"{r.namespace}/{r.pod}"] for r in local}
        self.renderer.forget(set(by_ifindex))
        # The ipcache covers every node's endpoints (and local records the intent has not seen yet).
        cluster = self.intent.endpoints
        if any(cluster.get(r.key) is not r for r in local):
            cluster = {**cluster, **{r.key: r for r in local}}
        ipcache = self._ipcache.intervals(cluster, self.intent.nodes, self.compiler.compiled.cidr_identities)
        selecting: dict[str, bool] = {}
        for policy in policies.values():
            for origin in (*policy.ingress.selected_by, *policy.egress.selected_by):
                selecting[_origin_key(origin.kind, origin.namespace, origin.name)] = True
        if selecting != self._enforcing:
            self._enforcing = selecting
            self._status_wake.set()
        return render_policy(by_ifindex, ipcache, self.renderer)

    def status(self) -> dict[str, Any]:
        imported = self.compiler.imported.values()
        return {
            "revision": self.compiler.revision,
            "policies": sum(p.ok for p in imported),
            "invalid": sum(not p.ok for p in imported),
            "rules": len(self.compiler.rules),
            "lastCompileSeconds": round(self.last_compile, 4),
            "syncs": self.syncs,
            # prefix -> store revision the kernel reflects (per prefix: a reflector delivers in order)
            "syncedRevisions": self.synced_revisions,
        }

    # -- the loop --------------------------------------------------------------------------------------

    async def run(self) -> None:
        writer = asyncio.ensure_future(self._status_loop()) if self._write_status is not None else None
        try:
            while True:
                await self.wake.wait()
                # Debounce: let a burst of reflector batches land, then recompute once.
                await asyncio.sleep(self._debounce)
                self.wake.clear()
                seen = dict(getattr(self.intent, "revisions", {}))
                changed = self.refresh()
                # Also when no verdict changed: endpoints or nodes may have moved the ipcache. An
                # unchanged rendering costs no nft call.
                if self._sync_datapath is not None:
                    await self._sync_datapath()
                    self.syncs += 1
                self.synced_revisions = seen
                if changed:
                    self._status_wake.set()  # after the sync: status reports what the kernel holds
        finally:
            if writer is not None:
                writer.cancel()

    async def _status_loop(self) -> None:
        while True:
            await self._status_wake.wait()
            self._status_wake.clear()
            try:
                await self.write_statuses()
            except Exception as exc:  # a store hiccup must not end status reporting: retry
                log.warning("writing policy status failed (retrying in 1 s): %s", exc)
                await asyncio.sleep(1.0)
                self._status_wake.set()

    async def write_statuses(self) -> int:
        """Write this node's status into every policy object whose entry changed; returns how many."""
        assert self._write_status is not None
        written = 0
        for key, policy in list(self.compiler.imported.items()):
            if policy.kind not in STATUS_KINDS:
                continue
            enforcing = self._enforcing.get(_origin_key(policy.kind, policy.namespace, policy.name), False)
            revision = self.compiler.imported_at.get(key, self.compiler.revision)
            state = (policy.body, enforcing, revision)
            if self._written.get(key) == state:
                continue
            now = now_rfc3339()

            def compute(obj: ApiObject, policy: ImportedPolicy = policy, enforcing: bool = enforcing,
                        revision: int = revision, now: str = now) -> dict[str, Any]:
                current = getattr(obj, "status", None)
                data = current.model_dump(mode="json", exclude_none=True) if current is not None else None
                return desired_status(data, policy, self.node_name, enforcing, revision, now)

            try:
                await self._write_status(policy.kind, policy.namespace or None, policy.name, compute)
            except NotFound:
                continue  # deleted meanwhile
            except InvalidInput as exc:
                # The stored object itself does not validate (written around the API): its status
                # cannot be written either; say so once, not on every retry.
                log.warning("cannot write the status of %s %s: %s", policy.kind, policy.name, exc)
            self._written[key] = state
            written += 1
        for key in [k for k in self._written if k not in self.compiler.imported]:
            del self._written[key]
        return written


def _origin_key(kind: str, namespace: str, name: str) -> str:
    return f"{kind}/{namespace}/{name}"
