"""JSON exactly as Hubble writes it: proto3 JSON with the .proto's field names, one object a line.

Hubble encodes messages with protojson (``UseProtoNames``) and then through Go's ``json.Encoder``,
which compacts the text and escapes ``<``, ``>``, ``&``, U+2028 and U+2029. protojson writes the
fields in the order they are declared in the .proto file (Python's json_format uses field-number
order, so the keys are reordered here); enums as names, 64-bit integers as strings, wrapper types
as bare values, timestamps as RFC 3339 in UTC with 0, 3, 6 or 9 fractional digits.

Primitives: :func:`message_to_dict`, :func:`to_json`, :func:`parse_json`.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from google.protobuf import json_format

_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029",
            "\x7f": "\\u007f"}
_TRANS = str.maketrans(_ESCAPES)

M = TypeVar("M")


def _reorder(descriptor: Any, value: dict[str, Any]) -> dict[str, Any]:
    ordered: dict[str, Any] = {}
    for field in descriptor.fields:  # declaration order
        if field.name not in value:
            continue
        item = value[field.name]
        sub = field.message_type
        # Well-known types (Timestamp, BoolValue, Any, FieldMask …) are JSON scalars or lists already.
        if sub is not None and not sub.full_name.startswith("google.protobuf."):
            if isinstance(item, list):
                item = [_reorder(sub, element) for element in item]
            elif isinstance(item, dict):
                item = _reorder(sub, item)
        ordered[field.name] = item
    return ordered


def message_to_dict(message: Any) -> dict[str, Any]:
    """The message as protojson with proto field names would produce it, keys in declaration order."""
    raw = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return _reorder(message.DESCRIPTOR, raw)


def to_json(message: Any) -> str:
    """One line of Hubble's JSON output for ``message`` (without the trailing newline)."""
    text = json.dumps(message_to_dict(message), ensure_ascii=False, separators=(",", ":"))
    return text.translate(_TRANS)


def parse_json(text: str, message: M) -> M:
    """Fill ``message`` from JSON (proto or camelCase names); unknown fields are ignored."""
    json_format.Parse(text, message, ignore_unknown_fields=True)
    return message
