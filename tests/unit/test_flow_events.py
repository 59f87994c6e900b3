"""The flow event code (log prefixes) and the flow-logging section of the ruleset.

Regenerate the golden table after an intended change with
``MEMBRANE_UPDATE_GOLDEN=1 pytest tests/unit/test_flow_events.py`` and review the diff.
"""

from __future__ import annotations

import os
import re
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from membrane.datapath.flowcodes import (
    DROP_IPV6,
    DROP_SPOOFED_SOURCE,
    RULES,
    TRACE_FIRST_REPLY,
    TRACE_NEW,
    TRACE_TCP_ORIGINAL,
    TRACE_TCP_REPLY,
    CodeVerdict,
    Direction,
    DropReason,
    EventKind,
    FlowCode,
    FlowCodeError,
    TraceReason,
    parse_prefix,
)
from membrane.datapath.nft import full_sync, render_transaction
from membrane.datapath.ruleset import (
    BASE_CHAINS,
    FLOW_FORWARD,
    FLOW_INPUT,
    FLOW_OUTPUT,
    FLOW_TCP,
    FLOW_TRACE,
    FROM_ENDPOINT,
    DesiredDatapath,
    EndpointAddress,
    FlowLog,
    build_ruleset,
)

GOLDEN = Path(__file__).parent / "golden" / "nft"
PREFIX = re.compile(r'log prefix "([^"]*)" group (\d+) snaplen (\d+)')
ALL_CODES = (TRACE_NEW, TRACE_TCP_ORIGINAL, TRACE_TCP_REPLY, TRACE_FIRST_REPLY, DROP_SPOOFED_SOURCE, DROP_IPV6)


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("MEMBRANE_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text()


def endpoints(count: int) -> list[EndpointAddress]:
    return [EndpointAddress(5 + i, IPv4Address(f"10.244.1.{10 + i}")) for i in range(count)]


# -- the prefix code -------------------------------------------------------------------------------
@pytest.mark.parametrize("code", ALL_CODES, ids=lambda c: c.prefix())
def test_every_code_the_datapath_uses_reads_back_as_itself(code: FlowCode) -> None:
    assert parse_prefix(code.prefix()) == code
    assert code.rule in RULES


def test_the_prefix_carries_event_verdict_reason_and_rule() -> None:
    assert DROP_SPOOFED_SOURCE.prefix() == "mb:d:D:132:10"
    assert TRACE_NEW.prefix() == "mb:t:F:n:1"
    code = parse_prefix("mb:d:D:133:2048")
    assert code == FlowCode(EventKind.DROP, CodeVerdict.DROPPED, DropReason.POLICY_DENIED, 2048)
    assert code is not None and code.drop_reason == 133 and code.is_reply is None
    assert DropReason.POLICY_DENIED.text == "Policy denied"


def test_reply_direction_comes_from_the_trace_reason() -> None:
    assert TRACE_TCP_REPLY.is_reply is True and TRACE_FIRST_REPLY.is_reply is True
    assert TRACE_NEW.is_reply is False and TRACE_TCP_ORIGINAL.is_reply is False


def test_rules_that_see_both_pods_name_the_side_they_decide_for() -> None:
    code = FlowCode(EventKind.DROP, CodeVerdict.DROPPED, DropReason.POLICY_DENIED, 23, Direction.INGRESS)
    assert code.prefix() == "mb:d:D:133:23:i"
    assert parse_prefix("mb:d:D:133:23:i") == code
    assert parse_prefix("mb:p:A:133:24:e") == FlowCode(EventKind.POLICY_VERDICT, CodeVerdict.AUDIT, 133, 24,
                                                       Direction.EGRESS)
    with pytest.raises(FlowCodeError):
        parse_prefix("mb:d:D:133:23:x")


def test_a_drop_reason_the_catalogue_does_not_know_still_parses() -> None:
    code = parse_prefix("mb:d:D:196:2000")
    assert code is not None and code.reason == 196 and code.drop_reason == 196


def test_prefixes_that_are_not_ours_are_ignored() -> None:
    assert parse_prefix("NEW ") is None
    assert parse_prefix("") is None


@pytest.mark.parametrize("prefix", ["mb:t:F:n", "mb:x:F:n:1", "mb:t:F:q:1", "mb:d:D:abc:1", "mb:t:Z:n:1",
                                    "mb:d:D:n:1", "mb:d:D:999:1", "mb:t:F:n:-1"])
def test_a_malformed_prefix_of_ours_is_an_error(prefix: str) -> None:
    with pytest.raises(FlowCodeError):
        parse_prefix(prefix)


def test_codes_refuse_inconsistent_parts() -> None:
    with pytest.raises(ValueError):
        FlowCode(EventKind.TRACE, CodeVerdict.FORWARDED, 132, 1)
    with pytest.raises(ValueError):
        FlowCode(EventKind.DROP, CodeVerdict.DROPPED, TraceReason.NEW, 1)


# -- the flow-logging section -------------------------------------------------------------------------
def test_the_flow_logging_table() -> None:
    ruleset = build_ruleset(DesiredDatapath.from_endpoints(endpoints(2), flow_log=FlowLog()))
    assert_golden("flow_log.nft", render_transaction(full_sync(ruleset)))


def test_off_means_no_log_statement_and_no_flow_chains() -> None:
    text = render_transaction(full_sync(build_ruleset(DesiredDatapath.from_endpoints(endpoints(2)))))
    assert " log " not in text
    assert "flow_" not in text


def test_every_log_rule_reports_to_the_group_with_a_code_the_parser_knows() -> None:
    settings = FlowLog(group=77, snaplen=96)
    text = render_transaction(full_sync(build_ruleset(DesiredDatapath.from_endpoints(endpoints(2),
                                                                                       flow_log=settings))))
    found = PREFIX.findall(text)
    assert {(group, snaplen) for _, group, snaplen in found} == {("77", "96")}
    assert {parse_prefix(prefix) for prefix, _, _ in found} == set(ALL_CODES)


def test_anti_spoofing_drops_are_logged_by_the_dropping_rule() -> None:
    ruleset = build_ruleset(DesiredDatapath.from_endpoints(endpoints(1), flow_log=FlowLog()))
    rules = [r.text for r in next(c for c in ruleset.chains if c.name == FROM_ENDPOINT).rules]
    assert rules[1].startswith("meta nfproto ipv6 counter log") and rules[1].endswith(" drop")
    assert f'"{DROP_IPV6.prefix()}"' in rules[1]
    assert rules[2].startswith("counter log") and rules[2].endswith(" drop")
    assert f'"{DROP_SPOOFED_SOURCE.prefix()}"' in rules[2]


def test_trace_chains_run_after_every_filter_and_only_dispatch_pod_traffic() -> None:
    ruleset = build_ruleset(DesiredDatapath.from_endpoints(endpoints(1), flow_log=FlowLog()))
    base = {c.name: c for c in ruleset.chains if c.base is not None}
    hooks = {name: (chain.base.hook, chain.base.priority) for name, chain in base.items()
             if chain.base is not None and name.startswith("flow_")}
    assert hooks == {FLOW_FORWARD: ("forward", 200), FLOW_INPUT: ("input", 200), FLOW_OUTPUT: ("output", 200)}
    # Every other chain at those hooks (policy, services) decides before the trace is taken.
    others = [b for name, b in BASE_CHAINS.items() if not name.startswith("flow_")
              and b.hook in ("forward", "input", "output")]
    assert others and all(b.priority < 200 for b in others)
    # goto, so a pod-to-pod packet (both rules match) is reported once.
    assert [r.text for r in base[FLOW_FORWARD].rules] == [
        f'iifname "lxc*" goto {FLOW_TRACE}', f'oifname "lxc*" goto {FLOW_TRACE}']
    assert [r.text for r in base[FLOW_INPUT].rules] == [f'iifname "lxc*" goto {FLOW_TRACE}']
    assert [r.text for r in base[FLOW_OUTPUT].rules] == [f'oifname "lxc*" goto {FLOW_TRACE}']
    assert {c.name for c in ruleset.chains} >= {FLOW_TRACE, FLOW_TCP}


def test_the_per_packet_path_does_not_grow_with_pods() -> None:
    small = build_ruleset(DesiredDatapath.from_endpoints(endpoints(1), flow_log=FlowLog()))
    big = build_ruleset(DesiredDatapath.from_endpoints(endpoints(200), flow_log=FlowLog()))
    assert small.structure() == big.structure()
    rules = sum(len(c.rules) for c in big.chains if c.name.startswith("flow_"))
    assert rules == 13  # 4 dispatch + 5 trace + 4 tcp


@pytest.mark.parametrize("bad", [dict(group=70000), dict(snaplen=20), dict(reply_label=128)])
def test_flow_log_settings_are_checked(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        FlowLog(**bad)
