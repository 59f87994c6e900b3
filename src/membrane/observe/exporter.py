"""Flow export to JSON-lines files with size-based rotation, and reading such files back.

Each line is a GetFlowsResponse in Hubble's JSON (``{"flow":{…},"node_name":…,"time":…}``), the
same as ``hubble observe -o jsonpb`` and Hubble's own export files, so ``membrane observe
--input-file`` (and ``hubble observe --input-file``) read them. Rotation works like Hubble's
exporter: before a line would take the file past ``max_size`` bytes, the file is renamed to
``<name>-<UTC time 2006-01-02T15-04-05.000><ext>`` and a new one started; only the newest
``max_backups`` renamed files are kept (0 keeps them all). Allow/deny lists are FlowFilters, as for GetFlows.

Primitives: :class:`FlowExporter`, :func:`read_flows`.
"""

from __future__ import annotations

import collections
import datetime as dt
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

from google.protobuf import field_mask_pb2, json_format

from membrane.core.errors import InvalidInput
from membrane.observe.filters import FlowMatcher
from membrane.observe.jsonpb import parse_json, to_json
from membrane.observe.model import Flow, FlowFilter, GetFlowsRequest, GetFlowsResponse, flow_response, timestamp_ns

NS = 1_000_000_000
DEFAULT_MAX_SIZE_MB = 10
DEFAULT_MAX_BACKUPS = 5
_STAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}\.\d{3}$")


def _stamp(time_ns: int) -> str:
    t = dt.datetime.fromtimestamp(time_ns // NS, dt.UTC)
    return t.strftime("%Y-%m-%dT%H-%M-%S") + f".{time_ns // 1_000_000 % 1000:03d}"


class FlowExporter:
    """Appends flows to ``path``; a flow sink (``observe``) for :class:`~membrane.observe.observer.FlowPublisher`."""

    def __init__(self, path: Path, *, max_size: int = DEFAULT_MAX_SIZE_MB * 1024 * 1024,
                 max_backups: int = DEFAULT_MAX_BACKUPS, allow: Sequence[FlowFilter] = (),
                 deny: Sequence[FlowFilter] = (), field_mask: Sequence[str] = (),
                 clock: Callable[[], int] = time.time_ns) -> None:
        if max_size <= 0 or max_backups < 0:
            raise InvalidInput(["flow export: max size must be positive and max backups not negative"])
        self.path = path
        self.max_size = max_size
        self.max_backups = max_backups
        self.matcher = FlowMatcher.build(allow, deny)
        self.mask: field_mask_pb2.FieldMask | None = None
        if field_mask:
            self.mask = field_mask_pb2.FieldMask(paths=list(field_mask))
            if not self.mask.IsValidForDescriptor(Flow.DESCRIPTOR):
                raise InvalidInput([f"flow export: invalid field mask: {', '.join(field_mask)}"])
        self._clock = clock
        self._file: TextIO | None = None
        self._size = 0
        self.exported = 0

    def observe(self, flow: Flow) -> None:
        self.export(flow)

    def export(self, flow: Flow) -> bool:
        """Write ``flow`` if the allow/deny lists let it through; returns whether it was written."""
        if not self.matcher(flow):
            return False
        if self.mask is not None:
            masked = Flow()
            self.mask.MergeMessage(flow, masked)
            flow = masked
        line = to_json(flow_response(flow)) + "\n"
        size = len(line.encode())
        file = self._open()
        if self._size and self._size + size > self.max_size:
            file = self._rotate()
        file.write(line)
        file.flush()
        self._size += size
        self.exported += 1
        return True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self) -> TextIO:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open between writes
            self._size = self._file.tell()
        return self._file

    def backups(self) -> list[Path]:
        """The rotated files of this export, oldest first."""
        stem, suffix = self.path.stem, self.path.suffix
        found = []
        for candidate in self.path.parent.glob(f"{stem}-*{suffix}"):
            middle = candidate.name[len(stem) + 1:len(candidate.name) - len(suffix)]
            if _STAMP.match(middle):
                found.append(candidate)
        return sorted(found)

    def _rotate(self) -> TextIO:
        self.close()
        when = self._clock()
        while True:  # two rotations within one millisecond must not share a name
            backup = self.path.with_name(f"{self.path.stem}-{_stamp(when)}{self.path.suffix}")
            if not backup.exists():
                break
            when += 1_000_000
        os.replace(self.path, backup)
        if self.max_backups:  # 0 keeps every backup, as in Hubble
            for old in self.backups()[:-self.max_backups]:
                old.unlink(missing_ok=True)
        return self._open()



def read_flows(lines: Iterable[str], request: GetFlowsRequest,
               warn: Callable[[str], None] = lambda _: None) -> Iterator[GetFlowsResponse]:
    """GetFlows over JSON lines (an export file, ``-o jsonpb`` output), in file order.

    ``number`` selects the first N (with ``first``) or the last N matches; 0 reads everything.
    Lines that do not parse are reported through ``warn`` and skipped.
    """
    matcher = FlowMatcher.build(request.whitelist, request.blacklist)
    since = timestamp_ns(request.since) if request.HasField("since") else None
    until = timestamp_ns(request.until) if request.HasField("until") else None
    number = request.number if request.number < 2**63 else 0  # --all asks for 2^64-1: everything
    last: collections.deque[GetFlowsResponse] | None = None
    if number and not request.first:
        last = collections.deque(maxlen=number)
    returned = 0
    for line_number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            response = parse_json(line, GetFlowsResponse())
        except json_format.ParseError as exc:
            warn(f"line {line_number}: not a flow: {exc}")
            continue
        when = timestamp_ns(response.time) if response.HasField("time") else 0
        if since is not None and when < since:
            continue
        if until is not None and when > until:
            continue
        if response.HasField("flow"):
            if not matcher(response.flow):
                continue
        elif matcher.allow:
            continue
        if last is not None:
            last.append(response)
            continue
        yield response
        returned += 1
        if request.first and number and returned >= number:
            return
    if last is not None:
        yield from last
