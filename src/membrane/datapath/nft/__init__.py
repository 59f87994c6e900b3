"""nftables: objects as data, rendering, transactions, and the runner boundary (real and fake).

Everything the agent programs lives in one table it owns (``inet membrane``); see
:mod:`membrane.datapath.ruleset` for what goes in it.
"""

from membrane.datapath.nft.fake import FakeNftRunner
from membrane.datapath.nft.objects import (
    PRIORITY_DSTNAT,
    PRIORITY_FILTER,
    PRIORITY_MANGLE,
    PRIORITY_RAW,
    PRIORITY_SRCNAT,
    BaseChain,
    Chain,
    Key,
    Map,
    Rule,
    Ruleset,
    Set,
    TableContents,
    key,
    token,
)
from membrane.datapath.nft.render import render_table, render_transaction
from membrane.datapath.nft.runner import NftCommand, NftRunner, parse_table_json
from membrane.datapath.nft.transaction import (
    AddElements,
    DeleteElements,
    Element,
    ReplaceTable,
    Transaction,
    element_sync,
    full_sync,
    plan_sync,
)

__all__ = [
    "PRIORITY_DSTNAT",
    "PRIORITY_FILTER",
    "PRIORITY_MANGLE",
    "PRIORITY_RAW",
    "PRIORITY_SRCNAT",
    "AddElements",
    "BaseChain",
    "Chain",
    "DeleteElements",
    "Element",
    "FakeNftRunner",
    "Key",
    "Map",
    "NftCommand",
    "NftRunner",
    "ReplaceTable",
    "Rule",
    "Ruleset",
    "Set",
    "TableContents",
    "Transaction",
    "element_sync",
    "full_sync",
    "key",
    "parse_table_json",
    "plan_sync",
    "render_table",
    "render_transaction",
    "token",
]
