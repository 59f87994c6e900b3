"""Agent settings: defaults, YAML files, and one-line errors naming the field."""

from pathlib import Path

import pytest

from membrane.agent.config import load_agent_config
from membrane.agent.observer import ObserverSettings
from membrane.core.errors import InvalidInput


def test_hubble_settings_reach_the_observer(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("hubble: {enabled: false, eventBufferCapacity: 16383, metricsServer: ''}\n")
    settings = ObserverSettings.for_agent(load_agent_config(path, nodeName="n1"))
    assert (settings.enabled, settings.capacity, settings.metrics_listen) == (False, 16383, None)
    assert ObserverSettings.for_agent(load_agent_config(None, nodeName="n1")).capacity == 4095


@pytest.mark.parametrize(("text", "message"), [
    ("hubble: {eventBufferCapacity: 5000}\n", "hubble.eventBufferCapacity: Value error, must be 2^n - 1"),
    ("cluster: {clusterPoolIPv4MaskSize: 40}\n", "cluster.clusterPoolIPv4MaskSize: Input should be less than"),
    ("nodname: x\n", "nodname: Extra inputs are not permitted"),
])
def test_bad_settings_name_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    with pytest.raises(InvalidInput) as info:
        load_agent_config(path)
    assert info.value.problems[0].startswith(f"{path}: {message}")


def test_cluster_policy_modes_reach_the_engine() -> None:
    from membrane.core.config import ClusterConfig
    from membrane.policy.compiler import enforcement_config

    config = enforcement_config(ClusterConfig(policyEnforcementMode="always", policyAuditNamespaces=("dev",)))
    assert (config.mode, config.audit, config.audit_namespaces) == ("always", False, frozenset({"dev"}))
