"""``membrane config get|set``: the cluster settings in the store, as ``cilium config`` shows and sets
an agent's.

``set`` takes ``KEY=VALUE`` pairs and writes them all or none, by compare-and-swap on the settings
key; every agent applies a change while it runs and reports the revision it applied
(``membrane status``: ``Cluster config``). Settings that cannot change in a running cluster are
refused with the reason (:data:`membrane.core.config.FIXED_SETTINGS`).
"""

from __future__ import annotations

import json
from typing import Any

import click

from membrane.cli.context import CliContext, pass_cli, run_async
from membrane.cli.printers import format_table
from membrane.core.config import LIVE_SETTINGS, ClusterConfig, parse_settings, with_settings
from membrane.core.errors import InvalidInput, MembraneError, NotFound
from membrane.store import keys
from membrane.store.base import Compare, Put, Store

#: Shown for a setting left to each agent's own configuration (a None value).
AGENT_OWN = "(each agent's own)"


def _text(value: Any) -> str:
    if value is None:
        return AGENT_OWN
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list) and not value:
        return "<none>"
    if isinstance(value, tuple | list):
        return ",".join(_text(v) if not isinstance(v, dict) else json.dumps(v, sort_keys=True) for v in value)
    return str(value)


async def _read(store: Store) -> tuple[ClusterConfig, int]:
    kv = await store.get(keys.CLUSTER_CONFIG)
    if kv is None:
        raise NotFound("the cluster has no settings yet: they are written by its first agent (membrane agent, lab up)")
    return ClusterConfig.model_validate_json(kv.value), kv.mod_revision


def _check_filters(changes: dict[str, Any]) -> None:
    """Export filters are refused here, with the key named, rather than by every agent."""
    from membrane.observe.config import export_filters

    problems = []
    for key in ("hubbleExportAllowlist", "hubbleExportDenylist"):
        value = changes.get(key)
        if value is None:
            continue
        if not isinstance(value, list | tuple) or not all(isinstance(v, dict) for v in value):
            problems.append(f"{key}: expected a list of flow filters, e.g. [{{\"source_pod\": [\"default/\"]}}]")
            continue
        try:
            export_filters(tuple(value))
        except ValueError as exc:
            problems.append(f"{key}: {exc}")
    if problems:
        raise InvalidInput(problems)


@click.group("config")
def config_group() -> None:
    """Cluster settings (policy modes, flow visibility), as cilium config."""


@config_group.command("get")
@click.argument("key", required=False)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@pass_cli
@run_async
async def config_get(cli: CliContext, key: str | None, output: str) -> None:
    """Every setting (KEY  VALUE  LIVE), or the value of KEY."""
    store = await cli.open_store()
    try:
        config, revision = await _read(store)
    finally:
        await store.close()
    data = config.model_dump(mode="json")
    if key is not None:
        if key not in data:
            raise InvalidInput([f"{key}: unknown setting (known: {', '.join(sorted(data))})"])
        click.echo(json.dumps(data[key]) if output == "json" else _text(getattr(config, key)))
        return
    if output == "json":
        click.echo(json.dumps({"revision": revision, "settings": data}, indent=2, sort_keys=True))
        return
    rows = [[name, _text(getattr(config, name)), "yes" if name in LIVE_SETTINGS else "no"] for name in sorted(data)]
    click.echo(format_table(["KEY", "VALUE", "LIVE"], rows))


@config_group.command("set")
@click.argument("assignments", nargs=-1, required=True, metavar="KEY=VALUE...")
@pass_cli
@run_async
async def config_set(cli: CliContext, assignments: tuple[str, ...]) -> None:
    """Change live settings on every node: KEY=VALUE (YAML values; a list as a,b; null: each agent's own)."""
    changes = parse_settings(assignments, live_only=True)
    _check_filters(changes)
    store = await cli.open_store()
    try:
        for _ in range(10):
            config, revision = await _read(store)
            updated = with_settings(config, changes)
            result = await store.txn([Compare(keys.CLUSTER_CONFIG, revision)],
                                     [Put(keys.CLUSTER_CONFIG, updated.model_dump_json().encode())])
            if result.succeeded:
                break
        else:
            raise MembraneError("the cluster settings kept changing underneath; try again")
    finally:
        await store.close()
    for name in changes:
        click.echo(f"{name}={_text(getattr(updated, name))}")
    click.echo(f"cluster settings at revision {result.revision}: every agent applies them while it runs "
               "(membrane status: Cluster config)")


COMMANDS = [config_group]
