"""Transactions against the owned table, and how to plan one from what the table holds.

Primitives: the operations :class:`ReplaceTable`, :class:`AddChain`, :class:`FlushChain`,
:class:`DeleteChain`, :class:`AddRules`, :class:`AddSet`, :class:`DeleteSet`, :class:`AddElements`,
:class:`DeleteElements`; the :class:`Transaction` holding them (always one ``nft -f`` batch, so
nf_tables commits it whole or not at all); and the planners :func:`full_sync`, :func:`element_sync`,
:func:`plan_sync` and :func:`plan_changes`.

- A **full sync** is one transaction ``table T`` + ``delete table T`` + ``table T { … }``. The
  first line makes the delete valid when the table does not exist yet; nf_tables commits the whole
  batch as one generation, so packets see either the old table or the new one, never an empty or
  missing table. Used only when nothing is known about the table: on start, after an error, or
  when the table is gone.
- An **incremental sync** touches only what changed, in an order nf_tables accepts within one batch
  (a chain or set cannot be deleted while a rule or a verdict map element refers to it):

  1. declare new chains, then add new sets and maps with their elements;
  2. flush every chain whose rules change, that is re-created or removed, and every other chain
     referring to a chain or set that is re-created (its rules come back in step 5);
  3. delete elements (also verdict map elements jumping to a re-created chain);
  4. delete and re-declare re-created chains (hook, priority, policy or comment changed) and
     re-created sets and maps (type, flags or comment changed), the latter with their elements;
  5. add the rules of new, re-created and flushed chains;
  6. add elements (after deletes, so a map key whose value changed is deleted and re-added);
  7. delete removed sets and maps, then removed chains (all flushed, no longer referred to).

  When only elements change this reduces to deletes, then adds (an **element sync**).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from membrane.datapath.nft.objects import (
    BaseChain,
    Chain,
    Declaration,
    Key,
    Map,
    Rule,
    Ruleset,
    Set,
    declaration_of,
    referenced_chains,
    referenced_sets,
    sort_keys,
)


@dataclass(frozen=True)
class Element:
    key: Key
    value: str | None = None  # maps only


@dataclass(frozen=True)
class ReplaceTable:
    ruleset: Ruleset


@dataclass(frozen=True)
class AddChain:
    """Declare a chain (hook and comment; no rules): ``add chain``."""

    chain: Chain


@dataclass(frozen=True)
class FlushChain:
    name: str


@dataclass(frozen=True)
class DeleteChain:
    name: str


@dataclass(frozen=True)
class AddRules:
    """Append rules to a chain: one ``add rule`` each, in order."""

    chain: str
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class AddSet:
    """Declare a set or map with its elements: ``add set`` / ``add map``."""

    data: Set | Map


@dataclass(frozen=True)
class DeleteSet:
    name: str
    is_map: bool = False


@dataclass(frozen=True)
class AddElements:
    name: str
    elements: tuple[Element, ...]


@dataclass(frozen=True)
class DeleteElements:
    name: str
    keys: tuple[Key, ...]


Op = (
    ReplaceTable
    | AddChain
    | FlushChain
    | DeleteChain
    | AddRules
    | AddSet
    | DeleteSet
    | AddElements
    | DeleteElements
)
StructuralOp = AddChain | FlushChain | DeleteChain | AddRules | AddSet | DeleteSet


@dataclass(frozen=True)
class Transaction:
    family: str
    table: str
    ops: tuple[Op, ...]

    @property
    def full(self) -> bool:
        return any(isinstance(op, ReplaceTable) for op in self.ops)

    @property
    def structural(self) -> bool:
        """Touches chains, rules or set declarations (not only elements), without replacing the table."""
        return not self.full and any(isinstance(op, StructuralOp) for op in self.ops)

    @property
    def changed(self) -> tuple[str, ...]:
        """Names of the chains, sets and maps whose declaration or rules this transaction touches."""
        names: list[str] = []
        for op in self.ops:
            if isinstance(op, AddChain):
                names.append(op.chain.name)
            elif isinstance(op, AddSet):
                names.append(op.data.name)
            elif isinstance(op, FlushChain | DeleteChain | DeleteSet):
                names.append(op.name)
            elif isinstance(op, AddRules):
                names.append(op.chain)
        return tuple(sorted(set(names)))

    @property
    def added(self) -> int:
        return sum(len(op.elements) for op in self.ops if isinstance(op, AddElements))

    @property
    def deleted(self) -> int:
        return sum(len(op.keys) for op in self.ops if isinstance(op, DeleteElements))


def full_sync(desired: Ruleset) -> Transaction:
    return Transaction(family=desired.family, table=desired.table, ops=(ReplaceTable(desired),))


# -- incremental planning -------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainState:
    """A chain as the table holds it. ``rules_current``: its rules are exactly those of the desired
    chain of that name (False when there is none). ``comment`` None: not known (the kernel does not
    report chain comments in JSON), so it is not compared."""

    base: BaseChain | None
    rules_current: bool
    comment: str | None = None


@dataclass(frozen=True)
class SetState:
    """A set or map as the table holds it: declaration and elements (a set's keys map to None)."""

    declaration: Declaration
    elements: Mapping[Key, str | None]


@dataclass(frozen=True)
class TableState:
    chains: Mapping[str, ChainState]
    sets: Mapping[str, SetState]


def _elements(data: Set | Map) -> Mapping[Key, str | None]:
    if isinstance(data, Map):
        return data.element_mapping()
    return dict.fromkeys(data.elements)


def state_of(applied: Ruleset, desired: Ruleset) -> TableState:
    """The table as ``applied`` left it, described against ``desired``."""
    wanted = {c.name: c for c in desired.chains}
    chains = {
        c.name: ChainState(c.base, c.name in wanted and wanted[c.name].rules == c.rules, c.comment)
        for c in applied.chains
    }
    sets = {d.name: SetState(declaration_of(d), _elements(d)) for d in applied.data()}
    return TableState(chains, sets)


def _jumps_to(value: str | None, chains: frozenset[str]) -> bool:
    # Most passes re-create no chain: then no verdict of any map needs parsing.
    return bool(chains) and value is not None and bool(referenced_chains(value) & chains)


def _element_ops(
    name: str, before: Mapping[Key, str | None], after: Mapping[Key, str | None], stale: frozenset[str]
) -> tuple[DeleteElements | None, AddElements | None]:
    # A changed value is a delete plus an add: nft refuses to add over an existing key. So is a
    # verdict jumping to a chain that is re-created: the element must let go of the old chain.
    if not stale and (before is after or before == after):
        return None, None
    if stale:
        gone = [k for k, v in before.items() if k not in after or after[k] != v or _jumps_to(v, stale)]
        new = [k for k, v in after.items() if k not in before or before[k] != v or _jumps_to(v, stale)]
    else:
        # Set differences run in C: the ipcache holds an element per cluster endpoint and a
        # change moves a few.
        gone = [k for k, _ in before.items() - after.items()]
        new = [k for k, _ in after.items() - before.items()]
    delete = DeleteElements(name, tuple(sort_keys(gone))) if gone else None
    add = AddElements(name, tuple(Element(k, after[k]) for k in sort_keys(new))) if new else None
    return delete, add


def plan_changes(current: TableState, desired: Ruleset) -> Transaction | None:
    """The chain-granular transaction turning the table ``current`` describes into ``desired``
    (None: nothing to do). The table itself must exist."""
    wanted = {c.name: c for c in desired.chains}
    wanted_data = {d.name: d for d in desired.data()}

    new_chains = [c for c in desired.chains if c.name not in current.chains]
    recreated_chains = []
    changed_chains = []
    for c in desired.chains:
        state = current.chains.get(c.name)
        if state is None:
            continue
        if state.base != c.base or (state.comment is not None and state.comment != c.comment):
            recreated_chains.append(c)
        elif not state.rules_current:
            changed_chains.append(c)
    removed_chains = sorted(n for n in current.chains if n not in wanted)

    new_data = [d for d in wanted_data.values() if d.name not in current.sets]
    recreated_data = [
        d
        for d in wanted_data.values()
        if d.name in current.sets and current.sets[d.name].declaration != declaration_of(d)
    ]
    removed_data = sorted(n for n in current.sets if n not in wanted_data)

    recreated_chain_names = frozenset(c.name for c in recreated_chains)
    recreated_data_names = frozenset(d.name for d in recreated_data)
    touched = {c.name for c in (*recreated_chains, *changed_chains)} | set(removed_chains)
    # Chains kept as they are but referring to something re-created: flushed and refilled.
    referrers = [
        c
        for c in desired.chains
        if (recreated_chain_names or recreated_data_names)  # else no rule needs parsing
        and c.name in current.chains
        and c.name not in touched
        and any(
            referenced_chains(r.text) & recreated_chain_names or referenced_sets(r.text) & recreated_data_names
            for r in c.rules
        )
    ]
    refilled = [c for c in desired.chains if c.name in {x.name for x in (*changed_chains, *referrers)}]

    element_deletes: list[Op] = []
    element_adds: list[Op] = []
    for d in wanted_data.values():
        if "dynamic" in d.flags:
            continue  # the datapath adds and expires these elements itself (session affinity)
        if d.name in current.sets and d.name not in recreated_data_names:
            delete, add = _element_ops(d.name, current.sets[d.name].elements, _elements(d), recreated_chain_names)
            if delete is not None:
                element_deletes.append(delete)
            if add is not None:
                element_adds.append(add)
    for name in removed_data:
        # A map about to go may still jump to a chain re-created before it goes.
        doomed = [k for k, v in current.sets[name].elements.items() if _jumps_to(v, recreated_chain_names)]
        if doomed:
            element_deletes.append(DeleteElements(name, tuple(sort_keys(doomed))))

    ops: list[Op] = []
    ops += [AddChain(c) for c in new_chains]
    ops += [AddSet(d) for d in new_data]
    flushed = [c.name for c in (*recreated_chains, *refilled)] + removed_chains
    ops += [FlushChain(n) for n in flushed]
    ops += element_deletes
    ops += [DeleteChain(c.name) for c in recreated_chains]
    ops += [DeleteSet(d.name, isinstance(d, Map)) for d in recreated_data]
    ops += [AddChain(c) for c in recreated_chains]
    ops += [AddSet(d) for d in recreated_data]
    filled = {c.name for c in (*new_chains, *recreated_chains, *refilled)}
    ops += [AddRules(c.name, c.rules) for c in desired.chains if c.name in filled and c.rules]
    ops += element_adds
    ops += [DeleteSet(n, current.sets[n].declaration.is_map) for n in removed_data]
    ops += [DeleteChain(n) for n in removed_chains]
    if not ops:
        return None
    return Transaction(family=desired.family, table=desired.table, ops=tuple(ops))


def element_sync(applied: Ruleset, desired: Ruleset) -> Transaction:
    """Element adds/deletes turning ``applied`` into ``desired``; both must have the same structure."""
    if applied.structure() != desired.structure():
        raise ValueError("element_sync needs rulesets with the same chains and set declarations")
    tx = plan_changes(state_of(applied, desired), desired)
    return tx if tx is not None else Transaction(family=desired.family, table=desired.table, ops=())


def plan_sync(applied: Ruleset | None, desired: Ruleset) -> Transaction | None:
    """The smallest transaction from ``applied`` (None: unknown) to ``desired``; None if nothing to do.

    Unknown state, another table, or a changed table comment mean a full sync; otherwise only the
    chains, sets and elements that differ are touched.
    """
    if (
        applied is None
        or (applied.family, applied.table) != (desired.family, desired.table)
        or applied.comment != desired.comment
    ):
        return full_sync(desired)
    if applied == desired:
        return None
    return plan_changes(state_of(applied, desired), desired)
