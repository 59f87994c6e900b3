"""An in-memory :class:`~membrane.datapath.nft.runner.NftRunner` for tests without root.

Primitive: :class:`FakeNftRunner`. It records every transaction (structured and rendered) and keeps
the table as the kernel would after applying them: the current :class:`Ruleset`, with elements, is in
``ruleset`` for assertions and for a packet tracer. Like the kernel it applies a transaction whole or
not at all, and it refuses what nf_tables (measured with nft 1.0.6) refuses for the operations used
here: a missing table, chain or set (ENOENT); deleting an element that is not there (ENOENT); adding
a map key with another value or re-declaring a set differently (EEXIST); deleting a chain a rule or
a verdict map element still jumps to, or a set a rule still refers to (EBUSY); changing a chain's
hook, type or priority in place (EOPNOTSUPP; its policy may change). ``add chain`` of an existing
chain and ``add set`` of an identical set are no-ops, as in nft. Not modelled: jump loops (the
kernel refuses them with EMLINK) and rule syntax.
"""

from __future__ import annotations

from dataclasses import replace

from membrane.core.errors import DatapathError
from membrane.datapath.nft.objects import (
    Chain,
    Map,
    Rule,
    Ruleset,
    Set,
    TableContents,
    declaration_of,
    referenced_chains,
    referenced_sets,
)
from membrane.datapath.nft.render import render_transaction
from membrane.datapath.nft.transaction import (
    AddChain,
    AddElements,
    AddRules,
    AddSet,
    DeleteChain,
    DeleteElements,
    DeleteSet,
    Element,
    FlushChain,
    ReplaceTable,
    Transaction,
)

ENOENT = "Could not process rule: No such file or directory"
EEXIST = "Could not process rule: File exists"
EBUSY = "Could not process rule: Device or resource busy"
EOPNOTSUPP = "Could not process rule: Operation not supported"


def _refuse(reason: str, what: str) -> DatapathError:
    return DatapathError(f"nft: Error: {reason} ({what})")


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
                continue
            if state is None or (state.family, state.table) != (transaction.family, transaction.table):
                raise _refuse(ENOENT, f"table {transaction.family} {transaction.table}")
            table = _Table(state)
            table.apply(op)
            state = table.ruleset()
        self.ruleset = state
        self.applied.append(transaction)

    async def read_table(self, family: str, table: str) -> TableContents | None:
        if self.ruleset is None or (self.ruleset.family, self.ruleset.table) != (family, table):
            return None
        return self.ruleset.contents()


class _Table:
    """One table being changed by one operation; refuses like nf_tables."""

    def __init__(self, state: Ruleset) -> None:
        self._state = state
        self.chains: dict[str, Chain] = {c.name: c for c in state.chains}
        self.data: dict[str, Set | Map] = {d.name: d for d in state.data()}

    def ruleset(self) -> Ruleset:
        try:
            return replace(
                self._state,
                chains=tuple(self.chains.values()),
                sets=tuple(d for d in self.data.values() if isinstance(d, Set)),
                maps=tuple(d for d in self.data.values() if isinstance(d, Map)),
            )
        except ValueError as exc:  # a state the checks above should have refused
            raise DatapathError(f"nft: Error: {exc}") from None

    def _chain(self, name: str) -> Chain:
        if name not in self.chains:
            raise _refuse(ENOENT, f"chain {name}")
        return self.chains[name]

    def apply(self, op: object) -> None:
        if isinstance(op, AddChain):
            self._add_chain(op.chain)
        elif isinstance(op, FlushChain):
            self.chains[op.name] = replace(self._chain(op.name), rules=())
        elif isinstance(op, DeleteChain):
            self._chain(op.name)
            users = [c.name for c in self.chains.values() for r in c.rules if op.name in referenced_chains(r.text)]
            users += [
                d.name for d in self.data.values() if isinstance(d, Map)
                for _, v in d.elements if op.name in referenced_chains(v)
            ]
            if users:
                raise _refuse(EBUSY, f"chain {op.name} is used by {users[0]}")
            del self.chains[op.name]
        elif isinstance(op, AddRules):
            self._add_rules(op.chain, op.rules)
        elif isinstance(op, AddSet):
            self._add_set(op.data)
        elif isinstance(op, DeleteSet):
            self._delete_set(op.name, op.is_map)
        elif isinstance(op, AddElements | DeleteElements):
            if op.name not in self.data:
                raise _refuse(ENOENT, f"set {op.name}")
            d = self.data[op.name]
            self.data[op.name] = _set_op(d, op) if isinstance(d, Set) else _map_op(d, op)
        else:
            raise TypeError(f"unknown operation {op!r}")

    def _add_chain(self, chain: Chain) -> None:
        old = self.chains.get(chain.name)
        if old is None:
            self.chains[chain.name] = replace(chain, rules=())
            return
        def hook(c: Chain) -> tuple[str, str, int] | None:
            return None if c.base is None else (c.base.type, c.base.hook, c.base.priority)

        same_hook = hook(old) == hook(chain)
        if not same_hook:
            raise _refuse(EOPNOTSUPP, f"chain {chain.name} exists with another hook")
        # nft updates a base chain's policy in place and keeps the old comment.
        self.chains[chain.name] = replace(old, base=chain.base)

    def _add_rules(self, name: str, rules: tuple[Rule, ...]) -> None:
        chain = self._chain(name)
        for rule in rules:
            for ref in referenced_sets(rule.text):
                if ref not in self.data:
                    raise _refuse(ENOENT, f"set {ref}")
            for ref in referenced_chains(rule.text):
                if ref not in self.chains:
                    raise _refuse(ENOENT, f"chain {ref}")
        self.chains[name] = replace(chain, rules=(*chain.rules, *rules))

    def _add_set(self, data: Set | Map) -> None:
        old = self.data.get(data.name)
        if isinstance(data, Map):
            for _, value in data.elements:
                for ref in referenced_chains(value):
                    if ref not in self.chains:
                        raise _refuse(ENOENT, f"chain {ref}")
        if old is None:
            self.data[data.name] = data
            return
        if declaration_of(old) != declaration_of(data):
            raise _refuse(EEXIST, f"set {data.name} exists with another declaration")
        # "add set" of an existing set adds its elements, like "add element".
        if isinstance(data, Map):
            added = tuple(Element(k, v) for k, v in data.elements)
        else:
            added = tuple(Element(k) for k in data.elements)
        if added:
            self.apply(AddElements(data.name, added))

    def _delete_set(self, name: str, is_map: bool) -> None:
        # nft deletes a map with "delete set" too (measured); "delete map" of a set works as well.
        del is_map
        if name not in self.data:
            raise _refuse(ENOENT, f"set {name}")
        users = [c.name for c in self.chains.values() for r in c.rules if name in referenced_sets(r.text)]
        if users:
            raise _refuse(EBUSY, f"set {name} is used by chain {users[0]}")
        del self.data[name]


def _set_op(s: Set, op: AddElements | DeleteElements) -> Set:
    if isinstance(op, DeleteElements):
        missing = [k for k in op.keys if k not in s.elements]
        if missing:
            raise _refuse(ENOENT, f"element {' . '.join(missing[0])} of {s.name}")
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
                raise _refuse(ENOENT, f"element {' . '.join(k)} of {m.name}")
            del mapping[k]
    else:
        for e in op.elements:
            if e.value is None:
                raise DatapathError(f"nft: Error: map {m.name} needs a value for {' . '.join(e.key)}")
            if e.key in mapping and mapping[e.key] != e.value:
                raise _refuse(EEXIST, f"element {' . '.join(e.key)} of {m.name}")
            mapping[e.key] = e.value
    return replace(m, elements=tuple(mapping.items()))
