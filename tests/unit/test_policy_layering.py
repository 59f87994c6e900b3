"""The policy engine, compiler and status are pure: importing them loads nothing of the store, the
agent, the CLI or the datapath (which renders the engine's typed verdicts as nft elements)."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import membrane.policy, membrane.policy.compiler, membrane.policy.status, membrane.policy.reachability
import membrane.identity.ipcache, membrane.identity.labels, membrane.ipam.pool
layers = ("membrane.store", "membrane.agent", "membrane.cli", "membrane.datapath")
print(sorted(m for m in sys.modules if m.startswith(layers)))
"""


def test_the_policy_layer_loads_no_store_agent_cli_or_datapath() -> None:
    # A fresh interpreter: this test process has long imported everything.
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
