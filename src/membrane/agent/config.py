"""The agent's configuration: per node, from flags and ``--config FILE``.

``AgentConfig`` composes the settings of each part the agent runs (``hubble``: the observer's;
``cluster``: what the first agent writes to the store for every node).

Primitives: :class:`AgentConfig`, :func:`load_agent_config`.
"""

from __future__ import annotations

import socket
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from membrane.core.config import DEFAULT_RUN_DIR, DEFAULT_STATE_DIR, ClusterConfig
from membrane.core.errors import InvalidInput
from membrane.observe.config import HubbleConfig


class AgentConfig(BaseModel):
    """Settings of one node's agent."""

    model_config = ConfigDict(extra="forbid")

    nodeName: str = Field(default_factory=socket.gethostname)
    store: str = f"sqlite://{DEFAULT_STATE_DIR}/store.db"
    stateDir: Path = DEFAULT_STATE_DIR
    runDir: Path = DEFAULT_RUN_DIR
    # Names of the network namespaces the built-in pod runner creates start with this.
    netnsPrefix: str = "membrane-"
    # Pod interface MTU; 0 derives it from the node's uplink (minus tunnel overhead).
    mtu: int = Field(default=0, ge=0, le=65535)
    # The node's own address on the underlay; empty picks the address of the default route's device.
    nodeIP: str = ""
    # Device facing the underlay; empty picks the default route's device.
    device: str = ""
    heartbeatTTL: float = Field(default=10.0, gt=0)
    # Every reconciler (nft table, endpoint wiring, peer routes, policy status) reads the kernel or
    # the store back this often and repairs what drifted (Cilium's reconciler full sync).
    resyncInterval: float = Field(default=60.0, gt=0, le=3600)
    hubble: HubbleConfig = Field(default_factory=HubbleConfig)
    # Settings the first agent of a cluster writes to the store.
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @property
    def api_socket(self) -> Path:
        return self.runDir / "agent.sock"

    @property
    def cni_queue_dir(self) -> Path:
        return self.runDir / "cni-del-queue"


def load_agent_config(path: Path | None, **overrides: object) -> AgentConfig:
    """Read ``--config FILE`` (YAML) and apply command-line overrides; InvalidInput names the field."""
    data: dict[str, object] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise InvalidInput([f"{path}: {exc}"]) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise InvalidInput([f"{path}: expected a mapping of settings"])
        data.update(loaded or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        source = str(path) if path else "agent config"
        raise InvalidInput(
            [f"{source}: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()]
        ) from None
