"""``membrane observe`` and ``membrane flows status|nodes`` against a running observer server."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from membrane.agent.config import load_agent_config
from membrane.cli import observe_cmd
from membrane.cli.context import CliContext
from membrane.cli.main import cli
from membrane.lab.lab import initial_record
from membrane.lab.plan import LabPlan
from membrane.lab.state import LabDirs, LabRelay, write_record
from membrane.observe.cliflags import FILTER_FLAGS
from membrane.observe.model import (
    DROPPED,
    EGRESS,
    FORWARDED,
    INGRESS,
    Flow,
    IPv4,
    fill_summary,
    mark_drop,
    mark_trace,
    set_reply,
    set_time,
)
from membrane.observe.ring import Ring
from membrane.observe.server import ObserverServer

for command in observe_cmd.COMMANDS:
    cli.add_command(command)

T0 = 1_700_000_000 * 10**9  # Nov 14 22:13:20 UTC


def flow(n: int) -> Flow:
    f = Flow(node_name="node1")
    set_time(f, T0 + n * 10**9)
    f.IP.source, f.IP.destination, f.IP.ipVersion = f"10.0.0.{n}", "10.0.9.9", IPv4
    f.l4.TCP.source_port, f.l4.TCP.destination_port = 40000 + n, 80
    f.l4.TCP.flags.SYN = True
    f.source.namespace, f.source.pod_name, f.source.identity = "default", ("xwing" if n % 2 else "tiefighter"), 300 + n
    f.destination.namespace, f.destination.pod_name, f.destination.identity = "default", "deathstar", 500
    if n % 2:
        mark_drop(f, 133)
        f.traffic_direction = INGRESS
    else:
        mark_trace(f, "to-endpoint", verdict=FORWARDED)
        f.traffic_direction = EGRESS
        set_reply(f, False)
    return fill_summary(f)


class Served:
    """An observer server on its own event loop thread, as an agent would run it."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.now = T0 + 60 * 10**9  # the server starts a minute after the first flow
        self.ring = Ring(15, clock=lambda: self.now)
        for n in range(10):
            self.ring.write(flow(n))
        self.loop = asyncio.new_event_loop()
        self.server = ObserverServer(self.ring, "node1", listen=None, unix_socket=socket, clock=lambda: self.now)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    served = Served(tmp_path / "observer.sock")
    try:
        yield served
    finally:
        served.close()


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input)


def test_observe_prints_the_last_flows_in_compact_form(served: Served) -> None:
    result = run("observe", "--server", f"unix:{served.socket}", "--last", "2")
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "Nov 14 22:13:28.000: default/tiefighter:40008 (ID:308) -> default/deathstar:80 (ID:500) to-endpoint "
        "FORWARDED (TCP Flags: SYN)\n"
        "Nov 14 22:13:29.000: default/xwing:40009 (ID:309) <> default/deathstar:80 (ID:500) Policy denied "
        "DROPPED (TCP Flags: SYN)\n")


def test_filters_and_not(served: Served) -> None:
    server = ["--server", str(served.socket)]  # a bare path is a unix socket too
    dropped = run("observe", *server, "--verdict", "DROPPED", "--from-pod", "xwing", "-o", "json")
    assert dropped.exit_code == 0, dropped.output
    lines = [json.loads(line) for line in dropped.stdout.splitlines()]
    assert len(lines) == 5 and {line["flow"]["verdict"] for line in lines} == {"DROPPED"}
    forwarded = run("observe", *server, "--not", "--verdict", "DROPPED", "--traffic-direction", "egress")
    assert forwarded.exit_code == 0 and len(forwarded.stdout.splitlines()) == 5
    assert all("FORWARDED" in line for line in forwarded.stdout.splitlines())
    none = run("observe", *server, "--to-port", "443")
    assert none.exit_code == 0 and none.stdout == ""


def test_usage_errors_exit_2(served: Served) -> None:
    for args, message in ((["-o", "table", "--follow"], "table output format is not compatible with follow mode"),
                          (["--first", "1", "--last", "1"], "cannot set both --first and --last"),
                          (["--from-ip", "1.1.1.1", "--from-pod", "x"], "cannot be combined"),
                          (["--verdict", "MAYBE"], "invalid --verdict value"),
                          (["-o", "yaml"], "invalid output format: yaml"),
                          (["--not"], "trailing --not")):
        result = run("observe", "--server", f"unix:{served.socket}", *args)
        assert result.exit_code == 2 and message in result.stderr, (args, result.output)


def test_server_side_errors_exit_1(tmp_path: Path, served: Served) -> None:
    bad = run("observe", "--server", f"unix:{served.socket}", "--protocol", "quic")
    assert bad.exit_code == 1 and "unknown protocol" in bad.stderr
    gone = run("observe", "--server", f"unix:{tmp_path / 'none.sock'}")
    assert gone.exit_code == 1 and "Error: cannot reach the observer at unix:" in gone.stderr


def test_flows_status_and_nodes(served: Served) -> None:
    served.now += 60 * 10**9  # up for a minute; no flow in that minute, so Flows/s is seen flows over uptime
    status = run("flows", "status", "--server", f"unix:{served.socket}")
    assert status.exit_code == 0, status.output
    assert status.stdout == (f"Healthcheck (via unix:{served.socket}): Ok\n"
                             "Current/Max Flows: 10/15 (66.67%)\nFlows/s: 0.17\n")
    nodes = run("flows", "nodes", "--server", f"unix:{served.socket}")
    assert nodes.exit_code == 0, nodes.output
    assert nodes.stdout == ("NAME    STATUS      AGE    FLOWS/S   CURRENT/MAX-FLOWS\n"
                            "node1   Connected   1m0s   0.17      10/15 ( 66.67%)\n")
    as_json = json.loads(run("flows", "nodes", "--server", f"unix:{served.socket}", "-o", "json").stdout)
    assert as_json[0]["name"] == "node1" and as_json[0]["state"] == "NODE_CONNECTED"


def test_exported_json_reads_back_with_filters(served: Served, tmp_path: Path) -> None:
    exported = run("observe", "--server", f"unix:{served.socket}", "--all", "-o", "jsonpb")
    path = tmp_path / "flows.json"
    path.write_text(exported.stdout + "not json\n")
    again = run("observe", "--input-file", str(path), "--last", "1", "-o", "jsonpb")
    assert again.exit_code == 0 and again.stdout == exported.stdout.splitlines(keepends=True)[-1]
    assert "Warning: line 11: not a flow" in again.stderr
    piped = run("observe", "--input-file", "-", "--verdict", "DROPPED", "-s", input=exported.stdout)
    assert piped.exit_code == 0 and len(piped.stdout.splitlines()) == 5 and piped.stderr == ""


def test_print_raw_filters() -> None:
    result = run("observe", "--print-raw-filters", "--not", "--from-ip", "1.1.1.1", "--to-port", "53")
    assert result.stdout == ("allowlist:\n    - '{\"destination_port\":[\"53\"]}'\n"
                             "denylist:\n    - '{\"source_ip\":[\"1.1.1.1\"]}'\n")


def test_default_server_is_the_local_agents_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMBRANE_LAB_STATE_DIR", str(tmp_path / "labs"))
    monkeypatch.delenv("MEMBRANE_LAB", raising=False)
    monkeypatch.delenv("MEMBRANE_STORE", raising=False)
    monkeypatch.delenv("MEMBRANE_RELAY", raising=False)
    monkeypatch.setenv("MEMBRANE_AGENT_CONFIG", str(tmp_path / "none.yaml"))
    assert observe_cmd.observer_address(CliContext()) == "unix:/run/membrane/observer.sock"


def test_a_host_names_its_relay_in_the_agent_config_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEMBRANE_LAB_STATE_DIR", str(tmp_path / "labs"))
    monkeypatch.delenv("MEMBRANE_LAB", raising=False)
    monkeypatch.delenv("MEMBRANE_STORE", raising=False)
    monkeypatch.delenv("MEMBRANE_RELAY", raising=False)
    config = tmp_path / "agent.yaml"
    config.write_text("hubble:\n  relayAddress: 10.0.0.5:4245\n")
    monkeypatch.setenv("MEMBRANE_AGENT_CONFIG", str(config))
    assert observe_cmd.observer_address(CliContext()) == "10.0.0.5:4245"
    assert load_agent_config(config).hubble.relayAddress == "10.0.0.5:4245"  # the agent accepts the setting
    monkeypatch.setenv("MEMBRANE_RELAY", "127.0.0.1:4245")
    assert observe_cmd.observer_address(CliContext()) == "127.0.0.1:4245"


def test_in_a_lab_the_default_server_is_the_labs_relay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dirs = LabDirs(tmp_path / "labs", tmp_path / "run")
    monkeypatch.setenv("MEMBRANE_LAB_STATE_DIR", str(dirs.state_base))
    monkeypatch.delenv("MEMBRANE_STORE", raising=False)
    monkeypatch.setenv("MEMBRANE_RELAY", "10.9.9.9:4245")  # the host's relay is not the lab's
    record = initial_record(LabPlan("one", 2, 0), dirs, "sqlite", datetime.now(UTC))
    record = record.model_copy(update={"phase": "ready", "relay": LabRelay(address="127.0.0.1:41000",
                                                                           log=tmp_path / "relay.log")})
    write_record(dirs, record)
    assert observe_cmd.observer_address(CliContext(lab_flag="one")) == "127.0.0.1:41000"
    assert observe_cmd.observer_address(CliContext()) == "127.0.0.1:41000"  # the only lab
    write_record(dirs, record.model_copy(update={"relay": None}))  # recorded before labs had relays
    assert observe_cmd.observer_address(CliContext()) == f"unix:{dirs.run_base}/one/node1/observer.sock"


def test_cli_flag_table_matches_the_filter_rules() -> None:
    assert {name: spec[0] for name, spec in observe_cmd._FILTER_FLAGS.items()} == FILTER_FLAGS


def test_verdict_and_direction_constants_are_hubbles() -> None:
    assert (FORWARDED, DROPPED, INGRESS, EGRESS) == (1, 2, 1, 2)
