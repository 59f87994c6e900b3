"""``membrane-cni``: the CNI plugin (spec 1.0.0, also 0.3.x, 0.4.0 and 1.1.0), a thin client of the agent.

Primitives: :func:`main` (the executable), :func:`run` (env + stdin -> exit status + JSON, no
process globals), :func:`parse_invocation` and :class:`Invocation`.

A runtime runs the plugin with ``CNI_COMMAND`` and friends in the environment and the network
configuration on stdin. ADD, DEL, CHECK and GC are forwarded to the agent's API socket (netconf
``agentSocket``, default ``/run/membrane/agent.sock``); the agent does the work and answers with a
1.0.0 result, which is printed in the cniVersion the runtime asked for. Errors are printed as the
spec's error object on stdout with a non-zero exit.

- ADD with the agent down fails with code 11 (try again later).
- DEL never needs the agent: when it cannot be reached, the request goes to the DEL queue
  (netconf ``delQueueDir``, see :mod:`membrane.cni.queue`) and DEL succeeds; the agent replays it.
- In a chain, membrane-cni creates the interface, so it comes first; a ``prevResult`` on ADD is
  handed to the agent with the rest of the netconf but not merged into the result.
- STATUS (1.1) asks the agent's health endpoint: code 50 when the agent is down.

This runs on every container start: it imports the standard library's cheapest modules and
``membrane.cni.*`` only (``membrane/__init__.py`` is empty for the same reason).
"""

from __future__ import annotations

import json
import os
import sys

from membrane.cni.client import (
    AgentClient,
    AgentClientError,
    AgentNotRunning,
    AgentProtocolError,
    AgentRequestFailed,
    AgentTimeout,
)
from membrane.cni.types import (
    COMMANDS,
    CURRENT_VERSION,
    DEFAULT_AGENT_SOCKET,
    DEFAULT_DEL_QUEUE_DIR,
    ERR_AGENT_UNAVAILABLE,
    ERR_DECODE,
    ERR_INTERNAL,
    ERR_INVALID_ENV,
    ERR_INVALID_NETCONF,
    ERR_IO,
    ERR_PLUGIN_NOT_AVAILABLE,
    ERR_TRY_AGAIN,
    REQUIRED_ENV,
    SUPPORTED_VERSIONS,
    CniError,
    check_version,
    convert_result,
    parse_cni_args,
    validate_container_id,
    validate_ifname,
    validate_network_name,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any, BinaryIO, TextIO

ABOUT = "membrane-cni: the membrane CNI plugin; a container runtime runs it with CNI_COMMAND set."
DEFAULT_AGENT_TIMEOUT = 60.0  # seconds; an ADD on a busy node can take a while, the runtime waits anyway


class Invocation:
    """One parsed plugin run: the CNI_* environment and the network configuration."""

    __slots__ = ("args", "cni_version", "command", "container_id", "ifname", "netconf", "netns", "path")

    def __init__(
        self,
        command: str,
        container_id: str,
        netns: str,
        ifname: str,
        args: dict[str, str],
        path: str,
        netconf: dict[str, Any],
        cni_version: str,
    ) -> None:
        self.command = command
        self.container_id = container_id
        self.netns = netns
        self.ifname = ifname
        self.args = args
        self.path = path
        self.netconf = netconf
        self.cni_version = cni_version

    @property
    def agent_socket(self) -> str:
        return _netconf_str(self.netconf, "agentSocket", DEFAULT_AGENT_SOCKET)

    @property
    def del_queue_dir(self) -> str:
        return _netconf_str(self.netconf, "delQueueDir", DEFAULT_DEL_QUEUE_DIR)

    @property
    def agent_timeout(self) -> float:
        value = self.netconf.get("agentTimeout", DEFAULT_AGENT_TIMEOUT)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise CniError(ERR_INVALID_NETCONF, "agentTimeout must be a positive number of seconds", repr(value))
        return float(value)

    def agent_request(self) -> dict[str, Any]:
        """The body of POST /v1/cni (and of a queued DEL)."""
        return {
            "command": self.command,
            "containerID": self.container_id,
            "netns": self.netns,
            "ifname": self.ifname,
            "args": self.args,
            "netconf": self.netconf,
        }


def _netconf_str(netconf: Mapping[str, Any], key: str, default: str) -> str:
    value = netconf.get(key, default)
    if not isinstance(value, str) or not value:
        raise CniError(ERR_INVALID_NETCONF, f"{key} must be a non-empty string", repr(value))
    return value


def _spoken_version(stdin: bytes) -> str:
    """The configuration's cniVersion if we speak it, else ours: the version replies are in."""
    try:
        conf = json.loads(stdin) if stdin.strip() else {}
    except ValueError:
        return CURRENT_VERSION
    version = conf.get("cniVersion") if isinstance(conf, dict) else None
    return version if isinstance(version, str) and version in SUPPORTED_VERSIONS else CURRENT_VERSION


def version_reply(stdin: bytes) -> dict[str, Any]:
    """VERSION: the supported versions, with cniVersion echoing the caller's when we speak it."""
    return {"cniVersion": _spoken_version(stdin), "supportedVersions": list(SUPPORTED_VERSIONS)}


def parse_invocation(env: Mapping[str, str], stdin: bytes) -> Invocation:
    """Validate the environment, then the configuration, in the order libcni's skeleton does."""
    command = env.get("CNI_COMMAND", "")
    if not command:
        raise CniError(ERR_INVALID_ENV, "required env variables [CNI_COMMAND] missing")
    if command not in COMMANDS:
        raise CniError(ERR_INVALID_ENV, f"unknown CNI_COMMAND: {command}")
    missing = [name for name in REQUIRED_ENV[command] if not env.get(name)]
    if missing:
        raise CniError(ERR_INVALID_ENV, f"required env variables [{','.join(missing)}] missing")
    container_id = env.get("CNI_CONTAINERID", "")
    ifname = env.get("CNI_IFNAME", "")
    if command in ("ADD", "DEL", "CHECK"):
        validate_container_id(container_id)
        validate_ifname(ifname)
    args = parse_cni_args(env.get("CNI_ARGS", ""))
    try:
        netconf = json.loads(stdin)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both are ValueErrors
        raise CniError(ERR_DECODE, "error decoding the network configuration", str(exc)) from None
    if not isinstance(netconf, dict):
        raise CniError(ERR_DECODE, "the network configuration must be a JSON object")
    validate_network_name(netconf.get("name"))
    # A configuration without cniVersion is 0.1.0 by the spec's rules, which we do not speak.
    cni_version = check_version(netconf.get("cniVersion", "0.1.0"), command)
    return Invocation(
        command=command,
        container_id=container_id,
        netns=env.get("CNI_NETNS", ""),
        ifname=ifname,
        args=args,
        path=env.get("CNI_PATH", ""),
        netconf=netconf,
        cni_version=cni_version,
    )


def _agent_error(exc: AgentClientError) -> CniError:
    """ADD/CHECK/GC: how an unreachable or failing agent looks to the runtime."""
    if isinstance(exc, AgentRequestFailed):
        return CniError(exc.code, exc.msg, exc.details)
    if isinstance(exc, AgentNotRunning):
        return CniError(ERR_TRY_AGAIN, "the membrane agent is not running; try again later", str(exc))
    if isinstance(exc, (AgentTimeout, AgentProtocolError)):
        return CniError(ERR_TRY_AGAIN, "the membrane agent did not answer; try again later", str(exc))
    return CniError(ERR_AGENT_UNAVAILABLE, "cannot reach the membrane agent", str(exc))


def _delete(inv: Invocation, client: AgentClient, stderr: TextIO) -> None:
    request = inv.agent_request()
    try:
        client.cni(request)
        return
    except AgentRequestFailed as exc:
        raise _agent_error(exc) from None
    except AgentClientError as exc:
        first_error = exc
    # The agent is down (or hung): queue the DEL and succeed; the agent replays it at start.
    from membrane.cni.queue import enqueue_del, remove_queued  # only this path needs it

    try:
        queued = enqueue_del(inv.del_queue_dir, request)
    except OSError as exc:
        raise CniError(
            ERR_IO, "the agent is unreachable and the DEL could not be queued", f"{first_error}; {exc}"
        ) from None
    print(f"membrane-cni: {first_error}; DEL queued in {queued}", file=stderr)
    if isinstance(first_error, AgentNotRunning):
        # The agent may have started since; it drains only after it listens, so asking once
        # more closes the window in which a drain could have missed this file.
        try:
            client.cni(request)
        except AgentClientError:
            return
        remove_queued(queued)


def run(
    env: Mapping[str, str],
    stdin: bytes,
    stderr: TextIO,
    client_factory: Callable[[str, float], AgentClient] = AgentClient,
) -> tuple[int, dict[str, Any] | None]:
    """One plugin run: (exit status, JSON object to print or None)."""
    try:
        if env.get("CNI_COMMAND") == "VERSION":
            return 0, version_reply(stdin)
        if not env.get("CNI_COMMAND"):
            print(ABOUT, file=stderr)
        inv = parse_invocation(env, stdin)
        client = client_factory(inv.agent_socket, inv.agent_timeout)
        if inv.command == "DEL":
            _delete(inv, client, stderr)
            return 0, None
        if inv.command == "STATUS":
            try:
                client.healthz()
            except AgentClientError as exc:
                raise CniError(ERR_PLUGIN_NOT_AVAILABLE, "the membrane agent is not available", str(exc)) from None
            return 0, None
        try:
            reply = client.cni(inv.agent_request())
        except AgentClientError as exc:
            raise _agent_error(exc) from None
        if inv.command == "ADD":
            return 0, convert_result(reply, inv.cni_version)
        return 0, None  # CHECK and GC print nothing on success
    except CniError as exc:
        return 1, exc.to_json(_spoken_version(stdin))


def main() -> int:
    """Entry point of the ``membrane-cni`` executable."""
    stdin: BinaryIO = sys.stdin.buffer
    try:
        # Someone trying the plugin by hand has a terminal on stdin: do not wait for it.
        data = b"" if stdin.isatty() else stdin.read()
    except OSError as exc:
        status = 1
        out: dict[str, Any] | None = CniError(ERR_IO, "cannot read the network configuration", str(exc)).to_json()
    else:
        try:
            status, out = run(os.environ, data, sys.stderr)
        except Exception as exc:  # a bug: still give the runtime an error object it can parse
            status = 1
            out = CniError(ERR_INTERNAL, f"membrane-cni failed: {type(exc).__name__}: {exc}").to_json()
    if out is not None:
        # As libcni prints them: VERSION compact, results and errors indented by four spaces.
        compact = os.environ.get("CNI_COMMAND") == "VERSION"
        text = json.dumps(out, separators=(",", ":")) if compact else json.dumps(out, indent=4)
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())
