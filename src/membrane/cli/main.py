"""The ``membrane`` command: resources, workloads, inspection, flows, daemons, lab.

Subcommands are loaded lazily: ``membrane get pods`` imports the resource commands only, not the
agent, the policy engine or gRPC, so every invocation starts in a fraction of the time.
"""

from __future__ import annotations

import importlib

import click

from membrane.cli.context import CliContext

# Command name -> the module that defines it (each module exports COMMANDS).
COMMAND_MODULES: dict[str, str] = {
    "apply": "resources", "get": "resources", "delete": "resources", "label": "resources",
    "pod": "pods",
    "status": "inspect", "node": "inspect", "endpoint": "inspect", "identity": "inspect", "ip": "inspect",
    "tunnel": "inspect", "service": "inspect",
    "policy": "policy_cmd",
    "observe": "observe_cmd", "flows": "observe_cmd",
    "agent": "agent_cmd", "relay": "relay_cmd",
    "lab": "lab_cmd",
    "config": "config_cmd",
    "install": "install_cmd", "uninstall": "install_cmd", "sysdump": "sysdump_cmd",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMAND_MODULES)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module_name = COMMAND_MODULES.get(cmd_name)
        if module_name is None:
            return None
        module = importlib.import_module(f"membrane.cli.{module_name}")
        for command in module.COMMANDS:
            if command.name == cmd_name:
                return command  # type: ignore[no-any-return]
        return None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--store", "store_flag", metavar="URL", help="Cluster store (sqlite:///PATH or etcd://HOST:PORT).")
@click.option("--lab", "lab_flag", metavar="NAME", help="Talk to the lab of this name.")
@click.pass_context
def cli(ctx: click.Context, store_flag: str | None, lab_flag: str | None) -> None:
    """membrane: container networking, network policy and flow visibility."""
    ctx.obj = CliContext(store_flag=store_flag, lab_flag=lab_flag)


def main() -> None:
    cli(prog_name="membrane")
