"""Real etcd servers for tests and the lab: one member or a cluster, plain or with TLS.

The pure part describes a cluster and how to start it: :class:`EtcdMemberSpec`,
:class:`EtcdClusterSpec` (command lines, URLs) and :class:`TlsFiles`. The lab starts members
from these command lines inside its underlay namespace through its own process boundary; tests
use :class:`EtcdCluster`, which runs the members as children of the test process on 127.0.0.1
with free ports and a temporary data dir::

    with running_etcd(members=3) as etcd:            # healthy when the block starts
        store = EtcdStore(etcd.url)
        etcd.kill_member(0)                           # SIGKILL, for fail-over tests

Also: :func:`etcd_health` (``GET /health`` over a socket the caller may create, e.g. inside a
namespace), :func:`free_ports`, :func:`make_tls_files` (a throwaway CA, server and client
certificates made with ``openssl``) and :func:`etcd_skip_reason`.

Timing: test clusters run with a 50 ms heartbeat and a 500 ms election timeout, so a member
starts in well under a second, a lost leader is replaced in about half a second, and etcd's
minimum lease TTL (1.5 election timeouts, rounded up) is 1 s.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

ETCD_BINARY = "etcd"
OPENSSL_BINARY = "openssl"
START_TIMEOUT = 30.0
STOP_GRACE = 5.0
#: Start attempts when a member loses a race for its free port to another process.
START_ATTEMPTS = 3

SocketFactory = Callable[[tuple[str, int], float], socket.socket]


def etcd_skip_reason() -> str | None:
    """Why real-etcd tests cannot run here, or None."""
    if shutil.which(ETCD_BINARY) is None:
        return "needs the etcd binary (Debian: etcd-server)"
    return None


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports nobody listens on right now (all held until all are chosen)."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            held.append(sock)
        return [s.getsockname()[1] for s in held]
    finally:
        for sock in held:
            sock.close()


# --- certificates -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """A CA and the server and client certificates it signed (PEM files)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def url_query(self, *, client_cert: bool = True) -> str:
        """The store URL's TLS parameters: ``?cacert=…&cert=…&key=…``."""
        query = f"?cacert={self.ca}"
        if client_cert:
            query += f"&cert={self.client_cert}&key={self.client_key}"
        return query


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run([OPENSSL_BINARY, *args], cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")


def make_tls_files(directory: Path, hosts: Sequence[str] = ("127.0.0.1",)) -> TlsFiles:
    """A throwaway CA plus a server certificate for ``hosts`` (IP SANs) and a client certificate.

    EC P-256 keys (fast to make), valid for a day; the private keys are written mode 0600.
    """
    directory.mkdir(parents=True, exist_ok=True)
    key_args = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *key_args, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
        "-subj", "/CN=membrane test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    sans = ",".join(f"IP:{h}" if h.replace(".", "").isdigit() or ":" in h else f"DNS:{h}" for h in hosts)
    # The server certificate allows client use too: etcd's gateway dials its own gRPC server
    # with it when client certificates are required.
    usages = (("server", "serverAuth,clientAuth", f"subjectAltName={sans}\n"), ("client", "clientAuth", ""))
    for name, usage, extra in usages:
        (directory / f"{name}.ext").write_text(
            f"{extra}extendedKeyUsage={usage}\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        )
        _openssl("req", "-new", *key_args, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=membrane test {name}", cwd=directory)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext", cwd=directory)  # fmt: skip
    for key in directory.glob("*.key"):
        key.chmod(0o600)
    return TlsFiles(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )


# --- what a cluster is (pure) -------------------------------------------------------------------


@dataclass(frozen=True)
class EtcdMemberSpec:
    name: str
    host: str
    client_port: int
    peer_port: int
    data_dir: Path

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"


@dataclass(frozen=True)
class EtcdClusterSpec:
    """Members that form one cluster; with ``tls`` clients must use https and a client certificate
    (peers talk plain http to each other: they share one host or one lab underlay)."""

    members: tuple[EtcdMemberSpec, ...]
    token: str = "membrane"
    tls: TlsFiles | None = None
    heartbeat_ms: int = 50
    election_ms: int = 500
    extra_args: tuple[str, ...] = ()

    @property
    def client_scheme(self) -> str:
        return "https" if self.tls else "http"

    def client_url(self, member: EtcdMemberSpec) -> str:
        return f"{self.client_scheme}://{member.endpoint}"

    @staticmethod
    def peer_url(member: EtcdMemberSpec) -> str:
        return f"http://{member.host}:{member.peer_port}"

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={self.peer_url(m)}" for m in self.members)

    def store_url(self, *, client_cert: bool = True) -> str:
        """``etcd://h:p,h:p`` for :class:`~membrane.store.etcd.EtcdStore` (TLS parameters added)."""
        url = "etcd://" + ",".join(m.endpoint for m in self.members)
        return url + (self.tls.url_query(client_cert=client_cert) if self.tls else "")

    def argv(self, member: EtcdMemberSpec, binary: str = ETCD_BINARY) -> list[str]:
        argv = [
            binary,
            "--name", member.name,
            "--data-dir", str(member.data_dir),
            "--listen-client-urls", self.client_url(member),
            "--advertise-client-urls", self.client_url(member),
            "--listen-peer-urls", self.peer_url(member),
            "--initial-advertise-peer-urls", self.peer_url(member),
            "--initial-cluster", self.initial_cluster,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.token,
            "--heartbeat-interval", str(self.heartbeat_ms),
            "--election-timeout", str(self.election_ms),
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]  # fmt: skip
        if self.tls is not None:
            argv += [
                "--cert-file", str(self.tls.server_cert),
                "--key-file", str(self.tls.server_key),
                "--trusted-ca-file", str(self.tls.ca),
                "--client-cert-auth",
            ]  # fmt: skip
        return argv + list(self.extra_args)


def local_cluster_spec(base_dir: Path, members: int = 1, *, tls: TlsFiles | None = None) -> EtcdClusterSpec:
    """``members`` members on 127.0.0.1 with free ports, data under ``base_dir``."""
    ports = free_ports(2 * members)
    specs = tuple(
        EtcdMemberSpec(f"m{i}", "127.0.0.1", ports[2 * i], ports[2 * i + 1], base_dir / f"m{i}") for i in range(members)
    )
    return EtcdClusterSpec(specs, token=f"membrane-test-{os.getpid()}-{ports[0]}", tls=tls)


# --- health ---------------------------------------------------------------------------------------


def _plain_socket(address: tuple[str, int], timeout: float) -> socket.socket:
    return socket.create_connection(address, timeout=timeout)


def etcd_health(
    host: str,
    port: int,
    *,
    tls: TlsFiles | None = None,
    timeout: float = 2.0,
    open_socket: SocketFactory = _plain_socket,
) -> bool:
    """``GET /health`` answers ``{"health": "true"}``: the member is up and the cluster has a leader.

    ``open_socket`` makes the TCP connection (for instance inside another network namespace).
    """
    try:
        sock = open_socket((host, port), timeout)
    except OSError:
        return False
    try:
        sock.settimeout(timeout)
        if tls is not None:
            context = ssl.create_default_context(cafile=str(tls.ca))
            context.load_cert_chain(str(tls.client_cert), str(tls.client_key))
            sock = context.wrap_socket(sock, server_hostname=host)
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.sock = sock
        conn.request("GET", "/health")
        response = conn.getresponse()
        body = response.read()
        return response.status == 200 and json.loads(body).get("health") == "true"
    except (OSError, http.client.HTTPException, ValueError, AttributeError):
        return False
    finally:
        sock.close()


# --- running members (tests) ----------------------------------------------------------------------


@dataclass
class _Running:
    spec: EtcdMemberSpec
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class EtcdCluster:
    """The members of ``spec``, started as children of this process; logs go to ``log_dir``."""

    spec: EtcdClusterSpec
    log_dir: Path
    _running: list[_Running] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.spec.store_url()

    @property
    def pids(self) -> list[int]:
        return [r.process.pid for r in self._running if r.process.poll() is None]

    def start(self, timeout: float = START_TIMEOUT) -> EtcdCluster:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for member in self.spec.members:
            log = self.log_dir / f"{member.name}.log"
            with log.open("ab") as out:
                process = subprocess.Popen(
                    self.spec.argv(member),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self._running.append(_Running(member, process, log))
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = START_TIMEOUT, members: Sequence[int] | None = None) -> None:
        """Wait until every member (or those with these indexes) answers healthy; RuntimeError
        with the log's tail when one exits or the time is up."""
        chosen = [self._running[i] for i in members] if members is not None else list(self._running)
        deadline = time.monotonic() + timeout
        pending = list(chosen)
        while pending:
            for running in list(pending):
                if running.process.poll() is not None:
                    raise RuntimeError(f"etcd member {running.spec.name} exited: {_tail(running.log)}")
                if etcd_health(running.spec.host, running.spec.client_port, tls=self.spec.tls, timeout=1.0):
                    pending.remove(running)
            if pending and time.monotonic() > deadline:
                names = ", ".join(r.spec.name for r in pending)
                raise RuntimeError(f"etcd members {names} not healthy within {timeout:g} s: {_tail(pending[0].log)}")
            if pending:
                time.sleep(0.05)

    def kill_member(self, index: int) -> None:
        """SIGKILL one member and reap it: the others must carry on without it."""
        process = self._running[index].process
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGKILL)
        process.wait()

    def stop(self) -> None:
        """SIGTERM every member, SIGKILL after a grace period; by PID, children of this process only."""
        for running in self._running:
            if running.process.poll() is None:
                running.process.terminate()
        for running in self._running:
            try:
                running.process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                running.process.kill()
                running.process.wait()
        self._running.clear()

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _tail(log: Path, lines: int = 8) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


def _lost_port_race(cluster: EtcdCluster) -> bool:
    return any("address already in use" in _tail(r.log, 50) for r in cluster._running)


@contextlib.contextmanager
def running_etcd(members: int = 1, *, tls: bool = False, base_dir: Path | None = None) -> Iterator[EtcdCluster]:
    """A healthy etcd cluster on 127.0.0.1 for the block; stopped and its files removed after.

    ``tls=True`` makes a CA and certificates and requires client certificates.
    """
    own_dir = base_dir is None
    root = Path(tempfile.mkdtemp(prefix="membrane-etcd-")) if base_dir is None else base_dir
    try:
        files = make_tls_files(root / "tls") if tls else None
        for attempt in range(START_ATTEMPTS):
            spec = local_cluster_spec(root / f"data{attempt}", members, tls=files)
            cluster = EtcdCluster(spec, root / f"logs{attempt}")
            try:
                cluster.start()
            except RuntimeError:
                lost = _lost_port_race(cluster)
                cluster.stop()
                if lost and attempt + 1 < START_ATTEMPTS:
                    continue
                raise
            break
        try:
            yield cluster
        finally:
            cluster.stop()
    finally:
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
