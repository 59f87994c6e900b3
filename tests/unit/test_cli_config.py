"""`membrane config get|set`: the cluster settings as a user sees and changes them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from membrane.cli.main import cli
from membrane.core.config import ClusterConfig, parse_settings
from membrane.core.errors import InvalidInput
from membrane.store import keys
from membrane.store.sqlite import SqliteStore

DEFAULTS = ClusterConfig()


def _store_url(tmp_path: Path, config: ClusterConfig | None = DEFAULTS) -> str:
    url = f"sqlite://{tmp_path}/store.db"

    async def write() -> None:
        store = SqliteStore(tmp_path / "store.db")
        if config is not None:
            await store.put(keys.CLUSTER_CONFIG, config.model_dump_json().encode())
        await store.close()

    asyncio.run(write())
    return url


def run(url: str, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--store", url, "config", *args])


def stored(tmp_path: Path) -> ClusterConfig:
    async def read() -> ClusterConfig:
        store = SqliteStore(tmp_path / "store.db")
        kv = await store.get(keys.CLUSTER_CONFIG)
        await store.close()
        assert kv is not None
        return ClusterConfig.model_validate_json(kv.value)

    return asyncio.run(read())


def test_get_lists_every_setting_and_whether_it_changes_live(tmp_path: Path) -> None:
    url = _store_url(tmp_path)
    result = run(url, "get")
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.output.splitlines()[1:] if line.strip()}
    assert rows["policyAuditMode"] == ["false", "yes"]
    assert rows["routingMode"] == ["vxlan", "no"]
    assert rows["hubbleEventBufferCapacity"][-1] == "yes" and "own)" in " ".join(rows["hubbleEventBufferCapacity"])
    assert rows["policyAuditNamespaces"] == ["<none>", "yes"]
    assert run(url, "get", "policyEnforcementMode").output == "default\n"
    assert json.loads(run(url, "get", "-o", "json").output)["settings"]["hubbleEnabled"] is True


def test_set_changes_live_settings_all_together(tmp_path: Path) -> None:
    url = _store_url(tmp_path)
    result = run(url, "set", "policyAuditMode=true", "policyAuditNamespaces=dev,test",
                 "hubbleEventBufferCapacity=16383", 'hubbleExportAllowlist=[{"verdict": ["DROPPED"]}]')
    assert result.exit_code == 0, result.output
    assert "policyAuditNamespaces=dev,test" in result.output and "revision" in result.output
    config = stored(tmp_path)
    assert config.policyAuditMode and config.policyAuditNamespaces == ("dev", "test")
    assert config.hubbleEventBufferCapacity == 16383
    assert config.hubbleExportAllowlist == ({"verdict": ["DROPPED"]},)
    assert run(url, "set", "hubbleEventBufferCapacity=null").exit_code == 0
    assert stored(tmp_path).hubbleEventBufferCapacity is None


@pytest.mark.parametrize(("assignment", "message"), [
    ("routingMode=native", "routingMode: cannot change in a running cluster: changing the routing mode"),
    ("clusterPoolIPv4PodCIDRList=10.9.0.0/16", "clusterPoolIPv4PodCIDRList: cannot change in a running cluster"),
    ("policyAuditMod=true", "policyAuditMod: unknown setting"),
    ("policyEnforcementMode=sometimes", "policyEnforcementMode: Input should be 'default', 'always' or 'never'"),
    ("hubbleEventBufferCapacity=1000", "hubbleEventBufferCapacity: Value error, must be 2^n - 1"),
    ("hubbleMetrics=flow,port-distribution", "hubbleMetrics: Value error, unknown metric 'port-distribution'"),
    ('hubbleExportDenylist=[{"verdict": ["MAYBE"]}]', "hubbleExportDenylist: filter 0:"),
    ("policyAuditMode", "'policyAuditMode': expected KEY=VALUE"),
])
def test_a_bad_setting_is_refused_by_name_and_changes_nothing(tmp_path: Path, assignment: str, message: str) -> None:
    url = _store_url(tmp_path)
    result = run(url, "set", "policyAuditMode=true", assignment)
    assert result.exit_code == 1
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert stored(tmp_path) == ClusterConfig()  # the good half was not applied either


def test_a_cluster_without_settings_says_so(tmp_path: Path) -> None:
    url = _store_url(tmp_path, None)
    result = run(url, "get")
    assert result.exit_code == 1 and "the cluster has no settings yet" in result.output


def test_parse_settings_for_cluster_creation_accepts_fixed_settings() -> None:
    assert parse_settings(["routingMode=native", "tunnelPort=8473"], live_only=False) == {
        "routingMode": "native", "tunnelPort": 8473}
    with pytest.raises(InvalidInput, match="routingMode: cannot change"):
        parse_settings(["routingMode=native"], live_only=True)
