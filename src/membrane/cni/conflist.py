"""The CNI network configuration list that attaches containers to membrane.

membrane-cni creates the container's interface, so it comes first; chained plugins (``portmap``
for ``-p`` port mappings, ``tuning``) follow it and receive its result as ``prevResult``.

Primitives: :func:`membrane_conflist`, :data:`PORTMAP`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# The reference portmap plugin: runtimes pass ``-p`` mappings through the capability.
PORTMAP: Mapping[str, Any] = {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}


def membrane_conflist(
    name: str,
    *,
    agent_socket: str | Path,
    del_queue_dir: str | Path,
    cni_version: str = "1.0.0",
    chained: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """A conflist with membrane-cni first, then ``chained`` plugins (portmap, tuning ...)."""
    return {
        "cniVersion": cni_version,
        "name": name,
        "plugins": [
            {
                "type": "membrane-cni",
                "agentSocket": str(agent_socket),
                "delQueueDir": str(del_queue_dir),
            },
            *[dict(p) for p in chained],
        ],
    }
