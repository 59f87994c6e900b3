"""The policy engine in one call: policies + identities + endpoints → compiled policy (pure).

:func:`compile_policies` is the composition the agent runs whenever policies, identities or local
endpoints change::

    policy objects ──normalize──▶ rules ──prefixes──▶ CIDR identities (stable numbers)
                                    │                        │
    identities (store) + reserved + CIDR identities ──▶ SelectorCache
                                    │
    local endpoints ──────▶ per-endpoint map state (ingress, egress) ──▶ nft elements

Its result also feeds the ipcache (:attr:`CompiledPolicy.cidr_identities` →
:func:`membrane.policy.ipcache.with_cidr_identities`) and ``membrane policy trace``.

Primitives: :class:`CompiledPolicy`, :func:`compile_policies`, :func:`policy_prefixes`,
:func:`identity_table`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network

from membrane.api.meta import ApiObject
from membrane.identity.labels import Label
from membrane.policy.mapstate import (
    EndpointPolicy,
    EnforcementConfig,
    NamedPorts,
    PolicyEndpoint,
    PolicyRepository,
    ServiceInfo,
    compute_policies,
)
from membrane.policy.rules import PolicyRule, normalize_all
from membrane.policy.selectors import (
    CIDRSelector,
    SelectorCache,
    allocate_cidr_identities,
    cidr_identity_labels,
    reserved_identity_labels,
)


def policy_prefixes(rules: Iterable[PolicyRule]) -> frozenset[IPv4Network]:
    """Every prefix the rules name (CIDRs and their exceptions): each needs an ipcache entry."""
    return frozenset(
        prefix for rule in rules for peer in rule.peers if isinstance(peer, CIDRSelector) for prefix in peer.prefixes
    )


def identity_table(
    identities: Mapping[int, Iterable[Label]], cidr_identities: Mapping[IPv4Network, int]
) -> dict[int, frozenset[Label]]:
    """Reserved identities, the given (cluster) identities and the CIDR identities, by number."""
    table = reserved_identity_labels()
    table.update((identity, frozenset(labels)) for identity, labels in identities.items())
    table.update((identity, cidr_identity_labels(prefix)) for prefix, identity in cidr_identities.items())
    return table


@dataclass(frozen=True)
class CompiledPolicy:
    rules: tuple[PolicyRule, ...]
    repository: PolicyRepository
    cache: SelectorCache
    cidr_identities: Mapping[IPv4Network, int]
    endpoints: Mapping[str, EndpointPolicy]
    config: EnforcementConfig


def compile_policies(
    policies: Iterable[ApiObject] | Iterable[PolicyRule],
    identities: Mapping[int, Iterable[Label]],
    endpoints: Iterable[PolicyEndpoint],
    *,
    config: EnforcementConfig | None = None,
    named_ports_by_identity: Mapping[int, NamedPorts] | None = None,
    services: Iterable[ServiceInfo] = (),
    cluster_name: str = "default",
    previous_cidr_identities: Mapping[IPv4Network, int] | None = None,
) -> CompiledPolicy:
    """Normalize the policies (or take rules already normalized), allocate CIDR identities
    (keeping ``previous_cidr_identities`` numbers), build the selector cache and compute the
    policy of every endpoint."""
    items = list(policies)
    rules = tuple(i for i in items if isinstance(i, PolicyRule))
    rules += normalize_all((i for i in items if isinstance(i, ApiObject)), cluster_name)
    cidr = allocate_cidr_identities(policy_prefixes(rules), previous_cidr_identities)
    cache = SelectorCache(identity_table(identities, cidr))
    repository = PolicyRepository(rules)
    config = config or EnforcementConfig()
    computed = compute_policies(
        endpoints,
        repository,
        cache,
        config,
        named_ports_by_identity=named_ports_by_identity,
        services=services,
    )
    return CompiledPolicy(rules, repository, cache, cidr, computed, config)
