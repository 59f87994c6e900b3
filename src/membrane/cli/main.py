"""The ``membrane`` command: resources, workloads, inspection, flows, daemons, lab."""

from __future__ import annotations

import importlib

import click

from membrane.cli.context import CliContext


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--store", "store_flag", metavar="URL", help="Cluster store (sqlite:///PATH or etcd://HOST:PORT).")
@click.option("--lab", "lab_flag", metavar="NAME", help="Talk to the lab of this name.")
@click.pass_context
def cli(ctx: click.Context, store_flag: str | None, lab_flag: str | None) -> None:
    """membrane: container networking, policy, load balancing and flow visibility."""
    ctx.obj = CliContext(store_flag=store_flag, lab_flag=lab_flag)


# Command modules, imported when the command line is parsed (each exports COMMANDS).
COMMAND_MODULES = ("resources", "pods", "inspect", "agent_cmd", "lab_cmd", "observe_cmd", "relay_cmd",
                   "policy_cmd")


def _register() -> None:
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"membrane.cli.{name}")
        for command in module.COMMANDS:
            cli.add_command(command)


def main() -> None:
    _register()
    cli(prog_name="membrane")
