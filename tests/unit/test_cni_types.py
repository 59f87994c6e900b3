"""CNI types: version rules, CNI_ARGS, name validation, result conversion between versions."""

from __future__ import annotations

from typing import Any

import pytest

from membrane.agent import contract
from membrane.cni import types
from membrane.cni.types import CniError, check_version, convert_result, parse_cni_args

RESULT_1_0: dict[str, Any] = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "lxc1", "mac": "7e:3b:00:00:00:01", "mtu": 1450},
        {"name": "eth0", "mac": "7e:3b:00:00:00:02", "sandbox": "/run/netns/p", "socketPath": ""},
    ],
    "ips": [
        {"address": "10.244.1.5/32", "gateway": "10.244.1.1", "interface": 0},
        {"address": "fd00::5/128", "interface": 1},
    ],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1", "mtu": 1450}],
    "dns": {},
}


def test_error_codes_agree_with_the_agent_contract() -> None:
    pairs = [
        (types.ERR_INCOMPATIBLE_VERSION, contract.CNI_ERR_INCOMPATIBLE_VERSION),
        (types.ERR_UNSUPPORTED_FIELD, contract.CNI_ERR_UNSUPPORTED_FIELD),
        (types.ERR_UNKNOWN_CONTAINER, contract.CNI_ERR_UNKNOWN_CONTAINER),
        (types.ERR_INVALID_ENV, contract.CNI_ERR_INVALID_ENV),
        (types.ERR_IO, contract.CNI_ERR_IO),
        (types.ERR_DECODE, contract.CNI_ERR_DECODE),
        (types.ERR_INVALID_NETCONF, contract.CNI_ERR_INVALID_NETCONF),
        (types.ERR_TRY_AGAIN, contract.CNI_ERR_TRY_AGAIN),
        (types.ERR_IPAM_EXHAUSTED, contract.CNI_ERR_IPAM_EXHAUSTED),
        (types.ERR_AGENT_UNAVAILABLE, contract.CNI_ERR_AGENT_UNAVAILABLE),
        (types.ERR_DATAPATH, contract.CNI_ERR_DATAPATH),
    ]
    assert [a for a, _ in pairs] == [b for _, b in pairs]


def test_conversion_to_0_4_0_adds_ip_versions_and_drops_newer_fields() -> None:
    assert convert_result(RESULT_1_0, "0.4.0") == {
        "cniVersion": "0.4.0",
        "interfaces": [
            {"name": "lxc1", "mac": "7e:3b:00:00:00:01"},
            {"name": "eth0", "mac": "7e:3b:00:00:00:02", "sandbox": "/run/netns/p"},
        ],
        "ips": [
            {"version": "4", "interface": 0, "address": "10.244.1.5/32", "gateway": "10.244.1.1"},
            {"version": "6", "interface": 1, "address": "fd00::5/128"},
        ],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}],
    }


def test_conversion_within_1_x_keeps_fields_and_leaves_out_empty_ones() -> None:
    out = convert_result(RESULT_1_0, "1.1.0")
    assert out["cniVersion"] == "1.1.0"
    assert out["interfaces"][0] == {"name": "lxc1", "mac": "7e:3b:00:00:00:01", "mtu": 1450}
    assert "socketPath" not in out["interfaces"][1]
    assert out["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.244.1.1", "mtu": 1450}]
    assert "dns" not in out  # empty


def test_conversion_of_a_malformed_result_is_an_internal_error() -> None:
    with pytest.raises(CniError) as err:
        convert_result({"ips": [{"gateway": "10.0.0.1"}]}, "0.4.0")
    assert err.value.code == 999


@pytest.mark.parametrize(
    ("version", "command", "code"),
    [
        ("0.2.0", "ADD", 1),
        ("1.2.0", "ADD", 1),
        ("0.3.1", "CHECK", 1),
        ("1.0.0", "GC", 1),
        ("1.0.0", "STATUS", 1),
        ("1.0", "ADD", 6),
        (100, "ADD", 6),
    ],
)
def test_version_rules(version: object, command: str, code: int) -> None:
    with pytest.raises(CniError) as err:
        check_version(version, command)
    assert err.value.code == code


@pytest.mark.parametrize(
    ("version", "command"), [("0.3.0", "ADD"), ("0.4.0", "CHECK"), ("1.0.0", "DEL"), ("1.1.0", "GC")]
)
def test_versions_accepted(version: str, command: str) -> None:
    assert check_version(version, command) == version


def test_cni_args_parse_and_reject_pairs_without_value() -> None:
    assert parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=web;;EMPTY=") == {
        "IgnoreUnknown": "1",
        "K8S_POD_NAME": "web",
        "EMPTY": "",
    }
    with pytest.raises(CniError) as err:
        parse_cni_args("A=1;B")
    assert err.value.code == 4


@pytest.mark.parametrize("ifname", ["", ".", "..", "a" * 16, "eth/0", "eth:0", "eth 0", "eth\t0"])
def test_invalid_interface_names(ifname: str) -> None:
    with pytest.raises(CniError) as err:
        types.validate_ifname(ifname)
    assert err.value.code == 4


@pytest.mark.parametrize("container_id", ["", "-leading-dash", "has/slash", "has space", "ünicode"])
def test_invalid_container_ids(container_id: str) -> None:
    with pytest.raises(CniError):
        types.validate_container_id(container_id)


def test_valid_names_pass() -> None:
    types.validate_ifname("a" * 15)
    types.validate_container_id("4f1c2d3e.pod_1-a")
    types.validate_network_name("membrane")


def test_error_json_leaves_out_empty_details() -> None:
    assert CniError(11, "try again").to_json("0.4.0") == {
        "cniVersion": "0.4.0",
        "code": 11,
        "msg": "try again",
    }
