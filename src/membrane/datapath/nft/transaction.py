"""Transactions against the owned table, and how to plan one from what was last applied.

Primitives: the operations :class:`ReplaceTable`, :class:`AddElements`, :class:`DeleteElements`; the
:class:`Transaction` holding them; and the planners :func:`full_sync`, :func:`element_sync` and
:func:`plan_sync`.

- A **full sync** is one transaction ``table T`` + ``delete table T`` + ``table T { … }``. The
  first line makes the delete valid when the table does not exist yet; nf_tables commits the whole
  batch as one generation, so packets see either the old table or the new one, never an empty or
  missing table. It also removes chains and sets that are no longer wanted. Used on start, after an
  error, and whenever chains or set declarations change.
- A **partial sync** changes set/map elements only, computed as the difference between the element
  cache (the ruleset last applied) and the desired ruleset: deletes first, then adds, so a map key
  whose value changed is deleted and re-added in the same transaction.
"""

from __future__ import annotations

from dataclasses import dataclass

from membrane.datapath.nft.objects import Key, Ruleset, sort_keys


@dataclass(frozen=True)
class Element:
    key: Key
    value: str | None = None  # maps only


@dataclass(frozen=True)
class ReplaceTable:
    ruleset: Ruleset


@dataclass(frozen=True)
class AddElements:
    name: str
    elements: tuple[Element, ...]


@dataclass(frozen=True)
class DeleteElements:
    name: str
    keys: tuple[Key, ...]


Op = ReplaceTable | AddElements | DeleteElements


@dataclass(frozen=True)
class Transaction:
    family: str
    table: str
    ops: tuple[Op, ...]

    @property
    def full(self) -> bool:
        return any(isinstance(op, ReplaceTable) for op in self.ops)

    @property
    def added(self) -> int:
        return sum(len(op.elements) for op in self.ops if isinstance(op, AddElements))

    @property
    def deleted(self) -> int:
        return sum(len(op.keys) for op in self.ops if isinstance(op, DeleteElements))


def full_sync(desired: Ruleset) -> Transaction:
    return Transaction(family=desired.family, table=desired.table, ops=(ReplaceTable(desired),))


def element_sync(applied: Ruleset, desired: Ruleset) -> Transaction:
    """Element adds/deletes turning ``applied`` into ``desired``; both must have the same structure."""
    if applied.structure() != desired.structure():
        raise ValueError("element_sync needs rulesets with the same chains and set declarations")
    deletes: list[Op] = []
    adds: list[Op] = []
    for old_set, new_set in zip(applied.sets, desired.sets, strict=True):
        gone = old_set.elements - new_set.elements
        new = new_set.elements - old_set.elements
        if gone:
            deletes.append(DeleteElements(old_set.name, tuple(sort_keys(gone))))
        if new:
            adds.append(AddElements(new_set.name, tuple(Element(k) for k in sort_keys(new))))
    for old_map, new_map in zip(applied.maps, desired.maps, strict=True):
        before, after = old_map.mapping(), new_map.mapping()
        # A changed value is a delete plus an add: nft refuses to add over an existing key.
        gone_keys = [k for k, v in before.items() if after.get(k) != v]
        new_keys = [k for k, v in after.items() if before.get(k) != v]
        if gone_keys:
            deletes.append(DeleteElements(old_map.name, tuple(sort_keys(gone_keys))))
        if new_keys:
            adds.append(AddElements(new_map.name, tuple(Element(k, after[k]) for k in sort_keys(new_keys))))
    return Transaction(family=desired.family, table=desired.table, ops=(*deletes, *adds))


def plan_sync(applied: Ruleset | None, desired: Ruleset) -> Transaction | None:
    """The smallest transaction from ``applied`` (None: unknown) to ``desired``; None if nothing to do."""
    if applied is None or applied.structure() != desired.structure():
        return full_sync(desired)
    if applied == desired:
        return None
    return element_sync(applied, desired)
