"""``membrane agent``: run this node's agent in the foreground."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import click

from membrane.agent.config import load_agent_config
from membrane.core.errors import MembraneError
from membrane.core.log import setup_logging


@click.command("agent")
@click.option("--node", "node_name", help="This node's name (default: the host name).")
@click.option("--store", "store_url", metavar="URL", help="sqlite:///PATH or etcd://HOST:PORT[,...]")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), help="YAML settings.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), help="Default /var/lib/membrane.")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), help="Default /run/membrane.")
@click.option("--netns-prefix", help="Prefix of the network namespaces made for pods.")
@click.option("--node-ip", help="This node's underlay address (default: the default route's).")
@click.option("--mtu", type=int, help="Pod interface MTU (default: uplink MTU minus tunnel overhead).")
@click.option("--resync-interval", type=float, metavar="SECONDS",
              help="How often reconcilers read the kernel back and repair drift (default 60).")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@click.pass_context
def agent(
    ctx: click.Context,
    node_name: str | None,
    store_url: str | None,
    config_file: Path | None,
    state_dir: Path | None,
    run_dir: Path | None,
    netns_prefix: str | None,
    node_ip: str | None,
    mtu: int | None,
    resync_interval: float | None,
    log_level: str,
) -> None:
    """Run the agent of this node (as root): endpoints, identities, datapath, pods."""
    # The agent forks pod processes; gRPC's fork handlers only log noise for each (set before grpc loads).
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    from membrane.agent.main import run_agent

    setup_logging(log_level)
    store_default = ctx.obj.store_flag if ctx.obj is not None else None
    try:
        config = load_agent_config(
            config_file, nodeName=node_name, store=store_url or store_default, stateDir=state_dir,
            runDir=run_dir, netnsPrefix=netns_prefix, nodeIP=node_ip, mtu=mtu,
            resyncInterval=resync_interval,
        )
        asyncio.run(run_agent(config))
    except MembraneError as exc:
        for line in str(exc).splitlines():
            click.echo(f"Error: {line}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


COMMANDS = [agent]
