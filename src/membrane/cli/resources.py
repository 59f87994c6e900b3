"""``membrane apply | get | delete | label``: the resource commands, as kubectl has them.

Each command opens the store the CLI context names, does its work through
:class:`~membrane.store.objects.ObjectClient` and prints what kubectl would print. User errors are
:class:`~membrane.core.errors.MembraneError`\\s (``Error: ...`` on stderr, exit 1); usage errors
exit 2 through click.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import click

from membrane.api.manifest import Manifest, load_objects, load_refs
from membrane.api.meta import ApiObject, parse_selector
from membrane.api.registry import KindInfo, ObjectRef, lookup_kind
from membrane.cli import printers
from membrane.cli.context import CliContext, pass_cli, run_async
from membrane.core.errors import InvalidInput, NotFound
from membrane.store.objects import ApplyRejected, ObjectClient


def now() -> datetime:
    """The time ``AGE`` is measured against (a function so tests can pin it)."""
    return datetime.now(UTC)


@asynccontextmanager
async def _client(cli: CliContext) -> AsyncIterator[ObjectClient]:
    store = await cli.open_store()
    try:
        yield ObjectClient(store)
    finally:
        await store.close()


def _split_kind(kind: str, names: Sequence[str]) -> tuple[KindInfo, list[str]]:
    """``pods web`` and ``pods/web`` both name kind and object."""
    if "/" in kind:
        kind, _, name = kind.partition("/")
        if not name:
            raise click.UsageError(f"invalid resource name {kind + '/'!r}")
        return lookup_kind(kind), [name, *names]
    return lookup_kind(kind), list(names)


def _namespace(info: KindInfo, namespace: str | None) -> str | None:
    return (namespace or "default") if info.namespaced else None


# --- apply ---------------------------------------------------------------------------------------------


@click.command(short_help="Create or update objects from manifests, all or nothing.")
@click.option("-f", "--filename", "filenames", multiple=True, required=True, metavar="FILE",
              help="Manifest file or directory; '-' reads stdin. Repeatable.")  # fmt: skip
@click.option("-n", "--namespace", metavar="NS", help="Namespace for objects that name none.")
@pass_cli
@run_async
async def apply(cli: CliContext, filenames: tuple[str, ...], namespace: str | None) -> None:
    """Validate every object of every FILE, then write them all in one transaction or none.

    Prints `KIND/NAME created`, `configured` or `unchanged` for each object, like kubectl."""
    manifests = load_objects(filenames, namespace=namespace)
    objects = [m.obj for m in manifests if m.obj is not None]
    async with _client(cli) as client:
        try:
            results = await client.apply(objects)
        except ApplyRejected as exc:
            raise InvalidInput([f"{manifests[r.index].where()}: {r.message}" for r in exc.rejections]) from None
    for result in results:
        click.echo(f"{result.ref.slash_name()} {result.action}")


# --- get -----------------------------------------------------------------------------------------------


@click.command(short_help="Show objects of one kind.")
@click.argument("kind")
@click.argument("names", nargs=-1)
@click.option("-n", "--namespace", metavar="NS", help="Namespace to look in (default: default).")
@click.option("-A", "--all-namespaces", is_flag=True, help="Look in every namespace.")
@click.option("-o", "--output", type=click.Choice(["wide", "yaml", "json", "name"]), help="Output format.")
@click.option("-l", "--selector", metavar="SELECTOR", help="Label selector, e.g. app=web,tier!=db.")
@pass_cli
@run_async
async def get(
    cli: CliContext,
    kind: str,
    names: tuple[str, ...],
    namespace: str | None,
    all_namespaces: bool,
    output: str | None,
    selector: str | None,
) -> None:
    """Show objects of KIND (kind, plural or short name: pods, svc, cnp, ippools, ...)."""
    if namespace and all_namespaces:
        raise click.UsageError("-n/--namespace and -A/--all-namespaces are mutually exclusive")
    info, wanted = _split_kind(kind, names)
    if wanted and all_namespaces:
        raise click.UsageError("a resource cannot be retrieved by name across all namespaces")
    label_selector = parse_selector(selector) if selector else None
    ns = None if all_namespaces else _namespace(info, namespace)
    missing: list[str] = []
    async with _client(cli) as client:
        if wanted:
            objects: list[ApiObject] = []
            for name in wanted:
                try:
                    objects.append(await client.get(info.kind, ns, name))
                except NotFound as exc:
                    missing.append(str(exc))
        else:
            objects = await client.list(info.kind, ns)
    if label_selector is not None:
        objects = [o for o in objects if label_selector.matches(o.labels)]
    _print_objects(info, objects, output, single=len(wanted) == 1, namespace_column=all_namespaces and info.namespaced)
    if not objects and not wanted and output not in ("yaml", "json"):
        where = f" in {ns} namespace" if ns is not None else ""
        click.echo(f"No resources found{where}.", err=True)
    if missing:
        raise NotFound("\n".join(missing))


def _print_objects(
    info: KindInfo, objects: list[ApiObject], output: str | None, *, single: bool, namespace_column: bool
) -> None:
    if output == "yaml" or output == "json":
        document = objects[0].to_dict() if single and len(objects) == 1 else printers.list_document(objects)
        click.echo(printers.to_yaml(document) if output == "yaml" else printers.to_json(document), nl=False)
    elif output == "name":
        for obj in objects:
            click.echo(ObjectRef.of(obj).slash_name())
    elif objects:
        table = printers.object_table(
            info.kind, objects, now=now(), wide=output == "wide", namespace_column=namespace_column
        )
        click.echo(table, nl=False)


# --- delete ---------------------------------------------------------------------------------------------


@click.command(short_help="Delete objects named by manifests or by kind and name.")
@click.argument("args", nargs=-1, metavar="[KIND NAME...]")
@click.option("-f", "--filename", "filenames", multiple=True, metavar="FILE", help="Delete the objects of FILE.")
@click.option("-n", "--namespace", metavar="NS", help="Namespace of the objects (default: default).")
@click.option("--ignore-not-found", is_flag=True, help="Treat objects that do not exist as deleted.")
@click.option("--grace-period", type=int, default=-1, show_default=True,
              help="Seconds a deleted pod gets to stop (-1: its terminationGracePeriodSeconds; 0: at once).")
@click.option("--force", is_flag=True, help="Remove pods at once (--grace-period 0).")
@pass_cli
@run_async
async def delete(
    cli: CliContext, args: tuple[str, ...], filenames: tuple[str, ...], namespace: str | None, ignore_not_found: bool,
    grace_period: int, force: bool,
) -> None:
    """Delete objects: `delete -f FILE` or `delete KIND NAME... [-n NS]`. Deleting a Namespace
    deletes everything in it. A pod on a node is Terminating until the node has stopped it."""
    manifests: list[Manifest] = []
    if filenames and args:
        raise click.UsageError("give either -f FILE or KIND NAME, not both")
    if filenames:
        manifests = load_refs(filenames, namespace=namespace)
        refs = [m.ref for m in manifests]
    elif args:
        info, names = _split_kind(args[0], args[1:])
        if not names:
            raise click.UsageError(f"name the {info.singular} to delete: membrane delete {args[0]} NAME")
        refs = [ObjectRef(info.kind, _namespace(info, namespace), name) for name in names]
    else:
        raise click.UsageError("give -f FILE or KIND NAME")
    async with _client(cli) as client:
        grace = 0 if force else (None if grace_period < 0 else grace_period)
        deleted, missing = await client.delete_objects(refs, grace_period=grace)
    gone = {ObjectRef.of(obj) for obj in deleted}
    for ref in refs:
        if ref in gone:
            click.echo(f"{ref.quoted_name()} deleted")
    if missing and not ignore_not_found:
        raise NotFound("\n".join(ref.not_found() for ref in missing))


# --- label ------------------------------------------------------------------------------------------------


def _parse_label_changes(changes: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    add: dict[str, str] = {}
    remove: list[str] = []
    for change in changes:
        if change.endswith("-") and "=" not in change:
            remove.append(change[:-1])
        elif "=" in change:
            key, _, value = change.partition("=")
            add[key] = value
        else:
            raise click.UsageError(f"invalid label spec: {change}")
    overlap = set(add) & set(remove)
    if overlap:
        raise click.UsageError(f"can not both modify and remove a label in the same command: {sorted(overlap)[0]}")
    return add, remove


@click.command(short_help="Add, change or remove labels of an object.")
@click.argument("args", nargs=-1, required=True, metavar="KIND NAME KEY=VALUE... KEY-...")
@click.option("-n", "--namespace", metavar="NS", help="Namespace of the object (default: default).")
@click.option("--overwrite", is_flag=True, help="Allow changing the value of an existing label.")
@pass_cli
@run_async
async def label(cli: CliContext, args: tuple[str, ...], namespace: str | None, overwrite: bool) -> None:
    """Update labels as `kubectl label` does; takes effect live (identities and selectors follow)."""
    if "/" in args[0]:
        info, names = _split_kind(args[0], ())
        name, changes = names[0], args[1:]
    else:
        if len(args) < 2:
            raise click.UsageError("give KIND NAME and at least one label change")
        info, name, changes = lookup_kind(args[0]), args[1], args[2:]
    if not changes:
        raise click.UsageError("at least one label update is required")
    add, remove = _parse_label_changes(changes)
    async with _client(cli) as client:
        obj, verdict, warnings = await client.set_labels(
            info.kind, _namespace(info, namespace), name, add, remove, overwrite=overwrite
        )
    for warning in warnings:
        click.echo(warning, err=True)
    click.echo(f"{ObjectRef.of(obj).slash_name()} {verdict}")


COMMANDS = [apply, get, delete, label]

__all__ = ["COMMANDS", "apply", "delete", "get", "label", "now"]
