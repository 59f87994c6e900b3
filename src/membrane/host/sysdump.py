"""``membrane sysdump``: one archive with what a support engineer asks for first.

For each node (every node namespace of a lab, or this host): the agent's log, the nft table,
routes, rules, neighbours, the VXLAN FDB, links and addresses, the agent's status (API socket),
its endpoints, and its last flows (Observer API, JSON lines); for the cluster: every store key
and value (redacted), the node list, and optionally the relay's last flows.

Collection never stops at the first failure: each :class:`Item` is collected on its own, and one
that fails is recorded with its reason in ``summary.json`` and ``errors.txt`` inside the
archive. Secrets stay out: values of Kubernetes ``Secret`` objects, values under store keys that
name secret material, and fields whose names do (``token``, ``password``, ``privateKey`` …) are
replaced by ``<redacted>``; a password in the store URL too. The TLS files an etcd URL names are
never read.

The collectors are behind :class:`Sources` (real: :class:`HostSources`), so the layout and
redaction are tested without a kernel or an agent.

Primitives: :class:`NodeTarget`, :class:`Item`, :class:`Sources`, :class:`HostSources`,
:func:`node_items`, :func:`cluster_items`, :func:`collect`, :func:`write_archive`,
:func:`redact_entry`, :func:`redact_url`, :func:`archive_name`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import subprocess
import tarfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from membrane.store import keys

REDACTED = "<redacted>"
DEFAULT_FLOWS = 1000
COMMAND_TIMEOUT = 30.0
AGENT_TIMEOUT = 10.0
LOG_LIMIT = 50 * 1024 * 1024  # the tail of a larger agent log
VXLAN_DEVICE = "membrane_vxlan"
AGENT_UNIT = "membrane-agent.service"

# Names (store keys, object fields) that hold secret material. A bare "key" is not one: label
# selectors are full of ``key: app``.
_SENSITIVE = re.compile(
    r"secret|token|passw|credential|private[-_.]?key|api[-_.]?key|[-_.]key$|\.pem$|bearer", re.IGNORECASE)
SECRETS_PREFIX = keys.objects_prefix("secrets")


class CollectError(Exception):
    """One item could not be collected; the message is the reason recorded in the archive."""


@dataclass(frozen=True)
class NodeTarget:
    """Where one node's pieces are: its namespace (None: this host's own), sockets and log."""

    name: str
    netns: Path | None
    agent_socket: Path
    observer: str
    agent_log: Path | None  # None: the systemd journal of the agent's unit


@dataclass(frozen=True)
class Item:
    path: str  # inside the archive, below its top directory
    collect: Callable[[], Awaitable[bytes]]


class Sources(Protocol):
    async def command(self, target: NodeTarget, argv: Sequence[str]) -> bytes: ...

    async def agent_log(self, target: NodeTarget) -> bytes: ...

    async def agent_status(self, target: NodeTarget) -> dict[str, Any]: ...

    async def flows(self, address: str, number: int) -> list[str]:
        """The last ``number`` flows as JSON lines (oldest first)."""
        ...

    async def store_entries(self) -> list[tuple[str, bytes]]: ...

    async def endpoint_list(self, node: str | None) -> str: ...

    async def node_list(self) -> str: ...


# -- redaction -----------------------------------------------------------------------------------------

def _decode(value: bytes) -> Any:
    try:
        text = value.decode()
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(value).decode()}
    try:
        return json.loads(text)
    except ValueError:
        return text


def _redact_fields(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: (REDACTED if isinstance(k, str) and _SENSITIVE.search(k) and not isinstance(v, (dict, list))
                    else _redact_fields(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_fields(v) for v in value]
    return value


def _redact_secret_object(obj: dict[str, Any]) -> dict[str, Any]:
    """A Kubernetes Secret keeps its names (which keys it holds), never its values."""
    out = dict(obj)
    for field in ("data", "stringData"):
        if isinstance(out.get(field), dict):
            out[field] = dict.fromkeys(out[field], REDACTED)
        elif field in out:
            out[field] = REDACTED
    metadata = out.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("annotations"), dict):
        # kubectl's last-applied-configuration annotation repeats the data.
        out["metadata"] = {**metadata, "annotations": dict.fromkeys(metadata["annotations"], REDACTED)}
    return out


def redact_entry(key: str, value: bytes) -> Any:
    """The value of store key ``key`` as JSON-able data, with secret material replaced."""
    if key.startswith(SECRETS_PREFIX):
        decoded = _decode(value)
        return _redact_secret_object(decoded) if isinstance(decoded, dict) else REDACTED
    if _SENSITIVE.search(key):
        return REDACTED
    decoded = _decode(value)
    if isinstance(decoded, dict) and decoded.get("kind") == "Secret":
        decoded = _redact_secret_object(decoded)
    return _redact_fields(decoded)


def redact_url(url: str) -> str:
    """The store URL without a password in it (TLS file paths stay: they are not secret, and unread)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{REDACTED}@{host}"))


# -- what is collected ----------------------------------------------------------------------------------

def _text(data: str) -> bytes:
    return data.encode() if data.endswith("\n") or not data else (data + "\n").encode()


def node_items(target: NodeTarget, sources: Sources, flows: int) -> list[Item]:
    base = f"nodes/{target.name}/"
    commands = {
        "nft.txt": ["nft", "list", "table", "inet", "membrane"],
        "routes.txt": ["ip", "-d", "route", "show", "table", "all"],
        "rules.txt": ["ip", "rule", "show"],
        "neighbours.txt": ["ip", "-d", "neigh", "show"],
        "fdb.txt": ["bridge", "fdb", "show", "dev", VXLAN_DEVICE],
        "links.txt": ["ip", "-d", "link", "show"],
        "addresses.txt": ["ip", "addr", "show"],
    }

    def command(argv: list[str]) -> Callable[[], Awaitable[bytes]]:
        return lambda: sources.command(target, argv)

    async def status() -> bytes:
        return _text(json.dumps(await sources.agent_status(target), indent=2, sort_keys=True))

    async def endpoints() -> bytes:
        return _text(await sources.endpoint_list(target.name))

    async def last_flows() -> bytes:
        return "".join(line + "\n" for line in await sources.flows(target.observer, flows)).encode()

    items = [Item(base + "agent.log", lambda: sources.agent_log(target))]
    items += [Item(base + name, command(argv)) for name, argv in commands.items()]
    items += [Item(base + "status.json", status), Item(base + "endpoints.txt", endpoints)]
    if flows > 0:
        items.append(Item(base + "flows.jsonl", last_flows))
    return items


def cluster_items(sources: Sources, relay: str | None, flows: int) -> list[Item]:
    async def store() -> bytes:
        entries = [{"key": k, "value": redact_entry(k, v)} for k, v in sorted(await sources.store_entries())]
        return _text(json.dumps(entries, indent=2))

    async def nodes() -> bytes:
        return _text(await sources.node_list())

    items = [Item("cluster/store.json", store), Item("cluster/nodes.txt", nodes)]
    if relay is not None and flows > 0:
        async def relay_flows() -> bytes:
            return "".join(line + "\n" for line in await sources.flows(relay, flows)).encode()

        items.append(Item("cluster/flows.jsonl", relay_flows))
    return items


async def collect(items: Sequence[Item]) -> tuple[dict[str, bytes], list[tuple[str, str]]]:
    """Every item's bytes, and ``(path, reason)`` for each one that failed; never raises for one item."""
    files: dict[str, bytes] = {}
    errors: list[tuple[str, str]] = []
    for item in items:
        try:
            files[item.path] = await item.collect()
        except Exception as exc:  # every failure is recorded, none stops the dump
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            errors.append((item.path, reason))
    return files, errors


def archive_name(now: datetime) -> str:
    return f"membrane-sysdump-{now.astimezone(UTC).strftime('%Y%m%d-%H%M%S')}.tar.gz"


def write_archive(output: Path, top: str, files: dict[str, bytes], summary: dict[str, Any]) -> None:
    """``output`` (tar.gz) holding ``top/…`` for each file plus summary.json and errors.txt; written
    next to its final name and renamed, so a reader never sees half an archive."""
    errors = "".join(f"{e['item']}: {e['reason']}\n" for e in summary["errors"])
    members = {**files, "summary.json": _text(json.dumps(summary, indent=2)), "errors.txt": errors.encode()}
    partial = output.with_name(f".{output.name}.partial")
    now = time.time()
    try:
        with tarfile.open(partial, "w:gz") as tar:
            for path, data in sorted(members.items()):
                info = tarfile.TarInfo(f"{top}/{path}")
                info.size = len(data)
                info.mtime = int(now)
                info.mode = 0o600
                tar.addfile(info, io.BytesIO(data))
        partial.chmod(0o600)  # store contents and logs: for the operator's eyes
        partial.replace(output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


# -- the real collectors --------------------------------------------------------------------------------

class HostSources:
    """Commands run inside the node's namespace (``nsenter --net``); the store opened once."""

    def __init__(self, store_url: str) -> None:
        self.store_url = store_url
        self._store: Any = None
        self._store_error: str | None = None

    async def _open_store(self) -> Any:
        if self._store_error is not None:
            raise CollectError(self._store_error)
        if self._store is None:
            from membrane.store import open_store

            scheme, _, path = self.store_url.partition("://")
            if scheme == "sqlite" and not Path(path).is_file():
                # Opening would create an empty store: a dump only reads.
                self._store_error = f"store {self.store_url}: no such file"
                raise CollectError(self._store_error)
            try:
                self._store = await asyncio.wait_for(open_store(self.store_url), AGENT_TIMEOUT)
            except Exception as exc:  # recorded once, for every store item
                self._store_error = f"store {redact_url(self.store_url)}: {exc or type(exc).__name__}"
                raise CollectError(self._store_error) from None
        return self._store

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()

    async def command(self, target: NodeTarget, argv: Sequence[str]) -> bytes:
        full = [*argv] if target.netns is None else ["nsenter", f"--net={target.netns}", *argv]
        try:
            result = await asyncio.to_thread(
                subprocess.run, full, capture_output=True, timeout=COMMAND_TIMEOUT, check=False)
        except FileNotFoundError as exc:
            raise CollectError(f"{argv[0]} is not installed: {exc.strerror}") from None
        except subprocess.TimeoutExpired:
            raise CollectError(f"{' '.join(argv)} did not finish within {COMMAND_TIMEOUT:g} s") from None
        if result.returncode != 0:
            message = result.stderr.decode(errors="replace").strip() or f"exit status {result.returncode}"
            raise CollectError(f"{' '.join(argv)}: {message}")
        return bytes(result.stdout)

    async def agent_log(self, target: NodeTarget) -> bytes:
        if target.agent_log is None:
            journal = NodeTarget(target.name, None, target.agent_socket, target.observer, None)
            return await self.command(journal, ["journalctl", "-u", AGENT_UNIT, "--no-pager", "-o", "short-iso"])
        try:
            with target.agent_log.open("rb") as log:
                log.seek(0, 2)
                size = log.tell()
                log.seek(max(0, size - LOG_LIMIT))
                return log.read()
        except OSError as exc:
            raise CollectError(f"{target.agent_log}: {exc.strerror}") from None

    async def agent_status(self, target: NodeTarget) -> dict[str, Any]:
        from membrane.cni.client import AgentClient, AgentClientError

        try:
            client = AgentClient(str(target.agent_socket), timeout=AGENT_TIMEOUT)
            return await asyncio.to_thread(client.status)
        except AgentClientError as exc:
            raise CollectError(str(exc)) from None

    async def flows(self, address: str, number: int) -> list[str]:
        from membrane.observe.client import ObserverClient
        from membrane.observe.jsonpb import to_json
        from membrane.observe.model import GetFlowsRequest

        lines = []
        async with ObserverClient(address, timeout=AGENT_TIMEOUT) as client:
            async def read() -> None:
                async for response in client.get_flows(GetFlowsRequest(number=number)):
                    if response.HasField("flow"):
                        lines.append(to_json(response))

            await asyncio.wait_for(read(), COMMAND_TIMEOUT)
        return lines

    async def store_entries(self) -> list[tuple[str, bytes]]:
        store = await self._open_store()
        entries, _revision = await store.list(keys.ROOT)
        return [(kv.key, kv.value) for kv in entries]

    async def endpoint_list(self, node: str | None) -> str:
        from membrane.cli.inspect import format_endpoint_list, load_cluster_view
        from membrane.cli.policy_cmd import enforcement_columns, load_policy_view

        store = await self._open_store()
        enforcement = enforcement_columns(await load_policy_view(store))
        return format_endpoint_list(await load_cluster_view(store), node, enforcement)

    async def node_list(self) -> str:
        from membrane.cli.inspect import format_node_list, load_cluster_view

        store = await self._open_store()
        return format_node_list(await load_cluster_view(store), time.time())
