"""Numbers that stay with their objects: the one allocation rule behind local CIDR identities and
frontend ids.

Primitives: :func:`stable_ids`.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


def stable_ids(wanted: Iterable[K], previous: Mapping[K, int], first: int) -> dict[K, int]:
    """A number for every key of ``wanted`` (in the order given): a key keeps the number it had in
    ``previous``; a new key takes the lowest number from ``first`` on that no kept key holds, so a
    freed number is reused and the result depends only on the inputs."""
    keys = list(dict.fromkeys(wanted))
    result = {k: previous[k] for k in keys if k in previous}
    used = set(result.values())
    candidate = first
    for k in keys:
        if k in result:
            continue
        while candidate in used:
            candidate += 1
        result[k] = candidate
        used.add(candidate)
    return result
