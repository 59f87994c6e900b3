"""Numbers stay with their keys; freed numbers are reused lowest first."""

from __future__ import annotations

from membrane.core.ids import stable_ids


def test_kept_numbers_stay_and_new_keys_take_the_lowest_free_ones() -> None:
    first = stable_ids(["a", "b", "c"], {}, first=10)
    assert first == {"a": 10, "b": 11, "c": 12}
    second = stable_ids(["a", "c", "d", "e"], first, first=10)
    assert second == {"a": 10, "c": 12, "d": 11, "e": 13}
    assert stable_ids(["e", "a"], second, first=10) == {"e": 13, "a": 10}
