"""CNI types shared by the plugin, the agent API and the test kit: versions, errors, results.

Primitives: the spec's error codes, :data:`SUPPORTED_VERSIONS`, :class:`CniError`,
:func:`version_key`, :func:`parse_cni_args`, the name validators and :func:`convert_result`
(a 1.0.0 result rendered in the cniVersion a runtime asked for).

This module runs on every container start, inside the plugin: it imports nothing beyond
``json``/``os``-level standard modules (no ``typing``, ``dataclasses`` or ``ipaddress`` at run
time; together they would double the plugin's start-up time). Annotations are strings.
"""

from __future__ import annotations

TYPE_CHECKING = False  # the typing module costs ~3 ms to import; mypy treats this name specially
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

# The version a result is produced in by the agent, and the default when nothing is asked for.
CURRENT_VERSION = "1.0.0"
# Versions this plugin speaks. 0.1.0/0.2.0 had a different result shape and no chaining.
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
# The first version with CHECK, and the first with STATUS and GC.
CHECK_MIN_VERSION = (0, 4, 0)
STATUS_GC_MIN_VERSION = (1, 1, 0)

DEFAULT_AGENT_SOCKET = "/run/membrane/agent.sock"
DEFAULT_DEL_QUEUE_DIR = "/run/membrane/cni-del-queue"

# Error codes (SPEC.md "Error"). 1-99 are reserved for the spec; the same values are in
# membrane.agent.contract, which the plugin cannot import (it pulls in the agent's modules).
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_NETCONF = 7
ERR_INVALID_NETNS = 8
ERR_TRY_AGAIN = 11
ERR_PLUGIN_NOT_AVAILABLE = 50  # STATUS only: cannot serve ADD
ERR_LIMITED_CONNECTIVITY = 51  # STATUS only: and existing containers may suffer
ERR_IPAM_EXHAUSTED = 100
ERR_AGENT_UNAVAILABLE = 101
ERR_DATAPATH = 102
ERR_INTERNAL = 999  # the same number libcni uses for "internal error"

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
# Environment each command cannot do without (SPEC.md section 2). CNI_PATH is listed as
# required for GC by the spec, but this plugin delegates to nothing, so it never needs it.
REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "VERSION": (),
    "STATUS": (),
    "GC": (),
}

_NAME_FIRST = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_NAME_REST = _NAME_FIRST | frozenset("_.-")
_IFNAME_MAX = 15  # IFNAMSIZ - 1


class CniError(Exception):
    """A failure reported to the runtime as the spec's error object (``code``, ``msg``, ``details``)."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        self.code = code
        self.msg = msg
        self.details = details
        super().__init__(msg if not details else f"{msg}: {details}")

    def to_json(self, cni_version: str = CURRENT_VERSION) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


def version_key(version: object) -> tuple[int, int, int]:
    """``"1.0.0"`` -> ``(1, 0, 0)``; raises CniError(6) for anything that is not MAJOR.MINOR.PATCH."""
    if not isinstance(version, str):
        raise CniError(ERR_DECODE, "cniVersion must be a string", repr(version))
    parts = version.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise CniError(ERR_DECODE, "cniVersion is not a semantic version", version)
    return int(parts[0]), int(parts[1]), int(parts[2])


def check_version(version: object, command: str) -> str:
    """The netconf's cniVersion if this plugin can serve ``command`` in it, else CniError(1)."""
    key = version_key(version)
    version = str(version)  # version_key accepted it, so it is a string
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            "incompatible CNI versions",
            f"config is {version}, plugin supports {', '.join(SUPPORTED_VERSIONS)}",
        )
    if command == "CHECK" and key < CHECK_MIN_VERSION:
        raise CniError(ERR_INCOMPATIBLE_VERSION, "config version does not allow CHECK", version)
    if command in ("STATUS", "GC") and key < STATUS_GC_MIN_VERSION:
        raise CniError(ERR_INCOMPATIBLE_VERSION, f"config version does not allow {command}", version)
    return version


def parse_cni_args(raw: str) -> dict[str, str]:
    """``"IgnoreUnknown=1;K8S_POD_NAME=web"`` -> a dict; CniError(4) for a pair without ``=``."""
    out: dict[str, str] = {}
    for pair in raw.split(";"):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CniError(ERR_INVALID_ENV, "invalid CNI_ARGS pair (want KEY=VALUE)", pair)
        out[key] = value
    return out


def _valid_name(name: str) -> bool:
    return bool(name) and name[0] in _NAME_FIRST and all(c in _NAME_REST for c in name)


def validate_container_id(container_id: str) -> None:
    if not _valid_name(container_id):
        raise CniError(ERR_INVALID_ENV, "invalid characters in CNI_CONTAINERID", container_id)


def validate_ifname(ifname: str) -> None:
    """The kernel's rules for interface names (net/core/dev.c dev_valid_name)."""
    if not ifname or len(ifname) > _IFNAME_MAX or ifname in (".", ".."):
        raise CniError(ERR_INVALID_ENV, "invalid CNI_IFNAME (1-15 characters, not . or ..)", ifname)
    if any(c in "/:" or c.isspace() for c in ifname):
        raise CniError(ERR_INVALID_ENV, "CNI_IFNAME contains / or : or whitespace", ifname)


def validate_network_name(name: object) -> None:
    if not isinstance(name, str) or not name:
        raise CniError(ERR_INVALID_NETCONF, "missing network name", "")
    if not _valid_name(name):
        raise CniError(ERR_INVALID_NETCONF, "invalid characters in network name", name)


def _ip_version(address: str) -> str:
    # Cheaper than ipaddress and enough here: the agent produced the address.
    return "6" if ":" in address else "4"


def _pick(source: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: source[k] for k in keys if k in source and source[k] not in (None, "")}


_INTERFACE_KEYS_1 = ("name", "mac", "mtu", "sandbox", "socketPath", "pciID")
_ROUTE_KEYS_1 = ("dst", "gw", "mtu", "advmss", "priority", "table", "scope")
_DNS_KEYS = ("nameservers", "domain", "search", "options")


def convert_result(result: Mapping[str, Any], to_version: str) -> dict[str, Any]:
    """Render a 1.0.0 ADD result in ``to_version`` (1.x as is; 0.3.x/0.4.0 with ``ips[].version``).

    The 0.x shapes know only interfaces{name,mac,sandbox}, ips{version,address,gateway,interface},
    routes{dst,gw} and dns; fields added later are dropped, as libcni's converter does. An empty
    ``dns`` is left out. Raises CniError(999) when the result is not shaped like a CNI result.
    """
    try:
        legacy = version_key(to_version) < (1, 0, 0)
        interfaces = [
            _pick(i, ("name", "mac", "sandbox") if legacy else _INTERFACE_KEYS_1)
            for i in result.get("interfaces") or ()
        ]
        ips = []
        for ip in result.get("ips") or ():
            # Key order as libcni prints it: [version,] interface, address, gateway.
            entry: dict[str, Any] = {"version": _ip_version(str(ip["address"]))} if legacy else {}
            if ip.get("interface") is not None:
                entry["interface"] = ip["interface"]  # 0 is a valid index
            entry["address"] = ip["address"]
            if ip.get("gateway"):
                entry["gateway"] = ip["gateway"]
            ips.append(entry)
        routes = [_pick(r, ("dst", "gw") if legacy else _ROUTE_KEYS_1) for r in result.get("routes") or ()]
        dns = _pick(result.get("dns") or {}, _DNS_KEYS)
    except (AttributeError, KeyError, TypeError) as exc:
        raise CniError(ERR_INTERNAL, "the agent returned a malformed CNI result", repr(exc)) from None
    out: dict[str, Any] = {"cniVersion": to_version}
    if interfaces:
        out["interfaces"] = interfaces
    if ips:
        out["ips"] = ips
    if routes:
        out["routes"] = routes
    if dns:
        out["dns"] = dns
    return out
