"""Which lab a command talks to: by name, the only running one, or none."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from membrane.cli.context import CliContext
from membrane.core.errors import InvalidInput, NotFound
from membrane.lab.lab import initial_record
from membrane.lab.plan import LabPlan
from membrane.lab.registry import choose_lab, find_lab, resolve_lab_store_url
from membrane.lab.state import STATE_DIR_ENV, LabDirs, LabRecord, write_record


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LabDirs:
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "state"))
    monkeypatch.setenv("MEMBRANE_LAB_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.delenv("MEMBRANE_STORE", raising=False)
    monkeypatch.delenv("MEMBRANE_LAB", raising=False)
    return LabDirs.from_env()


def make_record(dirs: LabDirs, name: str, index: int = 0, *, ready: bool = True) -> LabRecord:
    record = initial_record(LabPlan(name, 1, subnet_index=index), dirs, "sqlite", datetime(2024, 1, 1, tzinfo=UTC))
    if ready:
        record = record.model_copy(update={"phase": "ready"})
    write_record(dirs, record)
    return record


def test_no_lab_means_no_lab_store(dirs: LabDirs) -> None:
    assert resolve_lab_store_url(None) is None


def test_the_only_running_lab_is_used(dirs: LabDirs) -> None:
    make_record(dirs, "alpha")
    assert resolve_lab_store_url(None) == f"sqlite://{dirs.state_base}/alpha/store.db"


def test_several_running_labs_need_a_name(dirs: LabDirs) -> None:
    make_record(dirs, "alpha", 0)
    make_record(dirs, "beta", 1)
    with pytest.raises(InvalidInput) as caught:
        resolve_lab_store_url(None)
    assert caught.value.problems == ["several labs are running (alpha, beta): pass --lab NAME"]
    assert resolve_lab_store_url("beta") == f"sqlite://{dirs.state_base}/beta/store.db"


def test_a_half_built_lab_is_not_running(dirs: LabDirs) -> None:
    make_record(dirs, "alpha", 0)
    make_record(dirs, "beta", 1, ready=False)
    assert resolve_lab_store_url(None) == f"sqlite://{dirs.state_base}/alpha/store.db"
    with pytest.raises(NotFound, match="lab beta is not ready"):
        resolve_lab_store_url("beta")
    # Lab commands (status, down) still find it.
    record = find_lab("beta", dirs=dirs)
    assert record is not None and record.phase == "building"


def test_an_unknown_name_is_not_found(dirs: LabDirs) -> None:
    make_record(dirs, "alpha")
    with pytest.raises(NotFound, match="no lab named gamma"):
        resolve_lab_store_url("gamma")


def test_an_unreadable_record_of_another_lab_does_not_get_in_the_way(dirs: LabDirs) -> None:
    make_record(dirs, "alpha")
    (dirs.state_base / "broken").mkdir()
    (dirs.state_base / "broken" / "lab.json").write_text("{not json")
    assert resolve_lab_store_url(None) == f"sqlite://{dirs.state_base}/alpha/store.db"
    with pytest.raises(InvalidInput, match="unreadable lab record"):
        resolve_lab_store_url("broken")


def test_choose_lab_is_pure() -> None:
    assert choose_lab([], None) is None
    with pytest.raises(NotFound):
        choose_lab([], "alpha")


def test_the_cli_context_resolves_through_the_lab(dirs: LabDirs, monkeypatch: pytest.MonkeyPatch) -> None:
    make_record(dirs, "alpha", 0)
    make_record(dirs, "beta", 1)
    assert CliContext(lab_flag="beta").store_url() == f"sqlite://{dirs.state_base}/beta/store.db"
    monkeypatch.setenv("MEMBRANE_LAB", "alpha")
    assert CliContext().store_url() == f"sqlite://{dirs.state_base}/alpha/store.db"
    # --store wins over any lab.
    assert CliContext(store_flag="sqlite:///elsewhere.db", lab_flag="beta").store_url() == "sqlite:///elsewhere.db"
