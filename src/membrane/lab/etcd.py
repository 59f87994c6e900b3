"""etcd in the lab (``lab up --store etcd``): the members, the forwarder, their health.

::

    root namespace                          LAB-underlay (br0 172.31.S.1/24)
    ──────────────                          ─────────────────────────────────
    membrane CLI ─► 127.0.0.1:P  forwarder ══ sockets made in ══► 172.31.S.1:2379  etcd1
                    (store_url)              the underlay         172.31.S.1:2381  etcd2 ┐ with
    agents in LAB-nodeK ── eth0 ── br0 ─────────────────────────► 172.31.S.1:2383  etcd3 ┘ 3 members
                    (agent_store_url: etcd://172.31.S.1:2379[,…])

The members run inside the underlay namespace (``nsenter --net``), on the gateway address the
nodes already route to, so agents reach them exactly as agents on real hosts reach an etcd
cluster. The CLI runs in the root namespace, which has no route to the lab (and must not get
one), so the lab runs a small TCP forwarder there: it listens on 127.0.0.1 and opens each
upstream connection from a socket created by a thread that joined the underlay namespace (a
socket stays in the namespace it was made in). With 3 members the forwarder connects to the
first member that accepts, so the CLI keeps working when one is down.

Primitives: :func:`lab_etcd` (the record part, pure), :func:`member_argv`, :func:`forwarder_argv`,
:class:`EtcdProbe` with :class:`NetnsEtcdProbe` and :class:`FakeEtcdProbe`, :func:`start_etcd`,
:func:`wait_etcd_healthy`, :func:`etcd_status` (:class:`StoreProcessStatus`), and the forwarder
itself: :func:`forward` and :func:`run_forwarder`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from membrane.core.errors import InvalidInput, StoreError
from membrane.datapath.netns import run_in_netns
from membrane.lab.host import ProcessControl, netns_path
from membrane.lab.plan import LabPlan
from membrane.lab.state import LabEtcd, LabEtcdMember, LabRecord
from membrane.testing.etcd import EtcdClusterSpec, EtcdMemberSpec, etcd_health

LOCALHOST = "127.0.0.1"
#: etcd's own defaults: steadier than the quick test settings on a machine running many agents.
HEARTBEAT_MS = 100
ELECTION_MS = 1000
#: History older than this many hours is compacted away (etcd's periodic auto-compaction).
RETENTION_HOURS = 1
ETCD_GRACE = 5.0  # an etcd member gets this long after SIGTERM before SIGKILL
CONNECT_TIMEOUT = 2.0
POLL_INTERVAL = 0.05
LOG_TAIL_LINES = 10
SPLICE_BUFFER = 65536


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port nobody listens on right now (the forwarder binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# --- what the lab records and runs (pure) -------------------------------------------------------


def lab_etcd(plan: LabPlan, state_dir: Path, forwarder_port: int) -> LabEtcd:
    members = tuple(
        LabEtcdMember(
            name=ep.name,
            ip=str(ep.ip),
            client_port=ep.client_port,
            peer_port=ep.peer_port,
            data_dir=state_dir / "etcd" / ep.name,
            log=state_dir / f"etcd-{ep.name}.log",
        )
        for ep in plan.etcd_endpoints()
    )
    return LabEtcd(members=members, forwarder_port=forwarder_port, forwarder_log=state_dir / "etcd-forwarder.log")


def cluster_spec(record: LabRecord) -> EtcdClusterSpec:
    assert record.etcd is not None
    members = tuple(EtcdMemberSpec(m.name, m.ip, m.client_port, m.peer_port, m.data_dir) for m in record.etcd.members)
    return EtcdClusterSpec(
        members,
        token=f"membrane-lab-{record.name}",
        heartbeat_ms=HEARTBEAT_MS,
        election_ms=ELECTION_MS,
        extra_args=("--auto-compaction-mode", "periodic", "--auto-compaction-retention", str(RETENTION_HOURS)),
    )


def member_argv(record: LabRecord, member: LabEtcdMember) -> list[str]:
    spec = cluster_spec(record)
    (chosen,) = (m for m in spec.members if m.name == member.name)
    return ["nsenter", f"--net={netns_path(record.underlay_netns)}", *spec.argv(chosen)]


def forwarder_argv(record: LabRecord, python: str = sys.executable) -> list[str]:
    assert record.etcd is not None
    upstreams = [arg for m in record.etcd.members for arg in ("--upstream", m.endpoint)]
    return [
        python, "-m", "membrane", "lab", "forward",
        "--listen", f"{LOCALHOST}:{record.etcd.forwarder_port}",
        "--netns", str(netns_path(record.underlay_netns)),
        *upstreams,
    ]  # fmt: skip


# --- health -------------------------------------------------------------------------------------


class EtcdProbe(Protocol):
    def healthy(self, netns: str | None, host: str, port: int) -> bool:
        """``GET /health`` on ``host:port``, connecting from inside ``netns`` (None: from here)."""
        ...


@dataclass(frozen=True)
class NetnsEtcdProbe:
    timeout: float = 2.0

    def healthy(self, netns: str | None, host: str, port: int) -> bool:
        if netns is None:
            return etcd_health(host, port, timeout=self.timeout)

        def open_socket(address: tuple[str, int], timeout: float) -> socket.socket:
            return run_in_netns(netns, lambda: socket.create_connection(address, timeout=timeout))

        try:
            return etcd_health(host, port, timeout=self.timeout, open_socket=open_socket)
        except Exception:  # e.g. no permission to enter the namespace: not known to be healthy
            return False


@dataclass
class FakeEtcdProbe:
    """Answers ``answers`` to every probe and remembers what was asked (lab tests without root)."""

    answers: bool = True
    asked: list[tuple[str | None, str, int]] = field(default_factory=list)

    def healthy(self, netns: str | None, host: str, port: int) -> bool:
        self.asked.append((netns, host, port))
        return self.answers


# --- start, wait, status ------------------------------------------------------------------------


def start_etcd(
    record: LabRecord,
    processes: ProcessControl,
    save: Callable[[LabRecord], None],
    advance: Callable[[str], None],
) -> LabRecord:
    """Start every member in the underlay, then the forwarder; each recorded as soon as it runs."""
    etcd = record.etcd
    assert etcd is not None
    for member in etcd.members:
        member.data_dir.parent.mkdir(parents=True, exist_ok=True)
        ref = processes.spawn(member_argv(record, member), member.log)
        etcd = etcd.with_member_process(member.name, ref)
        record = record.model_copy(update={"etcd": etcd})
        save(record)
        advance(f"{member.name} started (pid {ref.pid}, {member.endpoint} in {record.underlay_netns})")
    ref = processes.spawn(forwarder_argv(record), etcd.forwarder_log)
    record = record.model_copy(update={"etcd": etcd.model_copy(update={"forwarder": ref})})
    save(record)
    advance(f"store forwarder started (pid {ref.pid}, {LOCALHOST}:{etcd.forwarder_port})")
    return record


def wait_etcd_healthy(record: LabRecord, processes: ProcessControl, probe: EtcdProbe, timeout: float) -> None:
    """Every member answers healthy inside the underlay, and the forwarder reaches the cluster."""
    etcd = record.etcd
    assert etcd is not None
    pending: list[tuple[str, str | None, str, int, Path]] = [
        (m.name, record.underlay_netns, m.ip, m.client_port, m.log) for m in etcd.members
    ]
    pending.append(("store forwarder", None, LOCALHOST, etcd.forwarder_port, etcd.forwarder_log))
    refs = {m.name: m.process for m in etcd.members} | {"store forwarder": etcd.forwarder}
    deadline = time.monotonic() + timeout
    while pending:
        for item in list(pending):
            name, netns, host, port, log = item
            ref = refs[name]
            if ref is None or not processes.is_alive(ref):
                raise StoreError(f"the lab's {name} exited while starting{_log_tail(log)}")
            if probe.healthy(netns, host, port):
                pending.remove(item)
        if pending and time.monotonic() > deadline:
            name, _, host, port, log = pending[0]
            raise StoreError(f"the lab's {name} ({host}:{port}) was not healthy within {timeout:g} s{_log_tail(log)}")
        if pending:
            time.sleep(POLL_INTERVAL)


StoreState = Literal["healthy", "not answering", "stopped", "not started"]


@dataclass(frozen=True)
class StoreProcessStatus:
    name: str  # etcd1 … or "forwarder"
    endpoint: str
    pid: int | None
    state: StoreState


def etcd_status(record: LabRecord, processes: ProcessControl, probe: EtcdProbe) -> tuple[StoreProcessStatus, ...]:
    etcd = record.etcd
    if etcd is None:
        return ()
    rows = [(m.name, record.underlay_netns, m.ip, m.client_port, m.process) for m in etcd.members] + [
        ("forwarder", None, LOCALHOST, etcd.forwarder_port, etcd.forwarder)
    ]
    result = []
    for name, netns, host, port, ref in rows:
        state: StoreState
        if ref is None:
            state = "not started"
        elif not processes.is_alive(ref):
            state = "stopped"
        elif probe.healthy(netns, host, port):
            state = "healthy"
        else:
            state = "not answering"
        result.append(StoreProcessStatus(name, f"{host}:{port}", ref.pid if ref else None, state))
    return tuple(result)


def _log_tail(log: Path) -> str:
    try:
        with log.open(errors="replace") as f:
            lines = [line.rstrip() for line in deque(f, maxlen=LOG_TAIL_LINES) if line.strip()]
    except OSError:
        return " (it left no log)"
    if not lines:
        return " (its log is empty)"
    return "; the last lines of its log:\n" + "\n".join(f"  {line}" for line in lines)


# --- the forwarder ------------------------------------------------------------------------------


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput([f"{text!r} is not HOST:PORT"])
    return host, int(port)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close; on an error abort both sides so the other pipe ends too."""
    try:
        while data := await reader.read(SPLICE_BUFFER):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()
        peer.transport.abort()


async def _connect_upstream(
    netns: str, upstreams: Sequence[tuple[str, int]], first: int
) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter] | None:
    loop = asyncio.get_running_loop()
    for offset in range(len(upstreams)):
        index = (first + offset) % len(upstreams)
        # Made by a short-lived thread inside the underlay: the socket lives there from now on,
        # while this process (and its listener) stays in the root namespace.
        sock = run_in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        sock.setblocking(False)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await loop.sock_connect(sock, upstreams[index])
        except (OSError, TimeoutError):
            sock.close()
            continue
        reader, writer = await asyncio.open_connection(sock=sock)
        return index, reader, writer
    return None


async def forward(
    listener: socket.socket, netns: str, upstreams: Sequence[tuple[str, int]], stop: asyncio.Event
) -> None:
    """Serve ``listener`` until ``stop``: each connection is spliced to the first upstream that
    accepts one, starting with the one that accepted last; none accepting resets the client."""
    preferred = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal preferred
        upstream = await _connect_upstream(netns, upstreams, preferred)
        if upstream is None:
            # A reset rather than a clean close: the client knows at once nothing is there.
            sock = writer.get_extra_info("socket")
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        preferred, up_reader, up_writer = upstream
        try:
            await asyncio.gather(_pipe(reader, up_writer, writer), _pipe(up_reader, writer, up_writer))
        finally:
            writer.close()
            up_writer.close()

    server = await asyncio.start_server(handle, sock=listener)
    async with server:
        await stop.wait()


def run_forwarder(listen: str, netns: str, upstreams: Sequence[str]) -> None:
    """The forwarder process: bind ``listen`` here (root namespace), serve until SIGTERM."""
    targets = [parse_hostport(u) for u in upstreams]
    if not targets:
        raise InvalidInput(["the forwarder needs at least one --upstream HOST:PORT"])
    host, port = parse_hostport(listen)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise StoreError(f"the store forwarder cannot listen on {listen}: {exc.strerror}") from None
    listener.listen(128)
    print(f"forwarding {listen} to {', '.join(upstreams)} in {netns}", flush=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await forward(listener, netns, targets, stop)

    asyncio.run(main())
