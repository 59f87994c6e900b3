"""podman as a CNI client for kernel tests: a private, throw-away podman set-up.

Primitives: :class:`PodmanSetup` (paths and rendered configuration), :class:`Podman` (async
``run_detached``/``stop``/``rm``/``inspect``/``cleanup``), :func:`podman_session` (context
manager), :func:`build_busybox_rootfs`, :func:`write_conflist`, :func:`membrane_conflist` and
:func:`podman_missing` (why a test should skip).

Everything podman keeps lives under one temporary directory: storage (``--root``, vfs),
``--runroot``, its ``tmp_dir`` and event log, and the CNI configuration directory holding the
test's conflists. What this machine needs (measured with podman 4.3.1):

- ``network_backend = "cni"``: 4.3 has no flag for it, only containers.conf; the CNI plugin
  directories are the test's plus the distribution's;
- runc, not crun: crun 1.8 fails on hybrid cgroups; ``cgroup_manager = "cgroupfs"`` and
  ``events_logger = "file"`` as there is no systemd;
- lowered ``default_ulimits``: root lacks CAP_SYS_RESOURCE, raising nofile/nproc fails;
- ``--rootfs DIR`` is a boolean flag: the directory takes the image's place, so every option
  comes before it. A misplaced option silently drops podman onto its default bridge network,
  which changes the host; ``default_network`` names the test's network so that cannot happen.

- runc runs through a wrapper that keeps its state in the directory too, and ``--cgroup-parent``
  puts the containers' (and conmon's) cgroups below one per-set-up cgroup removed at cleanup.

Outside the temporary directory podman still uses ``/run/netns/netns-<uuid>`` for the
container's namespace and libcni's cache ``/var/lib/cni/results``; both entries go away when the
container is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from membrane.cni.conflist import membrane_conflist as membrane_conflist  # re-exported for tests
from membrane.testing.cnitool import DISTRIBUTION_CNI_DIRS

BUSYBOX = "/bin/busybox"
ULIMITS = ("nofile=4096:4096", "nproc=1024:1024")


def podman_missing(busybox: str = BUSYBOX) -> str | None:
    """Why podman-based tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("podman", "runc", "ip", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    if not os.path.exists(busybox):
        return f"{busybox} not installed (busybox-static)"
    return None


def build_busybox_rootfs(dest: str | Path, files: Mapping[str, str] | None = None, busybox: str = BUSYBOX) -> Path:
    """A root filesystem of a static busybox and one symlink per applet (``/bin/httpd`` ...).

    ``files`` maps paths inside the rootfs (``"www/index.html"``) to their text.
    """
    root = Path(dest)
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("dev", "proc", "sys", "tmp", "etc", "root", "run", "var"):
        (root / sub).mkdir(exist_ok=True)
    shutil.copy2(busybox, bin_dir / "busybox")
    applets = subprocess.run([busybox, "--list"], check=True, capture_output=True, text=True).stdout.split()
    for applet in applets:
        link = bin_dir / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    (root / "sbin").mkdir(exist_ok=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    for rel, text in (files or {}).items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return root


def write_conflist(network_dir: str | Path, conflist: Mapping[str, Any]) -> Path:
    """Write ``<name>.conflist`` into the CNI configuration directory."""
    path = Path(network_dir) / f"{conflist['name']}.conflist"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(conflist, indent=2) + "\n")
    return path


def _toml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


@dataclass(frozen=True)
class PodmanSetup:
    """Where one private podman keeps everything, and the configuration that points it there."""

    base: Path
    plugin_dirs: tuple[Path, ...] = ()  # searched before the distribution's CNI directories
    default_network: str = "membrane"
    ulimits: tuple[str, ...] = ULIMITS
    extra_env: Mapping[str, str] = field(default_factory=dict)
    # An argv prefix podman runs under, e.g. ("nsenter", "--net=PATH"): podman runs its CNI
    # plugins in its own network namespace, so this puts them in a test's node namespace.
    launcher: tuple[str, ...] = ()

    @property
    def network_dir(self) -> Path:
        return self.base / "cni-net.d"

    @property
    def root(self) -> Path:
        return self.base / "storage"

    @property
    def runroot(self) -> Path:
        return self.base / "run"

    @property
    def tmp_dir(self) -> Path:
        return self.base / "tmp"

    @property
    def runtime_state(self) -> Path:
        return self.base / "runc-state"

    @property
    def runtime(self) -> Path:
        """A runc wrapper keeping runc's state below ``base``.

        ``--runtime-flag root=…`` is not enough: conmon's clean-up call after a container exits
        does not carry runtime flags, and runc would create ``/run/runc``.
        """
        return self.base / "bin" / "runc"

    @property
    def cgroup_parent(self) -> str:
        """Containers and their conmon go below this cgroup (in every hierarchy), removed at cleanup."""
        digest = hashlib.sha256(str(self.base.resolve()).encode()).hexdigest()[:10]
        return f"/membrane-test-{digest}"

    @property
    def containers_conf(self) -> Path:
        return self.base / "containers.conf"

    @property
    def storage_conf(self) -> Path:
        return self.base / "storage.conf"

    @property
    def events_log(self) -> Path:
        return self.base / "events.log"

    def cni_plugin_dirs(self) -> list[str]:
        return [str(p) for p in self.plugin_dirs] + list(DISTRIBUTION_CNI_DIRS)

    def render_containers_conf(self) -> str:
        return (
            "[containers]\n"
            f"default_ulimits = {_toml_list(self.ulimits)}\n"
            'log_driver = "k8s-file"\n'
            "\n[network]\n"
            'network_backend = "cni"\n'
            f"network_config_dir = {json.dumps(str(self.network_dir))}\n"
            f"cni_plugin_dirs = {_toml_list(self.cni_plugin_dirs())}\n"
            f"default_network = {json.dumps(self.default_network)}\n"
            "\n[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f"events_logfile_path = {json.dumps(str(self.events_log))}\n"
            f"runtime = {json.dumps(str(self.runtime))}\n"
            f"tmp_dir = {json.dumps(str(self.tmp_dir))}\n"
        )

    def render_storage_conf(self) -> str:
        return (
            "[storage]\n"
            'driver = "vfs"\n'
            f"graphroot = {json.dumps(str(self.root))}\n"
            f"runroot = {json.dumps(str(self.runroot))}\n"
        )

    def write(self) -> None:
        for directory in (self.base, self.network_dir, self.root, self.runroot, self.tmp_dir):
            directory.mkdir(parents=True, exist_ok=True)
        runc = shutil.which("runc") or "/usr/sbin/runc"
        self.runtime.parent.mkdir(exist_ok=True)
        self.runtime.write_text(f'#!/bin/sh\nexec {runc} --root "{self.runtime_state}" "$@"\n')
        self.runtime.chmod(0o755)
        self.containers_conf.write_text(self.render_containers_conf())
        self.storage_conf.write_text(self.render_storage_conf())

    def env(self) -> dict[str, str]:
        """The environment podman runs with: only the private configuration files."""
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(self.base),
            "CONTAINERS_CONF": str(self.containers_conf),
            "CONTAINERS_STORAGE_CONF": str(self.storage_conf),
            **self.extra_env,
        }

    def argv(self, *args: str) -> list[str]:
        return [
            *self.launcher,
            "podman",
            "--root",
            str(self.root),
            "--runroot",
            str(self.runroot),
            "--storage-driver",
            "vfs",
            "--runtime",
            str(self.runtime),
            "--cgroup-manager",
            "cgroupfs",
            *args,
        ]


class PodmanError(Exception):
    """podman exited non-zero."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(f"{' '.join(argv)} exited {returncode}: {stderr.strip()[-2000:]}")


@dataclass(frozen=True)
class PodmanResult:
    returncode: int
    stdout: str
    stderr: str


class Podman:
    """Runs podman with a :class:`PodmanSetup`. Coroutines, so an in-process agent can answer CNI."""

    def __init__(self, setup: PodmanSetup, timeout: float = 180.0) -> None:
        self.setup = setup
        self.timeout = timeout
        self.containers: list[str] = []

    async def run(self, *args: str, check: bool = True) -> PodmanResult:
        argv = self.setup.argv(*args)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.setup.env(),
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise PodmanError(argv, -9, "", f"timed out after {self.timeout}s") from None
        assert proc.returncode is not None
        result = PodmanResult(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))
        if check and result.returncode != 0:
            raise PodmanError(argv, result.returncode, result.stdout, result.stderr)
        return result

    async def run_detached(
        self,
        network: str,
        rootfs: str | Path,
        *command: str,
        name: str | None = None,
        options: Sequence[str] = (),
    ) -> str:
        """``podman run -d --network NETWORK [options] --rootfs ROOTFS COMMAND``; the container id."""
        args = ["run", "-d", "--network", network, "--cgroup-parent", self.setup.cgroup_parent]
        if name:
            args += ["--name", name]
        # --rootfs takes no value: ROOTFS is the image position, so it and COMMAND come last.
        args += [*options, "--rootfs", str(rootfs), *command]
        result = await self.run(*args)
        container_id = result.stdout.strip().splitlines()[-1]
        self.containers.append(container_id)
        return container_id

    async def inspect(self, ref: str) -> dict[str, Any]:
        data = json.loads((await self.run("inspect", ref)).stdout)
        return dict(data[0])

    async def netns_path(self, ref: str) -> str:
        """The container's network namespace path (what podman passed as CNI_NETNS)."""
        return str((await self.inspect(ref))["NetworkSettings"]["SandboxKey"])

    async def stop(self, ref: str, timeout: int = 1) -> None:
        await self.run("stop", "-t", str(timeout), ref)

    async def rm(self, ref: str, force: bool = True) -> None:
        await self.run("rm", *(["-f", "-t", "0"] if force else []), ref)
        with contextlib.suppress(ValueError):
            self.containers.remove(ref)

    async def cleanup(self) -> None:
        """Remove every container (podman runs the CNI DELs), then the private directory.

        Mounts left below the directory by a failed removal are detached first, so nothing of
        the test outlives it.
        """
        with contextlib.suppress(PodmanError, OSError):
            await self.run("rm", "-a", "-f", "-t", "0", check=False)
        # conmon outlives the container briefly and then runs podman's clean-up, which writes
        # below base: wait until nothing is left in the set-up's cgroups before deleting.
        await _wait_cgroups_empty(self.setup.cgroup_parent, timeout=30.0)
        base = str(self.setup.base.resolve())
        for mountpoint in sorted(_mounts_below(base), key=len, reverse=True):
            subprocess.run(["umount", "-l", mountpoint], check=False, capture_output=True)
        _remove_cgroups(self.setup.cgroup_parent)
        shutil.rmtree(self.setup.base, ignore_errors=True)


CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_dirs(parent: str, cgroup_root: Path = CGROUP_ROOT) -> list[str]:
    """The cgroup ``parent`` and its children in v2 and every v1 hierarchy, deepest first."""
    if not cgroup_root.is_dir() or not parent.strip("/"):
        return []
    found: list[str] = []
    for root in [cgroup_root, *(p for p in cgroup_root.iterdir() if p.is_dir())]:
        top = root / parent.strip("/")
        if top.is_dir():
            found += [dirpath for dirpath, _dirs, _files in os.walk(top)]
    return sorted(found, key=len, reverse=True)


async def _wait_cgroups_empty(parent: str, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        busy = False
        for directory in _cgroup_dirs(parent):
            with contextlib.suppress(OSError):
                busy = busy or bool(Path(directory, "cgroup.procs").read_text().strip())
        if not busy:
            return
        await asyncio.sleep(0.1)


def _remove_cgroups(parent: str) -> None:
    for directory in _cgroup_dirs(parent):
        with contextlib.suppress(OSError):
            os.rmdir(directory)


def _mounts_below(base: str) -> list[str]:
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mountpoint = line.split()[4].replace("\\040", " ")
            if mountpoint == base or mountpoint.startswith(base + "/"):
                mounts.append(mountpoint)
    return mounts


@contextlib.asynccontextmanager
async def podman_session(
    base: str | Path,
    conflists: Sequence[Mapping[str, Any]],
    *,
    plugin_dirs: Sequence[str | Path] = (),
    extra_env: Mapping[str, str] | None = None,
    launcher: Sequence[str] = (),
) -> AsyncIterator[Podman]:
    """A private podman whose CNI configuration directory holds ``conflists``; cleaned up on exit.

    The first conflist is podman's default network. ``base`` should be a fresh directory.
    ``launcher`` prefixes every podman command (see :attr:`PodmanSetup.launcher`).
    """
    if not conflists:
        raise ValueError("podman_session needs at least one conflist")
    setup = PodmanSetup(
        base=Path(base),
        plugin_dirs=tuple(Path(p) for p in plugin_dirs),
        default_network=str(conflists[0]["name"]),
        extra_env=dict(extra_env or {}),
        launcher=tuple(launcher),
    )
    setup.write()
    for conflist in conflists:
        write_conflist(setup.network_dir, conflist)
    podman = Podman(setup)
    try:
        yield podman
    finally:
        await podman.cleanup()
