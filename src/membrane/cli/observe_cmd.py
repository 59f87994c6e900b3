"""``membrane observe`` and ``membrane flows status|nodes``: Hubble's CLI over the observer API.

Flags, their combination rules and every output format follow ``hubble observe``, ``hubble
status`` and ``hubble list nodes`` (see :mod:`membrane.observe.cliflags` and
:mod:`membrane.observe.printer`). ``--server`` defaults to the whole cluster when it can: the
lab's relay when talking to a lab; on a host, ``MEMBRANE_RELAY`` or the agent config's
``hubble.relayAddress``; else the local agent's /run/membrane/observer.sock. ``--input-file``
reads exported JSON lines instead of a server.

The protobuf/gRPC modules are imported inside the commands, so other commands do not pay for them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import click

from membrane.cli.context import CliContext, pass_cli, run_async
from membrane.core.config import DEFAULT_RUN_DIR
from membrane.core.errors import InvalidInput

# Kept in step with membrane.observe.cliflags.FILTER_FLAGS (a test checks it), so that defining the
# command does not import protobuf: flag → (takes a value, short option, help).
_FILTER_FLAGS: dict[str, tuple[bool, str, str]] = {
    "not": (False, "", "Reverse the next filter: it goes to the blacklist (--not --from-ip 2.2.2.2)."),
    "uuid": (True, "", "Show only the flow with this unique identifier."),
    "node-name": (True, "", 'Flows observed on nodes matching these names ("k8s*", "cluster/node").'),
    "node-label": (True, "", "Flows observed on nodes matching this label selector."),
    "from-cluster": (True, "", "Flows from endpoints in this cluster."),
    "cluster": (True, "", "Flows from or to endpoints in this cluster."),
    "to-cluster": (True, "", "Flows to endpoints in this cluster."),
    "protocol": (True, "", "L4 or L7 protocol (tcp udp sctp icmp icmpv4 icmpv6 dns http …)."),
    "tcp-flags": (True, "", 'Flows with all these TCP flags ("syn", "syn,ack").'),
    "type": (True, "-t", "Event type TYPE[:SUBTYPE]: capture, drop, l7, policy-verdict, trace[:to-endpoint …], "
                         "trace-sock."),
    "verdict": (True, "", "FORWARDED, DROPPED, AUDIT, REDIRECTED, ERROR, TRACED or TRANSLATED."),
    "drop-reason-desc": (True, "", 'Drop reason ("POLICY_DENIED", "UNSUPPORTED_L3_PROTOCOL" …).'),
    "http-status": (True, "", 'HTTP status code or prefix ("404", "5+").'),
    "http-method": (True, "", 'HTTP method ("get", "post").'),
    "http-path": (True, "", "Regular expression on the HTTP path."),
    "http-url": (True, "", "Regular expression on the full HTTP URL."),
    "http-header": (True, "", 'HTTP header "name:value".'),
    "trace-id": (True, "", "Trace ID of the request."),
    "ip-trace-id": (True, "", "IP option trace ID."),
    "from-fqdn": (True, "", 'Flows from this domain name pattern ("*.cilium.io").'),
    "fqdn": (True, "", "Flows from or to this domain name pattern."),
    "to-fqdn": (True, "", "Flows to this domain name pattern."),
    "from-ip": (True, "", "Flows from this address or CIDR."),
    "snat-ip": (True, "", "Flows whose source was translated to this address or CIDR."),
    "ip": (True, "", "Flows from or to this address or CIDR."),
    "to-ip": (True, "", "Flows to this address or CIDR."),
    "ipv4": (False, "-4", "IPv4 flows only."),
    "ipv6": (False, "-6", "IPv6 flows only."),
    "ip-version": (True, "", "none, v4 or v6."),
    "from-pod": (True, "", "Flows from pods with this [namespace/]name prefix (namespace default: default)."),
    "pod": (True, "", "Flows from or to pods with this [namespace/]name prefix."),
    "to-pod": (True, "", "Flows to pods with this [namespace/]name prefix."),
    "from-namespace": (True, "", "Flows from this namespace."),
    "namespace": (True, "-n", "Flows from or to this namespace."),
    "to-namespace": (True, "", "Flows to this namespace."),
    "from-all-namespaces": (False, "", "Flows from any namespace."),
    "all-namespaces": (False, "-A", "Flows from or to any namespace."),
    "to-all-namespaces": (False, "", "Flows to any namespace."),
    "from-label": (True, "", 'Flows from endpoints matching this label selector ("app=web", "reserved:world").'),
    "label": (True, "-l", "Flows from or to endpoints matching this label selector."),
    "to-label": (True, "", "Flows to endpoints matching this label selector."),
    "from-service": (True, "", "Flows from this [namespace/]service name prefix."),
    "service": (True, "", "Flows from or to this [namespace/]service name prefix."),
    "to-service": (True, "", "Flows to this [namespace/]service name prefix."),
    "from-port": (True, "", "Flows with this source port."),
    "port": (True, "", "Flows with this source or destination port."),
    "to-port": (True, "", "Flows with this destination port."),
    "from-workload": (True, "", "Flows from this [kind/]workload."),
    "workload": (True, "", "Flows from or to this [kind/]workload."),
    "to-workload": (True, "", "Flows to this [kind/]workload."),
    "from-identity": (True, "", "Flows from this security identity (number or reserved name)."),
    "identity": (True, "", "Flows from or to this security identity."),
    "to-identity": (True, "", "Flows to this security identity."),
    "traffic-direction": (True, "", "ingress or egress."),
    "interface": (True, "", "Flows observed on this interface."),
    "encrypted": (False, "", "Encrypted flows only."),
    "unencrypted": (False, "", "Unencrypted flows only."),
}
_ORDER_KEY = "membrane.observe.filter-order"
TIME_FORMATS = ("StampMilli", "YearMonthDay", "YearMonthDayHour", "YearMonthDayHourMinute", "RFC3339",
                "RFC3339Milli", "RFC3339Micro", "RFC3339Nano", "RFC1123Z")


def _param(flag: str) -> str:
    return "f_" + flag.replace("-", "_")


class _FiltersInOrder(click.Command):
    """Records the filter flags in command-line order: ``--not`` applies to the flag after it."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        opts, _, order = self.make_parser(ctx).parse_args(args=list(args))
        used: dict[str, int] = {}
        occurrences: list[tuple[str, str]] = []
        for param in order:
            name = param.name or ""
            if not name.startswith("f_"):
                continue
            flag = name[2:].replace("_", "-")
            if _FILTER_FLAGS[flag][0]:
                index = used.get(name, 0)
                used[name] = index + 1
                occurrences.append((flag, str(opts[name][index])))
            else:
                occurrences.append((flag, ""))
        ctx.meta[_ORDER_KEY] = occurrences
        return super().parse_args(ctx, args)


def _filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for flag, (takes_value, short, help_text) in reversed(list(_FILTER_FLAGS.items())):
        decls = [f"--{flag}", *([short] if short else []), _param(flag)]
        if takes_value:
            func = click.option(*decls, multiple=True, help=help_text)(func)
        else:
            func = click.option(*decls, count=True, help=help_text)(func)
    return func


SERVER_HELP = "Observer address: unix:PATH or HOST:PORT (default: the lab's relay, else the local agent)."
RELAY_ENV = "MEMBRANE_RELAY"
AGENT_CONFIG_ENV = "MEMBRANE_AGENT_CONFIG"
DEFAULT_AGENT_CONFIG = Path("/etc/membrane/agent.yaml")


def configured_relay() -> str | None:
    """The relay this host's CLI uses: ``MEMBRANE_RELAY``, else ``hubble.relayAddress`` of the agent
    config file (``MEMBRANE_AGENT_CONFIG``, default /etc/membrane/agent.yaml); None when neither says."""
    if env := os.environ.get(RELAY_ENV):
        return env
    path = Path(os.environ.get(AGENT_CONFIG_ENV) or DEFAULT_AGENT_CONFIG)
    try:
        import yaml

        loaded = yaml.safe_load(path.read_text())
    except OSError:
        return None
    except yaml.YAMLError as exc:
        raise InvalidInput([f"{path}: {exc}"]) from None
    hubble = loaded.get("hubble") if isinstance(loaded, dict) else None
    address = hubble.get("relayAddress") if isinstance(hubble, dict) else None
    return address if isinstance(address, str) and address else None


def observer_address(cli: CliContext) -> str:
    """``--server``'s default: the lab's relay (the whole cluster) when talking to a lab; on a host,
    the configured relay, else the local agent's observer socket."""
    lab = cli.lab_record()
    if lab is not None:
        if lab.relay is not None:
            return lab.relay.address
        if lab.nodes:  # a lab recorded before labs had a relay
            return f"unix:{lab.nodes[0].run_dir / 'observer.sock'}"
    if relay := configured_relay():
        return relay
    return f"unix:{DEFAULT_RUN_DIR / 'observer.sock'}"


def _usage(exc: InvalidInput | ValueError) -> click.UsageError:
    return click.UsageError("; ".join(exc.problems) if isinstance(exc, InvalidInput) else str(exc))


def _lines(path: str) -> Iterator[str]:
    if path == "-":
        yield from sys.stdin
        return
    try:
        with open(path, encoding="utf-8") as file:
            yield from file
    except OSError as exc:
        raise InvalidInput([f"{path}: {exc.strerror}"]) from None


@click.command("observe", cls=_FiltersInOrder)
@click.option("--server", metavar="ADDR", help=SERVER_HELP)
@click.option("--last", type=click.IntRange(min=0), default=0, help="The last N flows in the buffer (default 20).")
@click.option("--first", type=click.IntRange(min=0), default=0, help="The first N flows in the buffer.")
@click.option("--all", "all_flows", is_flag=True, help="Every flow in the buffer.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new flows.")
@click.option("--since", default="", help="Flows since a time: a duration ago (3s, 4m, 1h43m) or RFC 3339 …")
@click.option("--until", default="", help="Flows until a time (same formats as --since).")
@_filter_options
@click.option("--allowlist", multiple=True, metavar="JSON", help="A raw FlowFilter for the whitelist.")
@click.option("--denylist", multiple=True, metavar="JSON", help="A raw FlowFilter for the blacklist.")
@click.option("-o", "--output", default="compact", metavar="FORMAT", help="compact, dict, json, jsonpb or table.")
@click.option("--print-node-name", is_flag=True, help="Print the node name of each flow.")
@click.option("--print-policy-names", is_flag=True, help="Print the policies that allowed or denied a flow.")
@click.option("--time-format", default="StampMilli", type=click.Choice(TIME_FORMATS, case_sensitive=False),
              help="Time layout of compact, dict and table output.")
@click.option("--numeric", is_flag=True, help="Print addresses and ports, not names.")
@click.option("--ip-translation", type=click.BOOL, default=True, metavar="BOOL",
              help="Translate addresses to pod, service or domain names (default true).")
@click.option("--color", default="auto", type=click.Choice(["auto", "always", "never"]), help="Colour output.")
@click.option("-s", "--silent-errors", is_flag=True, help="Do not print warnings and node errors.")
@click.option("--print-raw-filters", is_flag=True, help="Print the allowlist/denylist the flags make, and exit.")
@click.option("--input-file", metavar="FILE", help="Read flows from a JSON-lines file ('-': stdin).")
@click.option("--field-mask", multiple=True, metavar="FIELDS", help="Comma-separated Flow fields to fetch (json).")
@click.pass_context
def observe(ctx: click.Context, /, **params: Any) -> None:
    """Observe flows of the cluster (through the relay) or of the local agent, as `hubble observe`."""
    from membrane.observe.cliflags import FilterBuilder, Selectors, build_request, parse_raw_filters, raw_filters_yaml
    from membrane.observe.printer import Output, Printer, PrinterOptions, color_wanted

    field_mask = [path for item in params["field_mask"] for path in item.split(",") if path]
    try:
        builder = FilterBuilder()
        for flag, value in ctx.meta.get(_ORDER_KEY, []):
            builder.set(flag, value)
        whitelist, blacklist = builder.finish()
        whitelist += parse_raw_filters(params["allowlist"], "allowlist")
        blacklist += parse_raw_filters(params["denylist"], "denylist")
        output = Output.parse(params["output"])
        if output is Output.TABLE and params["follow"]:
            raise InvalidInput(["table output format is not compatible with follow mode"])
        if field_mask and output is not Output.JSONPB:
            raise InvalidInput([f"{params['output']} output format is not compatible with custom field mask"])
        selectors = Selectors(last=params["last"], first=params["first"], all=params["all_flows"],
                              follow=params["follow"], since=params["since"], until=params["until"],
                              input_file=bool(params["input_file"]))
        request = build_request(selectors, whitelist, blacklist, time.time_ns(), field_mask)
    except (InvalidInput, ValueError) as exc:
        raise _usage(exc) from None
    if params["print_raw_filters"]:
        click.echo(raw_filters_yaml(request), nl=False)
        return

    err: TextIO = open(os.devnull, "w") if params["silent_errors"] else sys.stderr  # noqa: SIM115
    options = PrinterOptions(output=output, time_format=params["time_format"],
                             ip_translation=params["ip_translation"] and not params["numeric"],
                             node_name=params["print_node_name"], policy_names=params["print_policy_names"],
                             color=color_wanted(params["color"], sys.stdout))
    printer = Printer(options, sys.stdout, err)
    cli: CliContext = ctx.ensure_object(CliContext)

    def warn(message: str) -> None:
        err.write(f"Warning: {message}\n")

    @run_async
    async def run() -> None:
        try:
            if params["input_file"]:
                from membrane.observe.exporter import read_flows

                for response in read_flows(_lines(params["input_file"]), request, warn):
                    printer.write(response)
                return
            from membrane.observe.client import ObserverClient

            async with ObserverClient(params["server"] or observer_address(cli)) as client:
                async for response in client.get_flows(request):
                    printer.write(response)
        finally:
            with contextlib.suppress(BrokenPipeError):
                printer.close()
            if err is not sys.stderr:
                err.close()

    try:
        run()
    except BrokenPipeError:
        # The reader went away (`| head`); stop quietly without a second error on exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@click.group("flows")
def flows() -> None:
    """The observer's state (as `hubble status` and `hubble list nodes`)."""


@flows.command("status")
@click.option("--server", metavar="ADDR", help=SERVER_HELP)
@click.option("-o", "--output", default="compact", type=click.Choice(["compact", "dict", "json", "jsonpb", "table"]),
              help="Output format.")
@pass_cli
@run_async
async def flows_status(cli: CliContext, server: str | None, output: str) -> None:
    """Health, buffered/maximum flows, flows per second, connected nodes."""
    from membrane.observe.client import ObserverClient, ObserverError
    from membrane.observe.printer import Output, format_server_status
    from membrane.observe.server import grpc_target

    address = server or observer_address(cli)
    async with ObserverClient(address, timeout=5) as client:
        try:
            health = await client.health()
        except ObserverError as exc:
            raise ObserverError(f"failed getting status: {exc}", exc.code) from None
        if output == "compact":
            click.echo(f"Healthcheck (via {grpc_target(address)}): "
                       + ("Ok" if health == "SERVING" else f"Unavailable: {health}"))
        if health != "SERVING":
            raise ObserverError("not healthy")
        try:
            status = await client.server_status()
        except ObserverError as exc:
            raise ObserverError(f"failed to get hubble server status: {exc}", exc.code) from None
    click.echo(format_server_status(status, Output.parse(output)), nl=False)


@flows.command("nodes")
@click.option("--server", metavar="ADDR", help=SERVER_HELP)
@click.option("-o", "--output", default="table", type=click.Choice(["table", "wide", "json"]), help="Output format.")
@pass_cli
@run_async
async def flows_nodes(cli: CliContext, server: str | None, output: str) -> None:
    """The nodes serving flows: NAME STATUS AGE FLOWS/S CURRENT/MAX-FLOWS."""
    import json

    from membrane.observe.client import ObserverClient
    from membrane.observe.jsonpb import message_to_dict
    from membrane.observe.printer import format_nodes

    async with ObserverClient(server or observer_address(cli), timeout=5) as client:
        nodes = sorted((await client.get_nodes()).nodes, key=lambda n: n.name)
    if output == "json":
        click.echo(json.dumps([message_to_dict(n) for n in nodes], indent=2, ensure_ascii=False))
    else:
        click.echo(format_nodes(nodes, wide=output == "wide"), nl=False)


COMMANDS = [observe, flows]
