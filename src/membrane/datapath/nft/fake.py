"""An in-memory :class:`~membrane.datapath.nft.runner.NftRunner` for tests without root.

Primitive: :class:`FakeNftRunner`. It records every transaction (structured and rendered) and keeps
the table as the kernel would after applying them: the current :class:`Ruleset`, with elements, is in
``ruleset`` for assertions and for a packet tracer. It refuses what nf_tables refuses for the
operations used here (deleting an element that is not there, adding a map key with another value,
touching a set that does not exist) and, like the kernel, applies a transaction whole or not at all.
"""

from __future__ import annotations

from dataclasses import replace

from membrane.core.errors import DatapathError
from membrane.datapath.nft.objects import Map, Ruleset, Set, TableContents
from membrane.datapath.nft.render import render_transaction
from membrane.datapath.nft.transaction import AddElements, DeleteElements, ReplaceTable, Transaction

ENOENT = "Could not process rule: No such file or directory"
EEXIST = "Could not process rule: File exists"


class FakeNftRunner:
    def __init__(self) -> None:
        self.ruleset: Ruleset | None = None
        self.applied: list[Transaction] = []  # transactions that took effect, in order
        self.attempts: list[Transaction] = []  # every apply() call, including refused ones
        self._failures: list[DatapathError] = []

    def fail_next(self, message: str = "nft: Error: injected failure", times: int = 1) -> None:
        """The next ``times`` apply() calls fail with ``message`` and change nothing."""
        self._failures += [DatapathError(message)] * times

    @property
    def texts(self) -> list[str]:
        """The ``nft -f`` input of every applied transaction."""
        return [render_transaction(tx) for tx in self.applied]

    def delete_table(self) -> None:
        """Someone else removed the table (``nft flush ruleset``)."""
        self.ruleset = None

    async def apply(self, transaction: Transaction) -> None:
        self.attempts.append(transaction)
        if self._failures:
            raise self._failures.pop(0)
        state = self.ruleset
        for op in transaction.ops:
            if isinstance(op, ReplaceTable):
                state = op.ruleset
            else:
                if state is None or (state.family, state.table) != (transaction.family, transaction.table):
                    raise DatapathError(f"nft: Error: {ENOENT} (table {transaction.family} {transaction.table})")
                state = _apply_elements(state, op)
        self.ruleset = state
        self.applied.append(transaction)

    async def read_table(self, family: str, table: str) -> TableContents | None:
        if self.ruleset is None or (self.ruleset.family, self.ruleset.table) != (family, table):
            return None
        return self.ruleset.contents()


def _apply_elements(state: Ruleset, op: AddElements | DeleteElements) -> Ruleset:
    sets = {s.name: s for s in state.sets}
    maps = {m.name: m for m in state.maps}
    if op.name in sets:
        sets[op.name] = _set_op(sets[op.name], op)
    elif op.name in maps:
        maps[op.name] = _map_op(maps[op.name], op)
    else:
        raise DatapathError(f"nft: Error: {ENOENT} (set {op.name})")
    return replace(state, sets=tuple(sets[s.name] for s in state.sets), maps=tuple(maps[m.name] for m in state.maps))


def _set_op(s: Set, op: AddElements | DeleteElements) -> Set:
    if isinstance(op, DeleteElements):
        missing = [k for k in op.keys if k not in s.elements]
        if missing:
            raise DatapathError(f"nft: Error: {ENOENT} (element {' . '.join(missing[0])} of {s.name})")
        return replace(s, elements=s.elements - set(op.keys))
    if any(e.value is not None for e in op.elements):
        raise DatapathError(f"nft: Error: set {s.name} takes no values")
    # "add element" of a key already in a set is a no-op for nf_tables.
    return replace(s, elements=s.elements | {e.key for e in op.elements})


def _map_op(m: Map, op: AddElements | DeleteElements) -> Map:
    mapping = m.mapping()
    if isinstance(op, DeleteElements):
        for k in op.keys:
            if k not in mapping:
                raise DatapathError(f"nft: Error: {ENOENT} (element {' . '.join(k)} of {m.name})")
            del mapping[k]
    else:
        for e in op.elements:
            if e.value is None:
                raise DatapathError(f"nft: Error: map {m.name} needs a value for {' . '.join(e.key)}")
            if e.key in mapping and mapping[e.key] != e.value:
                raise DatapathError(f"nft: Error: {EEXIST} (element {' . '.join(e.key)} of {m.name})")
            mapping[e.key] = e.value
    return replace(m, elements=tuple(mapping.items()))
