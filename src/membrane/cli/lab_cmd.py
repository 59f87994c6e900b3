"""``membrane lab up|status|restart|down|exec``: build, inspect, restart, remove and enter a lab.

Which lab ``status``, ``down`` and ``exec`` mean: ``--name``, else ``membrane --lab NAME`` (or
``MEMBRANE_LAB``), else the only lab there is. The renderers (:func:`render_progress`,
:func:`render_summary`, :func:`render_status`) are pure so their text is tested as is.

The lab's steps are sequential and blocking (``ip``, process start-up, health polls); the commands
are coroutines only to share the CLI's error handling, and nothing else runs on their loop.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

import click

from membrane.cli.context import CliContext, fail, pass_cli, run_async
from membrane.core.errors import MembraneError
from membrane.lab import Lab, LabStatus, Progress
from membrane.lab.host import real_host
from membrane.lab.lab import Supervision
from membrane.lab.plan import DEFAULT_LAB_NAME, MAX_NODES, Routing, StoreKind
from membrane.lab.registry import find_lab
from membrane.lab.state import LabDirs, LabRecord, read_all_records

BAR_WIDTH = 24


def render_progress(progress: Progress, width: int = BAR_WIDTH) -> str:
    filled = width * progress.step // progress.total
    return f"[{'#' * filled}{'-' * (width - filled)}] {progress.step}/{progress.total} {progress.label}"


class ProgressPrinter:
    """On a terminal, one line redrawn in place; otherwise one plain line per step (for logs)."""

    def __init__(self, stream: TextIO, tty: bool) -> None:
        self._stream = stream
        self._tty = tty
        self._open_line = False

    def __call__(self, progress: Progress) -> None:
        if self._tty:
            self._stream.write("\r\x1b[2K" + render_progress(progress))
            self._open_line = True
        else:
            self._stream.write(f"[{progress.step}/{progress.total}] {progress.label}\n")
        self._stream.flush()

    def finish(self) -> None:
        if self._open_line:
            self._stream.write("\n")
            self._stream.flush()
            self._open_line = False


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _nodes(count: int) -> str:
    return f"{count} node{'s' if count != 1 else ''}"


def render_summary(record: LabRecord) -> str:
    rows = []
    for node in record.nodes:
        agent = f"agent pid {node.agent.pid}" if node.agent else "no agent"
        rows.append([node.name, f"netns {node.netns}", node.ip, agent])
    if record.client is not None:
        rows.append([record.client.name, f"netns {record.client.netns}", record.client.ip, "outside the cluster"])
    prefixlen = record.subnet.split("/")[1]
    rows.append(["underlay", f"netns {record.underlay_netns}", f"{record.gateway}/{prefixlen}", "bridge br0, gateway"])
    for member in record.etcd.members if record.etcd else ():
        pid = f"pid {member.process.pid}" if member.process else "not started"
        rows.append([member.name, f"netns {record.underlay_netns}", member.endpoint, f"etcd member, {pid}"])
    if record.relay is not None:
        rows.append(["relay", "root netns", record.relay.address, "Observer API of the whole cluster"])
    store = [f"  store        {record.store_url}"]
    if record.etcd is not None:
        store = [
            f"  store        {record.store_url} (forwarded to the underlay; agents use {record.agent_store_url})",
            f"  etcd logs    {record.state_dir}/etcd-*.log",
        ]
    flag = f"--lab {record.name}"
    return "\n".join(
        [
            f"lab {record.name} is up: {_nodes(len(record.nodes))}, {record.routing} routing, "
            f"{record.store_kind} store",
            "",
            *("  " + line for line in _table(rows)),
            "",
            *store,
            f"  agent logs   {record.state_dir}/agent-node*.log",
            *(
                [f"  relay        {record.relay.address} (membrane observe uses it; hubble observe --server "
                 f"{record.relay.address})"]
                if record.relay is not None
                else []
            ),
            "",
            "Use it:",
            f"  membrane {flag} status",
            *([f"  membrane {flag} observe --last 20"] if record.relay is not None else []),
            f"  membrane {flag} pod run web -n default -- busybox httpd -f -p 80",
            f"  membrane lab exec --name {record.name} node1 -- ip addr",
            f"  membrane lab down --name {record.name}",
        ]
    )


def render_status(status: LabStatus) -> str:
    record = status.record
    head = (
        f"lab {record.name}: {record.phase}, {_nodes(len(record.nodes))}, {record.routing} routing, "
        f"underlay {record.subnet} (netns {record.underlay_netns}), store {record.store_url}"
    )
    rows = [["MEMBER", "NETNS", "IP", "AGENT PID", "AGENT", "RESTARTS", "LAST EXIT"]]
    for m in status.members:
        netns = m.netns if m.netns_present else f"{m.netns} (missing)"
        pid = str(m.agent_pid) if m.agent_pid is not None else "-"
        rows.append([m.name, netns, m.ip, pid, _agent_state(m.agent, m.supervision), *_restarts(m.supervision)])
    lines = [head, *_table(rows)]
    if (relay := status.relay) is not None:
        relay_rows = [["RELAY", "PID", "STATE", "RESTARTS", "LAST EXIT"]]
        pid = str(relay.pid) if relay.pid is not None else "-"
        relay_rows.append([relay.address, pid, _agent_state(relay.state, relay.supervision),
                           *_restarts(relay.supervision)])
        lines += _table(relay_rows)
    if status.store:
        store_rows = [["STORE", "ENDPOINT", "PID", "STATE"]]
        for p in status.store:
            store_rows.append([p.name, p.endpoint, str(p.pid) if p.pid is not None else "-", p.state])
        lines += _table(store_rows)
    return "\n".join(lines)


def _agent_state(state: str, supervision: Supervision | None) -> str:
    if supervision is None or supervision.supervised:
        if state == "restarting" and supervision is not None and supervision.next_start_in is not None:
            return f"restarting in {supervision.next_start_in:g} s"
        return state
    return f"{state}, unsupervised"


def _restarts(supervision: Supervision | None) -> list[str]:
    """RESTARTS (after exits; ``+N by lab restart``) and LAST EXIT."""
    if supervision is None:
        return ["-", "-"]
    count = str(supervision.restarts)
    if supervision.manual_restarts:
        count += f" (+{supervision.manual_restarts} by lab restart)"
    return [count, supervision.last_exit or "-"]


def _lab_name(cli: CliContext, name: str | None) -> str | None:
    return name or cli.lab_flag or os.environ.get("MEMBRANE_LAB") or None


@click.group("lab")
def lab() -> None:
    """A cluster of network namespaces on this machine, each node running the real agent."""


@lab.command("up")
@click.option("--nodes", type=click.IntRange(1, MAX_NODES), default=1, show_default=True, help="Number of nodes.")
@click.option("--routing", type=click.Choice(["vxlan", "native"]), default="vxlan", show_default=True)
@click.option("--store", "store_kind", type=click.Choice(["sqlite", "etcd"]), default="sqlite", show_default=True)
@click.option(
    "--etcd-members",
    type=click.Choice(["1", "3"]),
    default=None,
    help="With --store etcd: members of the etcd cluster (default 1).",
)
# Not offered until the lab has a router (no BGP yet); passing it is refused with one line.
@click.option("--tor", is_flag=True, hidden=True, help="Add an FRR top-of-rack router on the underlay (not yet).")
@click.option("--client", is_flag=True, help="Add a client namespace on the underlay, outside the cluster.")
@click.option("--name", metavar="LAB", help=f"Lab name (default: {DEFAULT_LAB_NAME}).")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="A cluster setting at creation (membrane config get lists them); repeatable.")
@pass_cli
@run_async
async def up(
    cli: CliContext,
    nodes: int,
    routing: Routing,
    store_kind: StoreKind,
    etcd_members: str | None,
    tor: bool,
    client: bool,
    name: str | None,
    assignments: tuple[str, ...],
) -> None:
    """Build a lab and start an agent on every node."""
    from membrane.core.config import parse_settings

    settings = parse_settings(assignments, live_only=False)
    printer = ProgressPrinter(sys.stderr, sys.stderr.isatty())
    try:
        built = Lab.up(
            name or cli.lab_flag or DEFAULT_LAB_NAME,
            nodes,
            routing=routing,
            store=store_kind,
            etcd_members=int(etcd_members or 1),
            tor=tor,
            client=client,
            progress=printer,
            settings=settings,
        )
    finally:
        printer.finish()
    click.echo(render_summary(built.record))


@lab.command("status")
@click.option("--name", metavar="LAB", help="Only this lab (default: every lab).")
@pass_cli
@run_async
async def status(cli: CliContext, name: str | None) -> None:
    """Nodes, namespaces, addresses and agents of the labs."""
    name = _lab_name(cli, name)
    dirs = LabDirs.from_env()
    if name is not None:
        record = find_lab(name, dirs=dirs, flag="--name")
        records = [record] if record else []
    else:
        records, problems = read_all_records(dirs)
        for problem in problems:
            click.echo(f"Warning: {problem}", err=True)
    if not records:
        click.echo("no lab is running (membrane lab up builds one)")
        return
    host = real_host()
    texts = [render_status(Lab(r, dirs=dirs, host=host).status()) for r in records]
    click.echo("\n\n".join(texts))


@lab.command("restart")
@click.option("--name", metavar="LAB", help="The lab (default: the only lab).")
@click.argument("node", metavar="NODE")
@pass_cli
@run_async
async def restart(cli: CliContext, name: str | None, node: str) -> None:
    """Restart a node's agent on purpose (SIGTERM, wait, start again), as systemctl restart does."""
    built = Lab.open(_lab_name(cli, name))
    ref = built.restart(node)
    click.echo(f"{node}: agent restarted (pid {ref.pid}), answering")


@lab.command("down")
@click.option("--name", metavar="LAB", help="The lab to remove (default: the only lab).")
@pass_cli
@run_async
async def down(cli: CliContext, name: str | None) -> None:
    """Remove every namespace, process and file of a lab."""
    report = Lab.remove(_lab_name(cli, name))
    if not report.found:
        what = f"no lab named {report.name}" if report.name else "no lab is running"
        click.echo(f"{what}: nothing to remove")
        return
    click.echo(
        f"lab {report.name} removed: {len(report.namespaces)} network namespaces, {report.processes} processes stopped"
    )


@lab.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--name", metavar="LAB", help="The lab (default: the only lab).")
@click.argument("member", metavar="node1|…|nodeN|client|underlay")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- CMD [ARGS]...")
@pass_cli
@run_async
async def exec_(cli: CliContext, name: str | None, member: str, argv: tuple[str, ...]) -> None:
    """Run a command inside a namespace of the lab; exits with the command's status."""
    result = Lab.open(_lab_name(cli, name)).exec(member, argv)
    # A command killed by signal N exits 128+N, as a shell reports it.
    sys.exit(result.returncode if result.returncode >= 0 else 128 - result.returncode)


@lab.command("forward", hidden=True)
@click.option("--listen", required=True, metavar="127.0.0.1:PORT")
@click.option("--netns", required=True, metavar="PATH", help="The namespace the upstreams are in.")
@click.option("--upstream", "upstreams", multiple=True, required=True, metavar="HOST:PORT")
def forward(listen: str, netns: str, upstreams: tuple[str, ...]) -> None:
    """The lab's store forwarder (started by 'lab up --store etcd'): 127.0.0.1 here → the underlay."""
    from membrane.lab.etcd import run_forwarder

    try:
        run_forwarder(listen, netns, upstreams)  # its own event loop, until SIGTERM
    except MembraneError as exc:
        fail(str(exc))


DEMOS = ("starwars",)


@lab.command("demo")
@click.argument("scenario", type=click.Choice(DEMOS), default="starwars")
@click.option("--name", metavar="LAB", help="The lab (default: the only lab).")
@pass_cli
@run_async
async def demo(cli: CliContext, scenario: str, name: str | None) -> None:
    """Deploy an example application into a running lab and show it working."""
    from membrane.lab.demo import run_demo

    await run_demo(Lab.open(_lab_name(cli, name)), scenario, click.echo)


COMMANDS = [lab]
