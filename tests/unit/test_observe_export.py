"""Flow export files: JSON lines, size-based rotation with a bounded number of backups, filters."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from membrane.cli import observe_cmd
from membrane.cli.main import cli
from membrane.observe.exporter import FlowExporter, read_flows
from membrane.observe.jsonpb import to_json
from membrane.observe.model import DROPPED, FORWARDED, Flow, FlowFilter, GetFlowsRequest, flow_response, set_time

for command in observe_cmd.COMMANDS:
    cli.add_command(command)

T0 = 1_700_000_000 * 10**9


def flow(n: int, verdict: int = FORWARDED) -> Flow:
    f = Flow(uuid=f"flow-{n:03d}", verdict=verdict, node_name="node1", Summary="TCP Flags: SYN")  # type: ignore[arg-type]
    return set_time(f, T0 + n * 10**9)


LINE = len(to_json(flow_response(flow(0)))) + 1  # every line of these flows has the same length


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        self.now += 1_000_000  # a millisecond per rotation
        return self.now


def test_lines_are_get_flows_responses_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "flows.json"
    exporter = FlowExporter(path)
    for n in range(5):
        exporter.export(flow(n, DROPPED if n % 2 else FORWARDED))
    exporter.close()
    lines = path.read_text().splitlines()
    assert lines[0] == to_json(flow_response(flow(0)))
    everything = list(read_flows(lines, GetFlowsRequest()))
    assert [r.flow for r in everything] == [flow(n, DROPPED if n % 2 else FORWARDED) for n in range(5)]
    dropped_last = list(read_flows(lines, GetFlowsRequest(number=1, whitelist=[FlowFilter(verdict=[DROPPED])])))
    assert [r.flow.uuid for r in dropped_last] == ["flow-003"]
    first_two = list(read_flows(lines, GetFlowsRequest(number=2, first=True)))
    assert [r.flow.uuid for r in first_two] == ["flow-000", "flow-001"]
    assert len(list(read_flows(lines, GetFlowsRequest(number=2**64 - 1)))) == 5  # --all


def test_rotation_keeps_files_under_the_size_and_the_newest_backups(tmp_path: Path) -> None:
    path = tmp_path / "hubble-events.log"
    exporter = FlowExporter(path, max_size=3 * LINE, max_backups=2, clock=Clock())
    for n in range(14):  # 3 lines per file: 4 full files and one with 2 lines
        exporter.export(flow(n))
    exporter.close()
    backups = exporter.backups()
    assert [b.name for b in backups] == ["hubble-events-2023-11-14T22-13-20.003.log",
                                        "hubble-events-2023-11-14T22-13-20.004.log"]
    files = [*backups, path]
    assert all(f.stat().st_size <= 3 * LINE for f in files)
    uuids = [r.flow.uuid for f in files for r in read_flows(f.read_text().splitlines(), GetFlowsRequest())]
    assert uuids == [f"flow-{n:03d}" for n in range(6, 14)]  # the two oldest files were removed, in order


def test_allow_deny_and_field_mask(tmp_path: Path) -> None:
    path = tmp_path / "flows.json"
    exporter = FlowExporter(path, allow=[FlowFilter(verdict=[DROPPED])], deny=[FlowFilter(uuid=["flow-003"])],
                            field_mask=["uuid", "verdict"])
    written = [exporter.export(flow(n, DROPPED if n % 2 else FORWARDED)) for n in range(6)]
    exporter.close()
    assert written == [False, True, False, False, False, True]
    assert path.read_text() == ('{"flow":{"uuid":"flow-001","verdict":"DROPPED"}}\n'
                                '{"flow":{"uuid":"flow-005","verdict":"DROPPED"}}\n')


def test_an_export_reopened_appends(tmp_path: Path) -> None:
    path = tmp_path / "flows.json"
    for n in range(2):
        exporter = FlowExporter(path, max_size=10 * LINE)
        exporter.export(flow(n))
        exporter.close()
    assert len(path.read_text().splitlines()) == 2


def test_membrane_observe_reads_an_export_file(tmp_path: Path) -> None:
    path = tmp_path / "flows.json"
    exporter = FlowExporter(path)
    for n in range(3):
        exporter.export(flow(n, DROPPED if n == 1 else FORWARDED))
    exporter.close()
    result = CliRunner().invoke(cli, ["observe", "--input-file", str(path), "--verdict", "DROPPED"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "Nov 14 22:13:21.000:  (unknown) <>  (unknown) UNKNOWN DROPPED (TCP Flags: SYN)\n"
    missing = CliRunner().invoke(cli, ["observe", "--input-file", str(tmp_path / "none.json")])
    assert missing.exit_code == 1 and "No such file or directory" in missing.stderr
