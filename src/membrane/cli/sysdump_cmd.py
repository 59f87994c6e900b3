"""``membrane sysdump``: collect logs, datapath state, agent status, the store and flows into one archive.

In a lab (``--lab NAME`` or the only running lab) every node namespace is one node of the dump;
otherwise this host is, with its agent found through ``--config`` (default
``/etc/membrane/agent.yaml`` when it exists) and its log in the journal or ``--agent-log``.
What could not be collected is listed in the archive; the command fails only when it cannot
write the archive at all.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from membrane.cli.context import CliContext, pass_cli
from membrane.core.errors import MembraneError

HOST_CONFIG = Path("/etc/membrane/agent.yaml")


@click.command("sysdump")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Archive to write (default: ./membrane-sysdump-<UTC time>.tar.gz).")
@click.option("--flows", "flow_count", default=1000, show_default=True, type=click.IntRange(min=0),
              help="How many of each node's last flows to include (0: none).")
@click.option("--server", metavar="ADDR", help="A relay's address: also include the cluster's last flows.")
@click.option("--agent-log", type=click.Path(dir_okay=False, path_type=Path),
              help="On a host: the agent's log file (default: the journal of membrane-agent.service).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="On a host: the agent's config (default /etc/membrane/agent.yaml when it exists).")
@pass_cli
def sysdump(cli: CliContext, output: Path | None, flow_count: int, server: str | None, agent_log: Path | None,
            config_file: Path | None) -> None:
    """Write one archive with what is needed to investigate a problem (as cilium sysdump)."""
    from membrane.host.sysdump import (
        HostSources,
        NodeTarget,
        archive_name,
        cluster_items,
        collect,
        node_items,
        redact_url,
        write_archive,
    )
    from membrane.lab.host import netns_path

    now = datetime.now(UTC)
    name = archive_name(now)
    output = output or Path(name)
    try:
        lab = cli.lab_record()
        if lab is not None:
            targets = [NodeTarget(n.name, netns_path(n.netns), n.socket, f"unix:{n.run_dir / 'observer.sock'}", n.log)
                       for n in lab.nodes]
            store_url, source = cli.store_url(), f"lab {lab.name}"
        else:
            from membrane.agent.config import load_agent_config

            path = config_file or (HOST_CONFIG if HOST_CONFIG.is_file() else None)
            config = load_agent_config(path)
            targets = [NodeTarget(config.nodeName if path else socket.gethostname(), None, config.api_socket,
                                  f"unix:{config.runDir / 'observer.sock'}", agent_log)]
            explicit = cli.store_flag is not None or "MEMBRANE_STORE" in os.environ
            store_url = cli.store_url() if explicit or path is None else config.store
            source = "host"
    except MembraneError as exc:
        for line in str(exc).splitlines():
            click.echo(f"Error: {line}", err=True)
        sys.exit(1)

    async def run() -> tuple[dict[str, bytes], list[tuple[str, str]]]:
        sources = HostSources(store_url)
        try:
            items = cluster_items(sources, server, flow_count)
            for target in targets:
                items += node_items(target, sources, flow_count)
            return await collect(items)
        finally:
            await sources.close()

    files, errors = asyncio.run(run())
    summary: dict[str, Any] = {
        "created": now.isoformat(timespec="seconds"),
        "source": source,
        "store": redact_url(store_url),
        "nodes": [t.name for t in targets],
        "flows": flow_count,
        "collected": sorted(files),
        "errors": [{"item": item, "reason": reason} for item, reason in errors],
    }
    top = name.removesuffix(".tar.gz")
    try:
        write_archive(output, top, files, summary)
    except OSError as exc:
        click.echo(f"Error: cannot write {output}: {exc.strerror or exc}", err=True)
        sys.exit(1)
    for item, reason in errors:
        click.echo(f"Warning: {item} not collected: {reason}", err=True)
    click.echo(str(output))


COMMANDS = [sysdump]
