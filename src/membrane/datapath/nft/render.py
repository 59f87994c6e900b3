"""Render rulesets and transactions to ``nft -f`` text.

Primitives: :func:`render_table` (one ``table … { … }`` block) and :func:`render_transaction` (the
whole input of one ``nft -f -`` call). Output is deterministic — declaration order for chains, sets
and maps; elements sorted numerically — so it can be compared with golden files.
"""

from __future__ import annotations

from collections.abc import Iterable

from membrane.datapath.nft.objects import Chain, Key, Map, Rule, Ruleset, Set, sort_keys
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

INDENT = "\t"


def _key(element_key: Key) -> str:
    return " . ".join(element_key)


def _element(element: Element) -> str:
    return _key(element.key) if element.value is None else f"{_key(element.key)} : {element.value}"


def _quote(text: str) -> str:
    return '"' + text.replace('"', "'") + '"'


def _elements_block(items: list[str]) -> list[str]:
    if not items:
        return []
    body = [f"{INDENT * 3}{item}," for item in items]
    return [f"{INDENT * 2}elements = {{", *body, f"{INDENT * 2}}}"]


def _set(s: Set) -> list[str]:
    lines = [f"{INDENT}set {s.name} {{", f"{INDENT * 2}type {' . '.join(s.type)}"]
    if s.flags:
        lines.append(f"{INDENT * 2}flags {', '.join(s.flags)}")
    if s.comment:
        lines.append(f"{INDENT * 2}comment {_quote(s.comment)}")
    lines += _elements_block([_key(k) for k in sort_keys(s.elements)])
    return [*lines, f"{INDENT}}}"]


def _map_type(m: Map) -> str:
    """``type KEY : VALUE``, or ``typeof …`` for a key only an expression can name."""
    return f"typeof {m.typeof}" if m.typeof else f"type {' . '.join(m.type)} : {m.value_type}"


def _map(m: Map) -> list[str]:
    lines = [f"{INDENT}map {m.name} {{", f"{INDENT * 2}{_map_type(m)}"]
    if m.flags:
        lines.append(f"{INDENT * 2}flags {', '.join(m.flags)}")
    if m.comment:
        lines.append(f"{INDENT * 2}comment {_quote(m.comment)}")
    lines += _elements_block([f"{_key(k)} : {v}" for k, v in m.elements])
    return [*lines, f"{INDENT}}}"]


def _rule(rule: Rule) -> str:
    suffix = f" comment {_quote(rule.comment)}" if rule.comment else ""
    return f"{rule.text}{suffix}"


def _chain(c: Chain) -> list[str]:
    lines = [f"{INDENT}chain {c.name} {{"]
    if c.base is not None:
        b = c.base
        lines.append(f"{INDENT * 2}type {b.type} hook {b.hook} priority {b.render_priority()}; policy {b.policy};")
    if c.comment:
        lines.append(f"{INDENT * 2}comment {_quote(c.comment)}")
    lines += [f"{INDENT * 2}{_rule(rule)}" for rule in c.rules]
    return [*lines, f"{INDENT}}}"]


def render_table(ruleset: Ruleset) -> str:
    """``table FAMILY NAME { … }``: sets and maps first, then chains (nft resolves references
    within one batch, the order is for the reader)."""
    blocks: list[list[str]] = []
    if ruleset.comment:
        blocks.append([f"{INDENT}comment {_quote(ruleset.comment)}"])
    blocks += [_set(s) for s in ruleset.sets]
    blocks += [_map(m) for m in ruleset.maps]
    blocks += [_chain(c) for c in ruleset.chains]
    body: list[str] = []
    for i, block in enumerate(blocks):
        if i:
            body.append("")
        body += block
    return "\n".join([f"table {ruleset.family} {ruleset.table} {{", *body, "}"]) + "\n"


def _element_list(items: Iterable[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def _chain_declaration(c: Chain) -> str:
    parts = []
    if c.base is not None:
        b = c.base
        parts.append(f"type {b.type} hook {b.hook} priority {b.render_priority()}; policy {b.policy};")
    if c.comment:
        parts.append(f"comment {_quote(c.comment)};")
    return " { " + " ".join(parts) + " }" if parts else ""


def _set_declaration(d: Set | Map) -> str:
    if isinstance(d, Map):
        parts = [f"{_map_type(d)};"]
        items = [f"{_key(k)} : {v}" for k, v in d.elements]
    else:
        parts = [f"type {' . '.join(d.type)};"]
        items = [_key(k) for k in sort_keys(d.elements)]
    if d.flags:
        parts.append(f"flags {', '.join(d.flags)};")
    if d.comment:
        parts.append(f"comment {_quote(d.comment)};")
    if items:
        parts.append(f"elements = {_element_list(items)};")
    return " { " + " ".join(parts) + " }"


def render_transaction(tx: Transaction) -> str:
    target = f"{tx.family} {tx.table}"
    lines: list[str] = []
    for op in tx.ops:
        if isinstance(op, ReplaceTable):
            # "table" first so that "delete table" cannot fail on a missing table; one batch.
            lines += [f"table {target}", f"delete table {target}", render_table(op.ruleset).rstrip("\n")]
        elif isinstance(op, AddChain):
            lines.append(f"add chain {target} {op.chain.name}{_chain_declaration(op.chain)}")
        elif isinstance(op, FlushChain):
            lines.append(f"flush chain {target} {op.name}")
        elif isinstance(op, DeleteChain):
            lines.append(f"delete chain {target} {op.name}")
        elif isinstance(op, AddRules):
            lines += [f"add rule {target} {op.chain} {_rule(rule)}" for rule in op.rules]
        elif isinstance(op, AddSet):
            kind = "map" if isinstance(op.data, Map) else "set"
            lines.append(f"add {kind} {target} {op.data.name}{_set_declaration(op.data)}")
        elif isinstance(op, DeleteSet):
            lines.append(f"delete {'map' if op.is_map else 'set'} {target} {op.name}")
        elif isinstance(op, DeleteElements):
            lines.append(f"delete element {target} {op.name} {_element_list(_key(k) for k in op.keys)}")
        else:
            assert isinstance(op, AddElements)
            lines.append(f"add element {target} {op.name} {_element_list(_element(e) for e in op.elements)}")
    return "\n".join(lines) + "\n"
