"""The time layouts and durations Hubble's CLI prints and parses, written out for Python.

Hubble prints timestamps in UTC with Go layouts selected by ``--time-format`` (``StampMilli`` by
default: ``Jan _2 15:04:05.000``, the day padded with a space) and reads ``--since``/``--until`` as
a Go duration before now (``3s``, ``1h43m``) or an absolute time in one of a few layouts.

Primitives: :data:`TIME_FORMATS`, :func:`format_time`, :func:`parse_time`, :func:`parse_duration`,
:func:`format_duration`.
"""

from __future__ import annotations

import datetime as dt
import re

from membrane.core.errors import InvalidInput

NS = 1_000_000_000
# Timestamps protobuf accepts: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z.
_MIN_SECONDS = -62135596800
_MAX_SECONDS = 253402300799

# Go's names, independent of the C library's locale.
_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
_WEEKDAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]

TIME_FORMATS = ("YearMonthDay", "YearMonthDayHour", "YearMonthDayHourMinute", "StampMilli", "RFC3339",
                "RFC3339Milli", "RFC3339Micro", "RFC3339Nano", "RFC1123Z")


def normalize_format(name: str) -> str:
    """The canonical layout name; unknown names fall back to StampMilli as Hubble does."""
    for known in TIME_FORMATS:
        if known.lower() == name.lower():
            return known
    return "StampMilli"


def _fraction(nanos: int, digits: int, trim: bool) -> str:
    text = f"{nanos:09d}"[:digits]
    if trim:
        text = text.rstrip("0")
    return "." + text if text else ""


def format_time(time_ns: int | None, layout: str = "StampMilli") -> str:
    """``time_ns`` in UTC with the named layout; "N/A" when absent or outside protobuf's range."""
    if time_ns is None:
        return "N/A"
    seconds, nanos = divmod(time_ns, NS)
    if not _MIN_SECONDS <= seconds <= _MAX_SECONDS:
        return "N/A"
    t = dt.datetime(1, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=seconds - _MIN_SECONDS)
    date = f"{t.year:04d}-{t.month:02d}-{t.day:02d}"
    clock = f"{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
    match normalize_format(layout):
        case "StampMilli":
            return f"{_MONTHS[t.month - 1]} {t.day:2d} {clock}{_fraction(nanos, 3, False)}"
        case "YearMonthDay":
            return date
        case "YearMonthDayHour":
            return f"{date}T{t.hour:02d}Z"
        case "YearMonthDayHourMinute":
            return f"{date}T{t.hour:02d}:{t.minute:02d}Z"
        case "RFC3339":
            return f"{date}T{clock}Z"
        case "RFC3339Milli":
            return f"{date}T{clock}{_fraction(nanos, 3, True)}Z"
        case "RFC3339Micro":
            return f"{date}T{clock}{_fraction(nanos, 6, True)}Z"
        case "RFC3339Nano":
            return f"{date}T{clock}{_fraction(nanos, 9, True)}Z"
        case _:  # RFC1123Z
            return f"{_WEEKDAYS[t.weekday()]}, {t.day:02d} {_MONTHS[t.month - 1]} {t.year:04d} {clock} +0000"


_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "μs": 1_000, "ms": 1_000_000, "s": NS, "m": 60 * NS,
          "h": 3600 * NS}
_DURATION_PART = re.compile(r"(\d*)(?:\.(\d*))?(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> int:
    """A Go duration (``300ms``, ``-1.5h``, ``2h45m``) in ns; raises ValueError if it is not one."""
    rest = text
    sign = 1
    if rest[:1] in "+-" and rest:
        sign = -1 if rest[0] == "-" else 1
        rest = rest[1:]
    if rest == "0":
        return 0
    if not rest:
        raise ValueError(f"invalid duration {text!r}")
    total = 0
    while rest:
        match = _DURATION_PART.match(rest)
        if not match or (not match.group(1) and not match.group(2)):
            raise ValueError(f"invalid duration {text!r}")
        whole, frac, unit = match.group(1) or "0", match.group(2) or "", match.group(3)
        scale = _UNITS[unit]
        total += int(whole) * scale
        if frac:
            total += int(frac) * scale // 10 ** len(frac)
        rest = rest[match.end():]
    return sign * total


_DATE = r"(\d{4})-(\d{2})-(\d{2})"
_ZONE = r"(Z|[+-]\d{2}:\d{2})"
_ABSOLUTE = [
    re.compile(rf"^{_DATE}$"),
    re.compile(rf"^{_DATE}T(\d{{2}}){_ZONE}$"),
    re.compile(rf"^{_DATE}T(\d{{2}}):(\d{{2}}){_ZONE}$"),
    re.compile(rf"^{_DATE}T(\d{{2}}):(\d{{2}}):(\d{{2}})(?:\.(\d{{1,9}}))?{_ZONE}$"),
]
_RFC1123Z = re.compile(r"^[A-Z][a-z]{2}, (\d{2}) ([A-Z][a-z]{2}) (\d{4}) (\d{2}):(\d{2}):(\d{2}) ([+-])(\d{2})(\d{2})$")


def _zone_seconds(zone: str) -> int:
    if zone == "Z":
        return 0
    sign = -1 if zone[0] == "-" else 1
    return sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)


def _epoch_ns(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0,
              nanos: int = 0, offset: int = 0) -> int:
    t = dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC)
    seconds = int((t - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)).total_seconds()) - offset
    return seconds * NS + nanos


def parse_time(text: str, now_ns: int) -> int:
    """``--since``/``--until``: a duration before ``now_ns`` or an absolute time, in ns since the epoch."""
    try:
        return now_ns - parse_duration(text)
    except ValueError:
        pass
    try:
        for i, pattern in enumerate(_ABSOLUTE):
            match = pattern.match(text)
            if not match:
                continue
            g = match.groups()
            year, month, day = int(g[0]), int(g[1]), int(g[2])
            if i == 0:
                return _epoch_ns(year, month, day)
            if i == 1:
                return _epoch_ns(year, month, day, int(g[3]), offset=_zone_seconds(g[4]))
            if i == 2:
                return _epoch_ns(year, month, day, int(g[3]), int(g[4]), offset=_zone_seconds(g[5]))
            nanos = int((g[6] or "").ljust(9, "0"))
            return _epoch_ns(year, month, day, int(g[3]), int(g[4]), int(g[5]), nanos, _zone_seconds(g[7]))
        match = _RFC1123Z.match(text)
        if match and match.group(2) in _MONTHS:
            g = match.groups()
            offset = (int(g[7]) * 3600 + int(g[8]) * 60) * (-1 if g[6] == "-" else 1)
            return _epoch_ns(int(g[2]), _MONTHS.index(g[1]) + 1, int(g[0]), int(g[3]), int(g[4]), int(g[5]),
                             offset=offset)
    except ValueError:
        pass
    raise InvalidInput([f"failed to convert {text} to time"])


def format_duration(ns: int) -> str:
    """Go's ``time.Duration.String()``: ``1h2m3.5s``, ``1.5ms``, ``0s``."""
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < NS:
        for unit, scale in (("ms", 1_000_000), ("µs", 1_000), ("ns", 1)):
            if ns >= scale:
                whole, frac = divmod(ns, scale)
                digits = len(str(scale)) - 1
                tail = f"{frac:0{digits}d}".rstrip("0") if digits else ""
                return f"{sign}{whole}{'.' + tail if tail else ''}{unit}"
    hours, rest = divmod(ns, 3600 * NS)
    minutes, rest = divmod(rest, 60 * NS)
    seconds, frac = divmod(rest, NS)
    tail = f"{frac:09d}".rstrip("0")
    text = f"{seconds}{'.' + tail if tail else ''}s"
    if hours:
        return f"{sign}{hours}h{minutes}m{text}"
    if minutes:
        return f"{sign}{minutes}m{text}"
    return sign + text
