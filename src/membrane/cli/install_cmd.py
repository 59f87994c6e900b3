"""``membrane install`` / ``membrane uninstall``: put this host in service as a membrane node.

What is written and how it is undone is :mod:`membrane.host.install`. Services are started
(``systemctl daemon-reload``, ``enable --now``) only when installing to ``/`` on a host that
systemd runs; otherwise the command prints what to run instead.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import click

from membrane.core.errors import MembraneError


def _echo_error(exc: MembraneError) -> None:
    for line in str(exc).splitlines() or [type(exc).__name__]:
        click.echo(f"Error: {line}", err=True)
    sys.exit(1)


def find_executable(name: str, bin_dir: Path | None) -> Path:
    """``name`` next to the running interpreter (the installed package's entry points), else on PATH."""
    candidates = [bin_dir / name] if bin_dir is not None else [Path(sys.executable).parent / name]
    if bin_dir is None and (found := shutil.which(name)):
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and candidate.stat().st_mode & 0o111:
            return candidate.absolute()
    where = bin_dir or Path(sys.executable).parent
    raise MembraneError(f"cannot find the {name} executable in {where} or on PATH (pass --bin-dir DIR)")


def _systemctl(*args: str) -> None:
    result = subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise MembraneError(f"systemctl {' '.join(args)} failed: {result.stderr.strip() or result.returncode}")


@click.command("install")
@click.option("--store", "store_url", metavar="URL",
              help="Cluster store the agent uses (default sqlite:///var/lib/membrane/store.db).")
@click.option("--node", "node_name", help="This node's name (default: the host name).")
@click.option("--node-ip", help="This node's underlay address (default: the default route's).")
@click.option("--relay", is_flag=True, help="Also install the relay's unit (membrane-relay.service).")
@click.option("--relay-listen", default="127.0.0.1:4245", show_default=True, metavar="HOST:PORT")
@click.option("--bin-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the membrane and membrane-cni executables are (default: next to this Python).")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("/"),
              help="Write everything below DIR instead of / (services are then not started).")
@click.option("--dry-run", is_flag=True, help="Print every file it would write, with contents; write nothing.")
@click.option("--force", is_flag=True, help="Replace files of the same name (uninstall puts them back).")
def install(store_url: str | None, node_name: str | None, node_ip: str | None, relay: bool, relay_listen: str,
            bin_dir: Path | None, root: Path, dry_run: bool, force: bool) -> None:
    """Install this host's agent: systemd unit, agent config, CNI conflist and plugin, directories."""
    from membrane.host.install import (
        Installer,
        InstallOptions,
        agent_exec_start,
        plan_install,
        require_root,
        systemd_running,
    )

    root = root.absolute()
    try:
        options = InstallOptions(
            membrane_bin=find_executable("membrane", bin_dir), cni_bin=find_executable("membrane-cni", bin_dir),
            store=store_url, node_name=node_name, node_ip=node_ip, relay=relay, relay_listen=relay_listen,
        )
        plan = plan_install(options, root)
        installer = Installer(root)
        if dry_run:
            problems = installer.check(plan, force=force)
            for directory, _mode in plan.dirs:
                if not installer.real(directory).exists():
                    click.echo(f"# directory {installer.real(directory)}")
            for planned in plan.files:
                real = installer.real(planned.path)
                if planned.link is not None:
                    click.echo(f"# symlink {real} -> {planned.link}")
                else:
                    click.echo(f"# file {real} (mode {planned.mode:o})")
                    click.echo(planned.content, nl=False)
            click.echo(f"# file {installer.manifest_path} (what was written, for membrane uninstall)")
            for problem in problems:
                click.echo(f"Error: {problem}", err=True)  # what the install itself would refuse
            if problems:
                sys.exit(1)
            return
        require_root(root)
        report = installer.install(plan, force=force)
    except MembraneError as exc:
        _echo_error(exc)
        return
    for path in report.created_dirs:
        click.echo(f"created {path}/")
    for path in report.written:
        click.echo(f"wrote {path}" + (" (replaced the file there; uninstall puts it back)"
                                      if path in report.replaced else ""))
    for path in report.unchanged:
        click.echo(f"unchanged {path}")
    click.echo(f"recorded in {report.manifest}")
    units = " ".join(plan.units)
    if root != Path("/"):
        click.echo(f"services not started (--root): on that system run 'systemctl daemon-reload && "
                   f"systemctl enable --now {units}'")
    elif systemd_running(root):
        try:
            _systemctl("daemon-reload")
            _systemctl("enable", "--now", *plan.units)
        except MembraneError as exc:
            _echo_error(exc)
        click.echo(f"started {units}")
    else:
        command = " ".join(agent_exec_start(options))
        click.echo(f"systemd is not running on this host: start the agent with '{command}' "
                   "(as root, kept running by your service manager)")


@click.command("uninstall")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("/"),
              help="Remove what 'install --root DIR' wrote.")
@click.option("--force", is_flag=True, help="Also remove files changed since install.")
def uninstall(root: Path, force: bool) -> None:
    """Remove exactly what 'membrane install' wrote (files changed since are kept unless --force)."""
    from membrane.host.install import Installer, require_root, systemd_running

    root = root.absolute()
    installer = Installer(root)
    try:
        require_root(root)
        manifest = installer.read_manifest()
        if manifest is not None and systemd_running(root):
            # Stop the services before their units go; a failure here is not fatal (already stopped).
            units = [Path(e["path"]).name for e in manifest["files"] if e["path"].endswith(".service")]
            subprocess.run(["systemctl", "disable", "--now", *units], capture_output=True, check=False)
        report = installer.uninstall(force=force)
        if manifest is not None and systemd_running(root):
            subprocess.run(["systemctl", "daemon-reload"], capture_output=True, check=False)
    except MembraneError as exc:
        _echo_error(exc)
        return
    for path in report.removed:
        click.echo(f"removed {path}")
    for path in report.restored:
        click.echo(f"restored {path} (the file install had replaced)")
    for path in report.removed_dirs:
        click.echo(f"removed {path}/")
    for path in report.kept_dirs:
        click.echo(f"kept {path}/: not empty")
    if root == Path("/") and not systemd_running(root) and report.units:
        click.echo("systemd is not running on this host: stop the agent you started by hand yourself")
    if report.kept:
        for path in report.kept:
            click.echo(f"Error: kept {path}: changed since membrane install (--force removes it)", err=True)
        sys.exit(1)


COMMANDS = [install, uninstall]
