"""``membrane relay``: the cluster-wide Observer API (Hubble Relay's role) in the foreground.

It finds the agents' observers through the store (each CiliumNode's ``status.observer``), so it
needs only the store: ``--store URL``, else the global ``--store``/``--lab`` resolution. It stops
on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import click

from membrane.cli.context import CliContext, pass_cli
from membrane.core.errors import MembraneError
from membrane.core.log import setup_logging

DEFAULT_LISTEN = "127.0.0.1:4245"


async def serve_relay(store_url: str, listen: str, ready: asyncio.Event | None = None) -> None:
    """Run a relay until SIGTERM/SIGINT (or until cancelled)."""
    from membrane.observe.relay import Relay, RelayServer
    from membrane.store import open_store

    store = await open_store(store_url)
    relay = Relay(store)
    server = RelayServer(relay, listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    follower = asyncio.create_task(relay.run(), name="relay nodes")
    try:
        await server.start()
        # Print the real address (a port 0 listen picks one), so scripts and tests can connect.
        click.echo(f"relay listening on {server.address}", err=True)
        if ready is not None:
            ready.set()
        done, _ = await asyncio.wait([follower, asyncio.ensure_future(stop.wait())],
                                     return_when=asyncio.FIRST_COMPLETED)
        if follower in done:
            follower.result()  # the store went away: say why
    finally:
        await server.close()
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await relay.close()
        await store.close()


@click.command("relay")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, metavar="HOST:PORT",
              help="Where the relay's Observer API listens.")
@click.option("--store", "store_url", metavar="URL", help="Cluster store (default: the CLI's store resolution).")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@pass_cli
def relay(cli: CliContext, listen: str, store_url: str | None, log_level: str) -> None:
    """Serve the Observer API for every node of the cluster (flows merged by time)."""
    setup_logging(log_level)
    try:
        asyncio.run(serve_relay(store_url or cli.store_url(), listen))
    except MembraneError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:
            click.echo(f"Error: {line}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


COMMANDS = [relay]
