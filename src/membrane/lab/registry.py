"""Which lab a command means: by name, or the only one there is.

``membrane --lab NAME …`` talks to that lab's store; without a name, a command talks to the
only running lab (a lab whose ``lab up`` finished), and refuses to guess between several.

Primitives: :func:`choose_lab` (pure), :func:`find_lab`, :func:`resolve_lab_store_url`.
"""

from __future__ import annotations

from collections.abc import Sequence

from membrane.core.errors import InvalidInput, NotFound
from membrane.lab.plan import validate_lab_name
from membrane.lab.state import LabDirs, LabRecord, read_all_records, read_record


def choose_lab(records: Sequence[LabRecord], name: str | None, *, flag: str = "--lab") -> LabRecord | None:
    """The record called ``name``; with no name, the only record there is (None when there is none)."""
    if name is not None:
        for record in records:
            if record.name == name:
                return record
        raise NotFound(f"no lab named {name} (membrane lab status lists the labs)")
    if not records:
        return None
    if len(records) > 1:
        names = ", ".join(r.name for r in records)
        raise InvalidInput([f"several labs are running ({names}): pass {flag} NAME"])
    return records[0]


def find_lab(
    name: str | None, *, dirs: LabDirs | None = None, ready_only: bool = False, flag: str = "--lab"
) -> LabRecord | None:
    """Read the record of lab ``name`` (or of the only lab); ``ready_only`` ignores half-built labs."""
    dirs = dirs or LabDirs.from_env()
    if name is not None:
        validate_lab_name(name)
        path = dirs.record_path(name)
        if not path.is_file():
            raise NotFound(f"no lab named {name} (membrane lab status lists the labs)")
        record = read_record(path)
        if ready_only and record.phase != "ready":
            raise NotFound(f"lab {name} is not ready: its 'lab up' did not finish (membrane lab down --name {name})")
        return record
    # Unreadable records of other labs must not break every command: they are skipped here and
    # reported by 'lab status'.
    records, _problems = read_all_records(dirs)
    if ready_only:
        records = [r for r in records if r.phase == "ready"]
    return choose_lab(records, None, flag=flag)


def resolve_lab_store_url(name: str | None) -> str | None:
    """The store URL of lab ``name``, or of the only running lab; None when no lab is running."""
    record = find_lab(name, ready_only=True)
    return record.store_url if record else None
