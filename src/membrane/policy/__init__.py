"""The policy engine, pure: policies → rules → selector cache → per-endpoint map state (typed verdicts).

Modules, in the order data flows through them (see ``docs/policy.md``):

- :mod:`membrane.policy.rules` -- NetworkPolicy / CNP / CCNP normalized into :class:`PolicyRule`
  tagged with their :class:`RuleOrigin`;
- :mod:`membrane.policy.selectors` -- :class:`Selector`, :class:`CIDRSelector` and the incremental
  :class:`SelectorCache` (selector → identities), CIDR identities;
- :mod:`membrane.policy.mapstate` -- per endpoint and direction: default deny, audit, entries with
  deny precedence, flattening into disjoint boxes with typed :class:`Verdict` s;
- :mod:`membrane.policy.ipcache` -- the ipcache as disjoint intervals;
- :mod:`membrane.policy.trace` -- ``membrane policy trace``: verdicts and deciding rules, as text;
- :mod:`membrane.policy.engine` -- :func:`compile_policies`, the whole chain in one call;
- :mod:`membrane.policy.reachability` -- truth tables in the style of the Kubernetes e2e suite, with
  pluggable probes (engine, rendered elements, or real traffic).
- :mod:`membrane.policy.compiler` -- :class:`~membrane.policy.compiler.PolicyCompiler`: stored policy
  objects, identities and endpoint records → endpoint policies, incrementally; the ipcache table;
- :mod:`membrane.policy.status` -- the ``Valid`` condition and per-node status of policy objects.

Nothing here knows nft: the datapath's policy renderer writes the typed output as map elements.
"""

from membrane.core.protocols import PROTOCOLS
from membrane.policy.engine import CompiledPolicy, compile_policies, identity_table, policy_prefixes
from membrane.policy.ipcache import (
    IpcacheInterval,
    flatten_ipcache,
    lookup_identity,
    with_cidr_identities,
)
from membrane.policy.mapstate import (
    AddressEntry,
    DirectionPolicy,
    EndpointPolicy,
    EnforcementConfig,
    FlatAddressEntry,
    FlatEntry,
    MapEntry,
    Match,
    PolicyEndpoint,
    PolicyRepository,
    ServiceInfo,
    Verdict,
    compute_endpoint_policy,
    compute_policies,
    flatten_address_entries,
    flatten_entries,
    named_ports_of,
)
from membrane.policy.rules import PolicyRule, RuleOrigin, normalize, normalize_all
from membrane.policy.selectors import (
    AddressBlock,
    CIDRSelector,
    Requirement,
    SelectionChanges,
    Selector,
    SelectorCache,
    allocate_cidr_identities,
    cidr_identity_labels,
    reserved_identity_labels,
)
from membrane.policy.trace import (
    PolicyTrace,
    ServiceTrace,
    TracePeer,
    format_service_trace,
    format_trace,
    parse_port,
    resolve_peer,
    trace,
    trace_service,
)

__all__ = [
    "PROTOCOLS",
    "AddressBlock",
    "AddressEntry",
    "CIDRSelector",
    "CompiledPolicy",
    "DirectionPolicy",
    "EndpointPolicy",
    "EnforcementConfig",
    "FlatAddressEntry",
    "FlatEntry",
    "IpcacheInterval",
    "MapEntry",
    "Match",
    "PolicyEndpoint",
    "PolicyRepository",
    "PolicyRule",
    "PolicyTrace",
    "Requirement",
    "RuleOrigin",
    "SelectionChanges",
    "Selector",
    "SelectorCache",
    "ServiceInfo",
    "ServiceTrace",
    "TracePeer",
    "Verdict",
    "allocate_cidr_identities",
    "cidr_identity_labels",
    "compile_policies",
    "compute_endpoint_policy",
    "compute_policies",
    "flatten_address_entries",
    "flatten_entries",
    "flatten_ipcache",
    "format_service_trace",
    "format_trace",
    "identity_table",
    "lookup_identity",
    "named_ports_of",
    "normalize",
    "normalize_all",
    "parse_port",
    "policy_prefixes",
    "reserved_identity_labels",
    "resolve_peer",
    "trace",
    "trace_service",
    "with_cidr_identities",
]
