"""``hubble observe`` flag rules: flags in command-line order → whitelist/blacklist and selectors."""

from __future__ import annotations

import pytest

from membrane.core.errors import InvalidInput
from membrane.observe.cliflags import ALL_FLOWS, FilterBuilder, Selectors, build_request, raw_filters_yaml
from membrane.observe.jsonpb import to_json

NOW = 1_700_000_000 * 10**9


def lists(*flags: tuple[str, str] | str) -> tuple[list[str], list[str]]:
    builder = FilterBuilder()
    for flag in flags:
        name, value = (flag, "") if isinstance(flag, str) else flag
        builder.set(name, value)
    white, black = builder.finish()
    return [to_json(f) for f in white], [to_json(f) for f in black]


CASES: list[tuple[str, list[tuple[str, str] | str], list[str], list[str]]] = [
    ("same flag ORed", [("from-pod", "x"), ("from-pod", "kube-system/y")],
     ['{"source_pod":["x","kube-system/y"]}'], []),
    ("two-sided flag", [("pod", "x")], ['{"source_pod":["x"]}', '{"destination_pod":["x"]}'], []),
    ("different flags ANDed", [("ip", "1.1.1.1"), ("verdict", "DROPPED")],
     ['{"source_ip":["1.1.1.1"],"verdict":["DROPPED"]}', '{"destination_ip":["1.1.1.1"],"verdict":["DROPPED"]}'], []),
    ("namespace", [("namespace", "kube-system")],
     ['{"source_pod":["kube-system/"]}', '{"destination_pod":["kube-system/"]}'], []),
    ("pod in namespace", [("pod", "core"), ("namespace", "kube-system")],
     ['{"source_pod":["kube-system/core"]}', '{"destination_pod":["kube-system/core"]}'], []),
    ("from and to namespaces", [("from-namespace", "a"), ("to-namespace", "b")],
     ['{"source_pod":["a/"],"destination_pod":["b/"]}'], []),
    ("all namespaces", ["all-namespaces"], ['{"source_pod":["/"]}', '{"destination_pod":["/"]}'], []),
    ("service keeps its namespace", [("to-service", "web"), ("to-namespace", "shop")],
     ['{"destination_service":["shop/web"]}'], []),
    ("not", ["not", ("from-ip", "1.1.1.1"), ("to-ip", "2.2.2.2")],
     ['{"destination_ip":["2.2.2.2"]}'], ['{"source_ip":["1.1.1.1"]}']),
    ("not applies to one flag only", [("verdict", "FORWARDED"), "not", ("verdict", "DROPPED")],
     ['{"verdict":["FORWARDED"]}'], ['{"verdict":["DROPPED"]}']),
    ("trace sub-type (0 is left out of JSON)", [("type", "trace:to-endpoint")],
     ['{"event_type":[{"type":4,"match_sub_type":true}]}'], []),
    ("types ORed", [("type", "drop"), ("type", "policy-verdict")],
     ['{"event_type":[{"type":1},{"type":5}]}'], []),
    ("numeric type", [("type", "129:3")], ['{"event_type":[{"type":129,"match_sub_type":true,"sub_type":3}]}'], []),
    ("tcp flags", [("tcp-flags", "syn,ack")], ['{"tcp_flags":[{"SYN":true,"ACK":true}]}'], []),
    ("identity by name", [("to-identity", "world")], ['{"destination_identity":[2]}'], []),
    ("workload", [("from-workload", "Deployment/web")],
     ['{"source_workload":[{"name":"web","kind":"Deployment"}]}'], []),
    ("ipv4 switch", ["ipv4"], ['{"ip_version":["IPv4"]}'], []),
    ("http header", [("http-header", "x-a:b:c")], ['{"http_header":[{"key":"x-a","value":"b:c"}]}'], []),
    ("traffic direction", [("traffic-direction", "Ingress")], ['{"traffic_direction":["INGRESS"]}'], []),
    ("unencrypted", ["unencrypted"], ['{"encrypted":[false]}'], []),
]


@pytest.mark.parametrize(("flags", "white", "black"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_flags_make_hubbles_filters(flags: list[tuple[str, str] | str], white: list[str], black: list[str]) -> None:
    assert lists(*flags) == (white, black)


ERRORS: list[tuple[list[tuple[str, str] | str], str]] = [
    ([("from-ip", "1.1.1.1"), ("from-pod", "x")], "filters --from-ip and --from-pod cannot be combined"),
    ([("label", "a=b"), ("from-label", "c=d")], "filters --label and --from-label cannot be combined"),
    ([("pod", "default/x"), ("namespace", "kube-system")], 'namespace conflict: "kube-system" does not contain'),
    (["not", "not"], "consecutive --not statements"),
    (["not"], "trailing --not found in the arguments"),
    ([("verdict", "MAYBE")], "invalid --verdict value: MAYBE"),
    ([("drop-reason-desc", "NOPE")], "invalid --drop-reason-desc value: NOPE"),
    ([("type", "nonsense")], "unable to parse type 'nonsense'"),
    ([("tcp-flags", "syn,foo")], "unknown tcp flag: foo"),
    ([("identity", "somebody")], "invalid security identity"),
    ([("traffic-direction", "sideways")], "invalid traffic direction"),
    ([("http-header", "novalue")], "expected name:value"),
    ([("ip-trace-id", "0")], "must be greater than 0"),
]


@pytest.mark.parametrize(("flags", "message"), ERRORS, ids=[m for _, m in ERRORS])
def test_flag_errors_use_hubbles_messages(flags: list[tuple[str, str] | str], message: str) -> None:
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(")):
        lists(*flags)


def test_selectors() -> None:
    assert build_request(Selectors(), [], [], NOW).number == 20
    assert build_request(Selectors(follow=True), [], [], NOW).number == 0
    assert build_request(Selectors(input_file=True), [], [], NOW).number == 0
    assert build_request(Selectors(all=True), [], [], NOW).number == ALL_FLOWS
    first = build_request(Selectors(first=5), [], [], NOW)
    assert (first.number, first.first) == (5, True)
    window = build_request(Selectors(since="2m", until="1m"), [], [], NOW)
    assert (window.number, window.since.seconds, window.until.seconds) == (0, NOW // 10**9 - 120, NOW // 10**9 - 60)
    following = build_request(Selectors(follow=True, since="2m", until="1m"), [], [], NOW)
    assert following.HasField("since") and not following.HasField("until")  # following has no end
    for selectors, message in ((Selectors(first=1, last=1), "--first and --last"),
                               (Selectors(first=1, follow=True), "--first and --follow"),
                               (Selectors(last=1, all=True), "--last and --all"),
                               (Selectors(since="tomorrow"), "failed to parse the since time")):
        with pytest.raises(InvalidInput, match=message):
            build_request(selectors, [], [], NOW)


def test_raw_filters_print_as_yaml() -> None:
    builder = FilterBuilder()
    builder.set("namespace", "kube-system")
    builder.set("not")
    builder.set("label", "k8s:app='x'")
    white, black = builder.finish()
    assert raw_filters_yaml(build_request(Selectors(), white, black, NOW)) == (
        "allowlist:\n"
        "    - '{\"source_pod\":[\"kube-system/\"]}'\n"
        "    - '{\"destination_pod\":[\"kube-system/\"]}'\n"
        "denylist:\n"
        "    - '{\"source_label\":[\"k8s:app=''x''\"]}'\n"
        "    - '{\"destination_label\":[\"k8s:app=''x''\"]}'\n")
