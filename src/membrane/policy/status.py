"""Policy status: what the agents write into ``status`` of the policy objects they import (pure).

CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy (a NetworkPolicy has no status):

- ``status.conditions[type=Valid]``: ``True`` (reason ``Valid``), ``True`` with reason
  ``Unsupported`` and a message naming the L7 rules (the traffic they select is denied: there is
  no L7 proxy yet) and the parts that select nothing yet (fail closed), or ``False`` (reason
  ``Invalid``) when the policy cannot be imported (it is then not enforced); written identically
  by every node, so concurrent writers converge;
- ``status.nodes[<node>]``: this node's import — ``ok``, ``error``, ``enforcing`` (the policy
  selects at least one endpoint on this node, so its rules are in this node's kernel),
  ``localPolicyRevision`` (the agent's policy revision when it imported the current spec) and
  ``lastUpdated``. Written only when one of those changes, never on every recompilation.

Primitives: :data:`STATUS_KINDS`, :func:`valid_condition`, :func:`desired_status`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from membrane.api.meta import Condition
from membrane.policy.compiler import ImportedPolicy

#: Kinds whose objects carry a status the agents write.
STATUS_KINDS = ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy")


def valid_condition(policy: ImportedPolicy) -> Condition:
    """``Valid``: imported (with the unsupported parts named: L7 rules, whose traffic is denied, and
    peers that select nothing yet), or why not."""
    if not policy.ok:
        return Condition(type="Valid", status="False", reason="Invalid", message=policy.error,
                         observedGeneration=policy.generation or None)
    if policy.unsupported or policy.l7:
        parts = []
        if policy.l7:
            parts.append(", ".join(policy.l7) + ": L7 rules are not enforced yet; the traffic they select is denied")
        if policy.unsupported:
            parts.append("not enforced yet, selects nothing: " + "; ".join(policy.unsupported))
        message = ". ".join(parts)
        return Condition(type="Valid", status="True", reason="Unsupported", message=message[:500],
                         observedGeneration=policy.generation or None)
    return Condition(type="Valid", status="True", reason="Valid", message="Policy validation succeeded",
                     observedGeneration=policy.generation or None)


def desired_status(
    current: Mapping[str, Any] | None, policy: ImportedPolicy, node: str, enforcing: bool, revision: int, now: str
) -> dict[str, Any]:
    """The object's new status: the Valid condition and this node's entry, everything else kept.
    Times change only when what they date changes, so an unchanged status is byte-identical."""
    status = dict(current or {})
    valid = valid_condition(policy).model_dump(mode="json", exclude_none=True)
    conditions = [dict(c) for c in status.get("conditions") or () if c.get("type") != "Valid"]
    old_valid = next((c for c in status.get("conditions") or () if c.get("type") == "Valid"), None)
    same = old_valid is not None and all(old_valid.get(k) == valid.get(k) for k in ("status", "reason", "message"))
    valid["lastTransitionTime"] = old_valid.get("lastTransitionTime", now) if same and old_valid else now
    status["conditions"] = [valid, *conditions]
    entry: dict[str, Any] = {"ok": policy.ok, "enforcing": enforcing and policy.ok, "localPolicyRevision": revision}
    if policy.error:
        entry["error"] = policy.error
    nodes = dict(status.get("nodes") or {})
    old = nodes.get(node) or {}
    if {k: v for k, v in old.items() if k != "lastUpdated"} != entry:
        entry["lastUpdated"] = now
    else:
        entry["lastUpdated"] = old.get("lastUpdated", now)
    nodes[node] = entry
    status["nodes"] = nodes
    return status
