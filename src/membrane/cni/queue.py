"""The CNI DEL queue: how a DEL survives an agent that is down.

Primitives: :func:`enqueue_del` (plugin side), :func:`drain_del_queue` (agent side, at start)
and :class:`DrainReport`.

A runtime calls DEL once and moves on; if the agent is down at that moment the container's
address and datapath entries would leak. So the plugin writes the DEL request into a queue
directory and reports success (DEL is idempotent), and the agent replays the queue once its API
socket listens. One file per attachment, ``<containerID>@<ifname>.json``: the spec identifies an
attachment by (container id, ifname), and a second DEL of the same attachment simply replaces
the first. Files are written to a dot-named temporary and renamed, so a reader never sees half a
file, and removed only after the agent's DEL succeeded.

Ordering that closes the race with a starting agent: the agent starts listening first and drains
second; the plugin, after queueing, tries the agent once more and replays the DEL itself if the
agent answers now. Either the plugin's retry reaches the listening agent, or the file is in place
before the drain lists the directory. A DEL replayed twice is harmless.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path
    from typing import Any

    from membrane.agent.contract import EndpointService

log = logging.getLogger(__name__)

QUEUE_SUFFIX = ".json"
INVALID_SUFFIX = ".invalid"  # a file the agent could not parse, kept for the operator


def queue_file_name(container_id: str, ifname: str) -> str:
    """The file of one attachment. Both parts were validated (no ``/``, not ``.``/``..``)."""
    return f"{container_id}@{ifname}{QUEUE_SUFFIX}"


def enqueue_del(queue_dir: str | Path, request: Mapping[str, Any]) -> str:
    """Write a DEL request (the agent API's JSON body) atomically; return the file's path.

    Raises OSError when the directory cannot be created or written.
    """
    queue_dir = os.fspath(queue_dir)
    os.makedirs(queue_dir, mode=0o700, exist_ok=True)
    name = queue_file_name(str(request["containerID"]), str(request["ifname"]))
    final = os.path.join(queue_dir, name)
    temp = os.path.join(queue_dir, f".{name}.{os.getpid()}.tmp")
    data = json.dumps(dict(request), sort_keys=True, indent=1).encode()
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)  # the rename must not publish an empty file after a crash
    finally:
        os.close(fd)
    try:
        os.replace(temp, final)
    except OSError:
        os.unlink(temp)
        raise
    return final


def remove_queued(path: str | Path) -> None:
    """Drop a queued DEL once it has been carried out (a concurrent drain may have removed it)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def queued_files(queue_dir: str | Path) -> list[str]:
    """Queued DEL files, oldest first; temporaries and set-aside invalid files are not listed."""
    try:
        entries = list(os.scandir(queue_dir))
    except FileNotFoundError:
        return []
    files = [e for e in entries if e.name.endswith(QUEUE_SUFFIX) and not e.name.startswith(".")]
    files.sort(key=lambda e: (e.stat().st_mtime_ns, e.name))
    return [e.path for e in files]


class DrainReport:
    """What a drain did: file paths deleted, kept after a failed DEL, and set aside as unreadable."""

    __slots__ = ("deleted", "failed", "invalid")

    def __init__(self, deleted: list[str], failed: list[str], invalid: list[str]) -> None:
        self.deleted = deleted
        self.failed = failed
        self.invalid = invalid

    def __repr__(self) -> str:
        return f"DrainReport(deleted={self.deleted!r}, failed={self.failed!r}, invalid={self.invalid!r})"


async def drain_del_queue(queue_dir: str | Path, service: EndpointService) -> DrainReport:
    """Replay every queued DEL through ``service.cni_del``, one at a time, oldest first.

    A file is removed after its DEL succeeded and kept (for the next drain) when it failed; a file
    that is not a valid request is renamed ``*.invalid`` so it is neither lost nor retried forever.
    Call it after the API server listens (see the module docstring).
    """
    # Imported here: this module is also loaded by the plugin, which must not pay for the agent.
    from membrane.agent.api import parse_cni_request
    from membrane.agent.contract import CniFailure

    report = DrainReport([], [], [])
    for path in queued_files(queue_dir):
        try:
            with open(path, "rb") as f:
                body = json.loads(f.read())
            request = parse_cni_request(body)
            if request.command != "DEL":
                raise CniFailure(7, f"queued request is a {request.command}, not a DEL")
        except FileNotFoundError:
            continue  # the plugin's own retry carried it out meanwhile
        except (ValueError, CniFailure) as exc:  # JSONDecodeError is a ValueError
            log.warning("cni del queue: %s is not a valid DEL request (%s); set aside", path, exc)
            try:
                os.replace(path, path + INVALID_SUFFIX)
            except OSError as rename_exc:
                log.warning("cni del queue: cannot set %s aside: %s", path, rename_exc)
            report.invalid.append(path)
            continue
        try:
            await service.cni_del(request)
        except Exception as exc:  # any failure keeps the file for the next drain
            log.warning(
                "cni del queue: DEL of container %s (%s) failed, kept for retry: %s",
                request.container_id,
                request.ifname,
                exc,
            )
            report.failed.append(path)
            continue
        remove_queued(path)
        report.deleted.append(path)
    if report.deleted or report.failed or report.invalid:
        log.info(
            "cni del queue: %d replayed, %d failed, %d invalid",
            len(report.deleted),
            len(report.failed),
            len(report.invalid),
        )
    return report
