"""Selectors over security identities, and the cache of what each one selects.

Policy speaks in label selectors; the datapath speaks in numeric identities. This module is the
bridge, with Cilium's label semantics:

- a requirement key carries a label source (``k8s:app``, ``reserved:host``, ``cidr:…``); a key
  without one is ``any:`` and matches the label from every source;
- the empty selector selects every identity (the policy layer turns it into the wildcard ANY);
- reserved identities carry ``reserved:<name>`` labels, CIDR identities ``cidr:<prefix>`` plus
  ``reserved:world``.

Primitives:

- :class:`Requirement`, :class:`Selector` (ANDed requirements over identity labels),
  :class:`CIDRSelector` (a prefix minus exceptions, matched by prefix containment) and
  :data:`PeerSelector`, the union of the two;
- :class:`AddressBlock` -- a Kubernetes ``ipBlock``: matched against addresses, not identities;
- :class:`SelectorCache` -- the identity table plus the selection of every registered selector,
  updated incrementally as identities appear and disappear (:meth:`SelectorCache.update`
  returns the :class:`SelectionChange` of every selector it touched); it is the one mutable
  object of the policy engine and carries a ``revision``;
- identity tables: :func:`reserved_identity_labels`, :func:`cidr_identity_labels`,
  :func:`allocate_cidr_identities` (stable local identities 16777217+ for policy prefixes).

CIDR identities and the ipcache: every prefix a policy names gets a local identity, the ipcache
maps the prefix to it, and the longest prefix wins. A CIDR selector ``P except E…`` selects the
identities whose prefix lies inside ``P`` and inside no ``E`` (the world identity counts as
``0.0.0.0/0``). Because every ``P`` and ``E`` is in the ipcache, an address resolves to a selected
identity exactly when it lies in ``P`` minus the exceptions. Pod and node addresses resolve to
their own identities (their /32s are more specific), so CIDR rules never match them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from typing import Literal, TypeVar

from membrane.core.ids import stable_ids
from membrane.identity.labels import Label
from membrane.identity.reserved import MIN_LOCAL_IDENTITY, RESERVED, WORLD

Operator = Literal["In", "NotIn", "Exists", "DoesNotExist"]

ANY_SOURCE = "any"
SOURCE_CIDR = "cidr"
SOURCE_RESERVED = "reserved"
WORLD_PREFIX = IPv4Network("0.0.0.0/0")


# --- label views ----------------------------------------------------------------------------------------


class _LabelView:
    """One identity's labels, indexed for requirement checks (per source and across sources)."""

    __slots__ = ("any", "exact")

    def __init__(self, labels: Iterable[Label]) -> None:
        self.exact: dict[tuple[str, str], str] = {}
        self.any: dict[str, set[str]] = {}
        for label in labels:
            self.exact[(label.source, label.key)] = label.value
            self.any.setdefault(label.key, set()).add(label.value)

    def values(self, source: str, key: str) -> set[str]:
        if source == ANY_SOURCE:
            return self.any.get(key, set())
        value = self.exact.get((source, key))
        return set() if value is None else {value}


# --- selectors ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class Requirement:
    """One condition on a label: ``source:key`` with a Kubernetes selector operator."""

    source: str
    key: str
    operator: Operator
    values: tuple[str, ...] = ()
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        values = tuple(sorted(set(self.values)))
        object.__setattr__(self, "values", values)
        # Selectors are dict keys on every lookup of the compiler: hash once.
        object.__setattr__(self, "_hash", hash((self.source, self.key, self.operator, values)))

    def __hash__(self) -> int:
        return self._hash

    def matches_view(self, view: _LabelView) -> bool:
        present = view.values(self.source, self.key)
        if self.operator == "In":
            return not present.isdisjoint(self.values)
        if self.operator == "NotIn":
            return present.isdisjoint(self.values)
        if self.operator == "Exists":
            return bool(present)
        return not present

    @property
    def qualified_key(self) -> str:
        return f"{self.source}:{self.key}"

    def __str__(self) -> str:
        key = self.qualified_key
        if self.operator == "In" and len(self.values) == 1:
            return f"{key}={self.values[0]}"
        if self.operator == "In":
            return f"{key} in ({','.join(self.values)})"
        if self.operator == "NotIn":
            return f"{key} notin ({','.join(self.values)})"
        if self.operator == "Exists":
            return key
        return f"!{key}"


@dataclass(frozen=True, slots=True)
class Selector:
    """An endpoint selector over identity labels; the requirements are ANDed. Empty = every identity."""

    requirements: tuple[Requirement, ...] = ()
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        requirements = tuple(sorted(set(self.requirements)))
        object.__setattr__(self, "requirements", requirements)
        object.__setattr__(self, "_hash", hash(requirements))

    def __hash__(self) -> int:
        return self._hash

    @property
    def is_wildcard(self) -> bool:
        return not self.requirements

    def matches(self, labels: Iterable[Label]) -> bool:
        view = labels if isinstance(labels, _LabelView) else _LabelView(labels)
        return all(req.matches_view(view) for req in self.requirements)

    def has_key(self, source: str, key: str) -> bool:
        return any(r.source == source and r.key == key for r in self.requirements)

    def has_source(self, source: str) -> bool:
        return any(r.source == source for r in self.requirements)

    def and_(self, *requirements: Requirement) -> Selector:
        return Selector(self.requirements + tuple(requirements))

    def __str__(self) -> str:
        if not self.requirements:
            return "{}"
        return ",".join(str(r) for r in self.requirements)


def match_label(source: str, key: str, value: str) -> Requirement:
    return Requirement(source, key, "In", (value,))


@dataclass(frozen=True, slots=True)
class CIDRSelector:
    """Addresses in ``prefix`` but in none of ``excepts``; selects world and CIDR identities only."""

    prefix: IPv4Network
    excepts: tuple[IPv4Network, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "excepts", tuple(sorted(set(self.excepts))))

    def contains(self, prefix: IPv4Network) -> bool:
        """Whether every address of ``prefix`` is selected."""
        if not prefix.subnet_of(self.prefix):
            return False
        return not any(prefix.subnet_of(e) for e in self.excepts)

    @property
    def prefixes(self) -> tuple[IPv4Network, ...]:
        """Every prefix this selector needs in the ipcache (the prefix and its exceptions)."""
        return (self.prefix, *self.excepts)

    def __str__(self) -> str:
        if not self.excepts:
            return f"cidr:{self.prefix}"
        return f"cidr:{self.prefix} except {','.join(str(e) for e in self.excepts)}"


PeerSelector = Selector | CIDRSelector


@dataclass(frozen=True, slots=True)
class AddressBlock:
    """A Kubernetes ``ipBlock`` peer: addresses in ``prefix`` but in none of ``excepts``, matched
    against the peer's *address* (pods, nodes and the outside alike), not against an identity.
    ``path`` is where it sits in its section entry (``to[1].ipBlock``)."""

    prefix: IPv4Network
    excepts: tuple[IPv4Network, ...] = ()
    path: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "excepts", tuple(sorted(set(self.excepts))))

    def ranges(self) -> tuple[tuple[int, int], ...]:
        """The block as disjoint, sorted inclusive ranges of integer addresses (the exceptions cut out)."""
        low, high = int(self.prefix.network_address), int(self.prefix.broadcast_address)
        cuts = sorted((int(e.network_address), int(e.broadcast_address)) for e in self.excepts)
        found: list[tuple[int, int]] = []
        cursor = low
        for cut_low, cut_high in cuts:
            if cut_high < cursor:
                continue  # inside an exception already cut
            if cut_low > cursor:
                found.append((cursor, min(cut_low - 1, high)))
            cursor = max(cursor, cut_high + 1)
            if cursor > high:
                break
        if cursor <= high:
            found.append((cursor, high))
        return tuple(found)

    def contains(self, address: int) -> bool:
        return any(low <= address <= high for low, high in self.ranges())

    def __str__(self) -> str:
        if not self.excepts:
            return f"ipBlock:{self.prefix}"
        return f"ipBlock:{self.prefix} except {','.join(str(e) for e in self.excepts)}"

WILDCARD = Selector()


# --- identity tables ------------------------------------------------------------------------------------


def reserved_identity_labels() -> dict[int, frozenset[Label]]:
    """The reserved identities (host, world, ...) with their ``reserved:<name>`` labels."""
    return {r.id: r.labels for r in RESERVED}


def cidr_identity_labels(prefix: IPv4Network) -> frozenset[Label]:
    """The labels of the local identity of a policy prefix (as Cilium: ``cidr:<prefix>`` + world)."""
    return frozenset({Label(SOURCE_CIDR, str(prefix)), Label(SOURCE_RESERVED, WORLD.name)})


def allocate_cidr_identities(
    prefixes: Iterable[IPv4Network], previous: Mapping[IPv4Network, int] | None = None
) -> dict[IPv4Network, int]:
    """A local identity for every prefix, keeping the numbers of ``previous`` stable.

    ``0.0.0.0/0`` is the world identity and gets none. New prefixes take the lowest free numbers
    from 16777217 on, in prefix order, so the result is deterministic.
    """
    wanted = sorted({p for p in prefixes if p.prefixlen > 0})
    return stable_ids(wanted, previous or {}, first=MIN_LOCAL_IDENTITY)


def _identity_prefix(identity: int, labels: Iterable[Label]) -> IPv4Network | None:
    """The prefix a CIDR identity stands for; the world identity stands for 0.0.0.0/0."""
    is_world = False
    for label in labels:
        if label.source == SOURCE_CIDR:
            try:
                return IPv4Network(label.key)
            except ValueError:
                return None  # an IPv6 prefix: IPv4 selectors never contain it
        if label.source == SOURCE_RESERVED and label.key in (WORLD.name, "world-ipv4"):
            is_world = True
    return WORLD_PREFIX if is_world or identity == WORLD.id else None


# --- the cache ----------------------------------------------------------------------------------------

K = TypeVar("K")


def _discard(index: dict[K, set[int]], key: K, identity: int) -> None:
    ids = index.get(key)
    if ids is not None:
        ids.discard(identity)
        if not ids:
            del index[key]


@dataclass(frozen=True, slots=True)
class SelectionChange:
    added: frozenset[int] = frozenset()
    removed: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class SelectionChanges:
    """What one update changed: the selection delta of every affected selector."""

    revision: int
    selectors: Mapping[PeerSelector, SelectionChange] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.selectors)


class SelectorCache:
    """The identity table and, for every registered selector, the identities it selects.

    Selections are computed from inverted label indexes (one set intersection per requirement,
    never a scan over all identities per selector), kept as frozensets, and maintained
    incrementally: a new identity is checked against each registered selector once; a removed
    one is dropped from the selections that held it. ``revision`` grows with every change.
    """

    def __init__(self, identities: Mapping[int, Iterable[Label]] | None = None) -> None:
        self.revision = 0
        self._labels: dict[int, frozenset[Label]] = {}
        self._views: dict[int, _LabelView] = {}
        self._exact: dict[tuple[str, str, str], set[int]] = {}
        self._any: dict[tuple[str, str], set[int]] = {}
        self._key_exact: dict[tuple[str, str], set[int]] = {}
        self._key_any: dict[str, set[int]] = {}
        self._prefixes: dict[int, IPv4Network] = {}
        self._all: set[int] = set()
        self._selections: dict[PeerSelector, frozenset[int]] = {}
        for identity, labels in (identities or {}).items():
            self._index(identity, frozenset(labels))

    # -- identities ------------------------------------------------------------------------------------

    @property
    def identities(self) -> Mapping[int, frozenset[Label]]:
        return self._labels

    def labels_of(self, identity: int) -> frozenset[Label] | None:
        return self._labels.get(identity)

    def prefix_of(self, identity: int) -> IPv4Network | None:
        return self._prefixes.get(identity)

    def _index(self, identity: int, labels: frozenset[Label]) -> None:
        self._labels[identity] = labels
        self._views.pop(identity, None)  # built on demand, for incremental matching only
        self._all.add(identity)
        for label in labels:
            self._exact.setdefault((label.source, label.key, label.value), set()).add(identity)
            self._any.setdefault((label.key, label.value), set()).add(identity)
            self._key_exact.setdefault((label.source, label.key), set()).add(identity)
            self._key_any.setdefault(label.key, set()).add(identity)
        prefix = _identity_prefix(identity, labels)
        if prefix is not None:
            self._prefixes[identity] = prefix

    def _unindex(self, identity: int) -> None:
        labels = self._labels.pop(identity)
        self._views.pop(identity, None)
        self._all.discard(identity)
        self._prefixes.pop(identity, None)
        for label in labels:
            _discard(self._exact, (label.source, label.key, label.value), identity)
            _discard(self._any, (label.key, label.value), identity)
            _discard(self._key_exact, (label.source, label.key), identity)
            _discard(self._key_any, label.key, identity)

    def update(
        self, added: Mapping[int, Iterable[Label]] | None = None, removed: Iterable[int] = ()
    ) -> SelectionChanges:
        """Add (or relabel) and remove identities; returns how every affected selection changed."""
        before: dict[PeerSelector, frozenset[int]] = {}
        touched: set[int] = set()
        for identity in removed:
            if identity in self._labels:
                self._unindex(identity)
                touched.add(identity)
        for identity, labels in (added or {}).items():
            frozen = frozenset(labels)
            if self._labels.get(identity) == frozen:
                continue
            if identity in self._labels:
                self._unindex(identity)
            self._index(identity, frozen)
            touched.add(identity)
        if not touched:
            return SelectionChanges(self.revision)
        self.revision += 1
        for selector, selection in self._selections.items():
            keep = {i for i in touched if i in self._labels and self._matches_identity(selector, i)}
            new = (selection - touched) | keep
            if new != selection:
                before[selector] = selection
                self._selections[selector] = frozenset(new)
        changes = {
            sel: SelectionChange(
                added=frozenset(self._selections[sel] - old), removed=frozenset(old - self._selections[sel])
            )
            for sel, old in before.items()
        }
        return SelectionChanges(self.revision, changes)

    # -- selections -----------------------------------------------------------------------------------

    def select(self, selector: PeerSelector) -> frozenset[int]:
        """The identities ``selector`` selects now; the selector stays registered for updates."""
        selection = self._selections.get(selector)
        if selection is None:
            selection = frozenset(self._evaluate(selector))
            self._selections[selector] = selection
        return selection

    def selections(self) -> Mapping[PeerSelector, frozenset[int]]:
        return self._selections

    def retain(self, selectors: Iterable[PeerSelector]) -> None:
        """Forget every registered selector not in ``selectors`` (after policies went away)."""
        keep = set(selectors)
        for selector in [s for s in self._selections if s not in keep]:
            del self._selections[selector]

    def _matches_identity(self, selector: PeerSelector, identity: int) -> bool:
        if isinstance(selector, CIDRSelector):
            prefix = self._prefixes.get(identity)
            return prefix is not None and selector.contains(prefix)
        view = self._views.get(identity)
        if view is None:
            view = self._views[identity] = _LabelView(self._labels[identity])
        return all(req.matches_view(view) for req in selector.requirements)

    def _requirement_ids(self, req: Requirement) -> set[int]:
        """The identities having ``key`` (Exists/DoesNotExist) or ``key`` in values (In/NotIn)."""
        if req.operator in ("Exists", "DoesNotExist"):
            if req.source == ANY_SOURCE:
                return self._key_any.get(req.key, set())
            return self._key_exact.get((req.source, req.key), set())
        found: set[int] = set()
        for value in req.values:
            if req.source == ANY_SOURCE:
                found |= self._any.get((req.key, value), set())
            else:
                found |= self._exact.get((req.source, req.key, value), set())
        return found

    def _evaluate(self, selector: PeerSelector) -> set[int]:
        if isinstance(selector, CIDRSelector):
            return {i for i, p in self._prefixes.items() if selector.contains(p)}
        positive = [self._requirement_ids(r) for r in selector.requirements if r.operator in ("In", "Exists")]
        negative = [self._requirement_ids(r) for r in selector.requirements if r.operator in ("NotIn", "DoesNotExist")]
        if positive:
            positive.sort(key=len)
            result = set(positive[0])
            for ids in positive[1:]:
                result &= ids
                if not result:
                    return result
        else:
            result = set(self._all)
        for ids in negative:
            result -= ids
        return result
