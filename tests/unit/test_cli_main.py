"""The command table: every command a module defines is reachable, and nothing is listed twice."""

import importlib

from membrane.cli.main import COMMAND_MODULES, cli


def test_every_module_command_is_in_the_table_and_resolves() -> None:
    for module_name in set(COMMAND_MODULES.values()):
        module = importlib.import_module(f"membrane.cli.{module_name}")
        for command in module.COMMANDS:
            assert COMMAND_MODULES.get(command.name) == module_name, command.name
            assert cli.get_command(None, command.name) is command  # type: ignore[arg-type]
