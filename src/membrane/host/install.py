"""``membrane install`` / ``uninstall``: put a host in service, and take it out again exactly.

:func:`plan_install` is pure: it turns :class:`InstallOptions` into the files to write (systemd
units for the agent and optionally the relay, ``/etc/membrane/agent.yaml``, the CNI conflist with
membrane-cni first and portmap chained, the plugin's symlink in the runtimes' plugin directories)
and the directories they need. :class:`Installer` applies a plan under a root directory (``/`` on
a host, a temporary directory in tests) and records in a manifest
(``/var/lib/membrane/install-manifest.json``) every file it wrote with its SHA-256 (or its link
target), every directory it created, and what a forced install replaced. ``uninstall`` reads the
manifest back and removes exactly that: a file changed since is kept (and named) unless forced, a
replaced file is put back, a directory goes only when empty.

Files are written to a temporary name and renamed, so a runtime never reads half a conflist.

Primitives: :class:`InstallOptions`, :class:`Plan`, :class:`PlannedFile`, :func:`plan_install`,
:class:`Installer`, :class:`InstallReport`, :class:`UninstallReport`, :func:`systemd_running`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from membrane.cni.conflist import PORTMAP, membrane_conflist
from membrane.core.config import DEFAULT_RUN_DIR, DEFAULT_STATE_DIR
from membrane.core.errors import AlreadyExists, InvalidInput, MembraneError, NotFound

ETC_DIR = PurePosixPath("/etc/membrane")
AGENT_CONFIG = ETC_DIR / "agent.yaml"
UNIT_DIR = PurePosixPath("/etc/systemd/system")
AGENT_UNIT = "membrane-agent.service"
RELAY_UNIT = "membrane-relay.service"
CNI_CONF_DIR = PurePosixPath("/etc/cni/net.d")
CONFLIST_NAME = "membrane"
CONFLIST = CNI_CONF_DIR / "05-membrane.conflist"
CNI_BIN_DIRS = (PurePosixPath("/opt/cni/bin"),)
# Debian's podman looks for plugins here; linked only when the directory exists already.
DEBIAN_CNI_BIN_DIR = PurePosixPath("/usr/lib/cni")
STATE_DIR = PurePosixPath(str(DEFAULT_STATE_DIR))
RUN_DIR = PurePosixPath(str(DEFAULT_RUN_DIR))
MANIFEST = STATE_DIR / "install-manifest.json"
SYSTEMD_RUNNING_MARK = Path("/run/systemd/system")
DEFAULT_RELAY_LISTEN = "127.0.0.1:4245"


@dataclass(frozen=True)
class InstallOptions:
    membrane_bin: Path  # absolute path of the ``membrane`` executable the units run
    cni_bin: Path  # absolute path of the ``membrane-cni`` executable the runtimes run
    store: str | None = None
    node_name: str | None = None
    node_ip: str | None = None
    relay: bool = False
    relay_listen: str = DEFAULT_RELAY_LISTEN


@dataclass(frozen=True)
class PlannedFile:
    path: PurePosixPath  # where on the host (below the install root)
    content: str | None = None  # a regular file's text, or
    link: str | None = None  # a symlink's target
    mode: int = 0o644


@dataclass(frozen=True)
class Plan:
    files: tuple[PlannedFile, ...]
    # Directories the files need, parents first; each is created (and recorded) only when missing.
    dirs: tuple[tuple[PurePosixPath, int], ...]
    units: tuple[str, ...]

    def file(self, path: PurePosixPath) -> PlannedFile:
        return next(f for f in self.files if f.path == path)


# -- what is written ---------------------------------------------------------------------------------

def _quote(argv: list[str]) -> str:
    # systemd's command-line quoting accepts the shell's single quotes.
    return " ".join(shlex.quote(a) for a in argv)


def agent_exec_start(options: InstallOptions) -> list[str]:
    return [str(options.membrane_bin), "agent", "--config", str(AGENT_CONFIG)]


def relay_exec_start(options: InstallOptions) -> list[str]:
    argv = [str(options.membrane_bin), "relay", "--listen", options.relay_listen]
    return [*argv, "--store", agent_store_url(options)]


def agent_store_url(options: InstallOptions) -> str:
    return options.store or f"sqlite://{STATE_DIR / 'store.db'}"


def agent_unit_text(options: InstallOptions) -> str:
    return f"""\
# Written by membrane install; membrane uninstall removes it.
[Unit]
Description=membrane agent: container networking, network policy and flow visibility
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
ExecStart={_quote(agent_exec_start(options))}
Restart=always
RestartSec=2
# Pods run in their own sessions: stopping or restarting the agent must not kill them.
KillMode=process
TimeoutStopSec=30

[Install]
WantedBy=multi-user.target
"""


def relay_unit_text(options: InstallOptions) -> str:
    return f"""\
# Written by membrane install; membrane uninstall removes it.
[Unit]
Description=membrane relay: the cluster-wide Observer API
Wants=network-online.target
After=network-online.target {AGENT_UNIT}

[Service]
Type=simple
ExecStart={_quote(relay_exec_start(options))}
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
"""


def agent_config_text(options: InstallOptions) -> str:
    settings: dict[str, Any] = {}
    if options.node_name:
        settings["nodeName"] = options.node_name
    settings["store"] = agent_store_url(options)
    settings["stateDir"] = str(STATE_DIR)
    settings["runDir"] = str(RUN_DIR)
    if options.node_ip:
        settings["nodeIP"] = options.node_ip
    if options.relay:
        # The CLI on this host reads it: membrane observe shows the whole cluster by default.
        settings["hubble"] = {"relayAddress": options.relay_listen}
    # Refuse what the agent would refuse at start, naming the field, before anything is written.
    from membrane.agent.config import load_agent_config

    load_agent_config(None, **settings)
    header = "# Written by membrane install; membrane uninstall removes it unless changed.\n"
    return header + yaml.safe_dump(settings, sort_keys=False)


def conflist_text() -> str:
    conflist = membrane_conflist(
        CONFLIST_NAME,
        agent_socket=str(RUN_DIR / "agent.sock"),
        del_queue_dir=str(RUN_DIR / "cni-del-queue"),
        chained=[PORTMAP],
    )
    return json.dumps(conflist, indent=2) + "\n"


def plan_install(options: InstallOptions, root: Path) -> Plan:
    """Everything ``install`` writes. ``root`` only decides whether Debian's plugin directory exists."""
    for what, path in (("membrane", options.membrane_bin), ("membrane-cni", options.cni_bin)):
        if not path.is_absolute():
            raise InvalidInput([f"the {what} executable must be an absolute path, not {path}"])
    files = [
        PlannedFile(UNIT_DIR / AGENT_UNIT, agent_unit_text(options)),
        PlannedFile(AGENT_CONFIG, agent_config_text(options)),
        PlannedFile(CONFLIST, conflist_text()),
    ]
    if options.relay:
        files.append(PlannedFile(UNIT_DIR / RELAY_UNIT, relay_unit_text(options)))
    bin_dirs = list(CNI_BIN_DIRS)
    if _under(root, DEBIAN_CNI_BIN_DIR).is_dir():
        bin_dirs.append(DEBIAN_CNI_BIN_DIR)
    files += [PlannedFile(d / "membrane-cni", link=str(options.cni_bin)) for d in bin_dirs]
    dirs = [(ETC_DIR, 0o755), (UNIT_DIR, 0o755), (CNI_CONF_DIR, 0o755), *((d, 0o755) for d in bin_dirs),
            (STATE_DIR, 0o700), (RUN_DIR, 0o755)]
    units = (AGENT_UNIT, RELAY_UNIT) if options.relay else (AGENT_UNIT,)
    return Plan(tuple(files), tuple(dirs), units)


def systemd_running(root: Path) -> bool:
    """systemd manages this host (and the install targets it, not a directory elsewhere)."""
    return root == Path("/") and SYSTEMD_RUNNING_MARK.is_dir()


# -- applying it -------------------------------------------------------------------------------------

def _under(root: Path, path: PurePosixPath) -> Path:
    return root / str(path).lstrip("/")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class InstallReport:
    written: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    replaced: list[Path] = field(default_factory=list)  # someone else's file, replaced with --force
    created_dirs: list[Path] = field(default_factory=list)
    manifest: Path | None = None


@dataclass
class UninstallReport:
    removed: list[Path] = field(default_factory=list)
    restored: list[Path] = field(default_factory=list)  # what a forced install had replaced
    kept: list[Path] = field(default_factory=list)  # changed since install, not forced
    removed_dirs: list[Path] = field(default_factory=list)
    kept_dirs: list[Path] = field(default_factory=list)  # not empty
    units: tuple[str, ...] = ()


class Installer:
    """Applies a :class:`Plan` below ``root`` and removes what the manifest says it wrote."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def real(self, path: PurePosixPath) -> Path:
        return _under(self.root, path)

    @property
    def manifest_path(self) -> Path:
        return self.real(MANIFEST)

    def read_manifest(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise InvalidInput([f"{self.manifest_path}: unreadable install manifest: {exc}"]) from None
        if not isinstance(data, dict) or data.get("version") != 1:
            raise InvalidInput([f"{self.manifest_path}: not an install manifest of this version"])
        return data

    # -- install -------------------------------------------------------------------------------------
    def _current(self, path: Path) -> dict[str, Any] | None:
        """What is at ``path`` now, in manifest form; None when nothing is."""
        if path.is_symlink():
            return {"link": os.readlink(path)}
        if path.is_file():
            data = path.read_bytes()
            return {"sha256": _sha256(data), "data": data}
        if path.exists():
            return {"other": True}
        return None

    def check(self, plan: Plan, *, force: bool) -> list[str]:
        """Why the plan cannot be applied without ``--force``: one line per file, naming it."""
        old = {e["path"]: e for e in (self.read_manifest() or {}).get("files", [])}
        problems = []
        for planned in plan.files:
            real = self.real(planned.path)
            now = self._current(real)
            if now is None or _same(now, planned) or _ours_unchanged(now, old.get(str(planned.path))):
                continue
            if "other" in now:
                problems.append(f"{real} exists and is not a file or a link")
            elif force:
                continue
            elif planned.path == CONFLIST:
                problems.append(f"{real}: a different CNI conflist of this name exists (--force replaces it)")
            elif str(planned.path) in old:
                problems.append(f"{real} was changed since membrane install (--force replaces it)")
            else:
                problems.append(f"{real} exists with other contents (--force replaces it)")
        if not force:
            problems += self._other_membrane_networks()
        return problems

    def _other_membrane_networks(self) -> list[str]:
        """Another conflist defining a network called ``membrane``: runtimes would pick one of the two."""
        conf_dir = self.real(CNI_CONF_DIR)
        found = []
        with contextlib.suppress(OSError):
            for entry in sorted(conf_dir.iterdir()):
                if entry.name == CONFLIST.name or entry.suffix not in (".conflist", ".conf", ".json"):
                    continue
                try:
                    data = json.loads(entry.read_text())
                except (OSError, ValueError):
                    continue
                if isinstance(data, dict) and data.get("name") == CONFLIST_NAME:
                    found.append(f"{entry}: a different CNI conflist named {CONFLIST_NAME!r} exists "
                                 "(--force installs alongside it)")
        return found

    def install(self, plan: Plan, *, force: bool = False) -> InstallReport:
        problems = self.check(plan, force=force)
        if problems:
            raise AlreadyExists(problems[0]) if len(problems) == 1 else InvalidInput(problems)
        previous = self.read_manifest() or {"files": [], "dirs": []}
        old = {e["path"]: e for e in previous["files"]}
        report = InstallReport()
        created: list[str] = list(previous["dirs"])
        self.root.mkdir(parents=True, exist_ok=True)
        for path, mode in plan.dirs:
            for made in self._make_dirs(path, mode):
                created.append(str(made))
                report.created_dirs.append(self.real(made))
        entries = []
        for planned in plan.files:
            real = self.real(planned.path)
            now = self._current(real)
            entry: dict[str, Any] = {"path": str(planned.path)}
            if planned.link is not None:
                entry["link"] = planned.link
            else:
                assert planned.content is not None
                entry["sha256"] = _sha256(planned.content.encode())
            prior = old.get(str(planned.path))
            if now is not None and _same(now, planned):
                if prior is None:
                    report.unchanged.append(real)  # there before us: not ours to remove
                    continue
                entries.append({**entry, **_replaced_part(prior)})
                report.unchanged.append(real)
                continue
            if prior is not None and _ours_unchanged(now, prior):
                entry.update(_replaced_part(prior))
            elif now is not None:
                entry["replaced"] = _backup(now)  # forced: put back on uninstall
                report.replaced.append(real)
            _write(real, planned)
            entries.append(entry)
            report.written.append(real)
        # Entries of an earlier install this plan no longer has (e.g. no --relay now) stay recorded.
        planned_paths = {str(f.path) for f in plan.files}
        entries += [e for p, e in old.items() if p not in planned_paths]
        manifest = {"version": 1, "files": entries, "dirs": created}
        _atomic_write(self.manifest_path, json.dumps(manifest, indent=2) + "\n", 0o600)
        report.manifest = self.manifest_path
        return report

    def _make_dirs(self, path: PurePosixPath, mode: int) -> list[PurePosixPath]:
        missing = [p for p in [*reversed(path.parents), path] if str(p) != "/" and not self.real(p).exists()]
        for made in missing:
            self.real(made).mkdir(mode=mode if made == path else 0o755)
            os.chmod(self.real(made), mode if made == path else 0o755)  # the umask must not narrow it
        return missing

    # -- uninstall -----------------------------------------------------------------------------------
    def uninstall(self, *, force: bool = False) -> UninstallReport:
        manifest = self.read_manifest()
        if manifest is None:
            raise NotFound(f"nothing to uninstall: no install manifest at {self.manifest_path}")
        report = UninstallReport()
        report.units = tuple(PurePosixPath(e["path"]).name for e in manifest["files"]
                             if PurePosixPath(e["path"]).parent == UNIT_DIR)
        kept_entries = []
        for entry in reversed(manifest["files"]):
            real = self.real(PurePosixPath(entry["path"]))
            now = self._current(real)
            if now is not None and not _ours_unchanged(now, entry) and not force:
                report.kept.append(real)
                kept_entries.append(entry)
                continue
            if now is not None:
                real.unlink()
            if "replaced" in entry:
                _restore(real, entry["replaced"])
                report.restored.append(real)
            elif now is not None:
                report.removed.append(real)
        if kept_entries:
            manifest["files"] = list(reversed(kept_entries))
            _atomic_write(self.manifest_path, json.dumps(manifest, indent=2) + "\n", 0o600)
        else:
            self.manifest_path.unlink()
        for directory in reversed(manifest["dirs"]):
            real = self.real(PurePosixPath(directory))
            try:
                real.rmdir()
                report.removed_dirs.append(real)
            except FileNotFoundError:
                continue
            except OSError:
                report.kept_dirs.append(real)
        return report


def _same(now: dict[str, Any], planned: PlannedFile) -> bool:
    if planned.link is not None:
        return bool(now.get("link") == planned.link)
    assert planned.content is not None
    return bool(now.get("sha256") == _sha256(planned.content.encode()))


def _ours_unchanged(now: dict[str, Any] | None, entry: dict[str, Any] | None) -> bool:
    """``now`` is what an earlier install wrote, untouched since."""
    if now is None or entry is None:
        return False
    if "link" in entry:
        return bool(now.get("link") == entry["link"])
    return bool(now.get("sha256") == entry.get("sha256"))


def _replaced_part(entry: dict[str, Any]) -> dict[str, Any]:
    return {"replaced": entry["replaced"]} if "replaced" in entry else {}


def _backup(now: dict[str, Any]) -> dict[str, Any]:
    if "link" in now:
        return {"link": now["link"]}
    return {"data": base64.b64encode(now["data"]).decode()}


def _restore(path: Path, backup: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if "link" in backup:
        path.symlink_to(backup["link"])
    else:
        path.write_bytes(base64.b64decode(backup["data"]))


def _write(path: Path, planned: PlannedFile) -> None:
    if planned.link is not None:
        tmp = path.with_name(f".{path.name}.membrane-tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(planned.link)
        os.replace(tmp, path)
        return
    assert planned.content is not None
    _atomic_write(path, planned.content, planned.mode)


def _atomic_write(path: Path, text: str, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def require_root(root: Path) -> None:
    """Writing to the host itself needs root; a ``--root`` directory needs only write access."""
    if root == Path("/") and os.geteuid() != 0:
        raise MembraneError("membrane install writes to /etc, /opt and /var: run it as root (or pass --root DIR)")
