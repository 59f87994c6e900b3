"""``membrane install`` / ``uninstall`` below a temporary root: what is written, and that
uninstall takes away exactly that."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from membrane.cli.main import cli

BIN = Path(sys.executable).parent


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def install(root: Path, *args: str) -> tuple[int, str, str]:
    return run("install", "--root", str(root), "--bin-dir", str(BIN), *args)


def snapshot(root: Path) -> dict[str, str]:
    """Every path below root with its kind, mode and contents (or link target)."""
    tree: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            mode = oct(path.lstat().st_mode)
            if path.is_symlink():
                tree[rel] = f"link {os.readlink(path)}"
            elif path.is_dir():
                tree[rel] = f"dir {mode}"
            else:
                tree[rel] = f"file {mode} {path.read_text()}"
    return tree


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A host with another network's conflist and a file of its own in /etc."""
    root = tmp_path / "host"
    (root / "etc/cni/net.d").mkdir(parents=True)
    (root / "etc/cni/net.d/10-bridge.conflist").write_text(json.dumps({"cniVersion": "1.0.0", "name": "bridge",
                                                                          "plugins": [{"type": "bridge"}]}))
    (root / "etc/hostname").write_text("h1\n")
    return root


def test_install_writes_the_unit_the_config_the_conflist_and_the_plugin_link(root: Path) -> None:
    code, out, err = install(root, "--store", "etcd://10.0.0.5:2379", "--node", "n1", "--relay")
    assert code == 0, err

    unit = (root / "etc/systemd/system/membrane-agent.service").read_text()
    exec_start = next(line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("ExecStart="))
    assert shlex.split(exec_start) == [str(BIN / "membrane"), "agent", "--config", "/etc/membrane/agent.yaml"]
    for line in ("Restart=always", "KillMode=process", "After=network-online.target", "WantedBy=multi-user.target"):
        assert line in unit.splitlines()
    assert any(line.startswith("RestartSec=") for line in unit.splitlines())
    assert "control-group" not in unit

    relay = (root / "etc/systemd/system/membrane-relay.service").read_text()
    assert f"ExecStart={BIN / 'membrane'} relay --listen 127.0.0.1:4245 --store etcd://10.0.0.5:2379" in relay

    config = yaml.safe_load((root / "etc/membrane/agent.yaml").read_text())
    assert config == {"nodeName": "n1", "store": "etcd://10.0.0.5:2379", "stateDir": "/var/lib/membrane",
                      "runDir": "/run/membrane", "hubble": {"relayAddress": "127.0.0.1:4245"}}

    conflist = json.loads((root / "etc/cni/net.d/05-membrane.conflist").read_text())
    assert conflist["name"] == "membrane"
    assert [p["type"] for p in conflist["plugins"]] == ["membrane-cni", "portmap"]
    assert conflist["plugins"][0]["agentSocket"] == "/run/membrane/agent.sock"
    assert conflist["plugins"][1]["capabilities"] == {"portMappings": True}

    link = root / "opt/cni/bin/membrane-cni"
    assert link.is_symlink() and os.readlink(link) == str(BIN / "membrane-cni")
    assert not (root / "usr/lib/cni").exists()  # not a Debian tree: nothing made there
    assert (root / "var/lib/membrane").stat().st_mode & 0o777 == 0o700
    assert (root / "run/membrane").is_dir()
    manifest = json.loads((root / "var/lib/membrane/install-manifest.json").read_text())
    assert {e["path"] for e in manifest["files"]} == {
        "/etc/systemd/system/membrane-agent.service", "/etc/systemd/system/membrane-relay.service",
        "/etc/membrane/agent.yaml", "/etc/cni/net.d/05-membrane.conflist", "/opt/cni/bin/membrane-cni"}
    assert "services not started (--root)" in out


def test_the_plugin_is_linked_into_debians_directory_when_there_is_one(root: Path) -> None:
    (root / "usr/lib/cni").mkdir(parents=True)
    assert install(root)[0] == 0
    assert os.readlink(root / "usr/lib/cni/membrane-cni") == str(BIN / "membrane-cni")
    assert run("uninstall", "--root", str(root))[0] == 0
    assert list((root / "usr/lib/cni").iterdir()) == []


def test_dry_run_prints_every_path_and_content_and_writes_nothing(root: Path) -> None:
    before = snapshot(root)
    code, out, _ = install(root, "--dry-run", "--relay")
    assert code == 0
    assert snapshot(root) == before
    for rel in ("etc/systemd/system/membrane-agent.service", "etc/systemd/system/membrane-relay.service",
                "etc/membrane/agent.yaml", "etc/cni/net.d/05-membrane.conflist", "opt/cni/bin/membrane-cni",
                "var/lib/membrane/install-manifest.json", "run/membrane"):
        assert str(root / rel) in out
    assert "KillMode=process" in out and '"type": "portmap"' in out


def test_install_then_uninstall_leaves_the_tree_as_it_was(root: Path) -> None:
    before = snapshot(root)
    assert install(root, "--relay")[0] == 0
    assert snapshot(root) != before
    code, out, err = run("uninstall", "--root", str(root))
    assert code == 0, err
    assert snapshot(root) == before
    assert f"removed {root / 'etc/cni/net.d/05-membrane.conflist'}" in out


def test_installing_twice_changes_nothing_and_one_uninstall_undoes_it(root: Path) -> None:
    before = snapshot(root)
    assert install(root)[0] == 0
    installed = snapshot(root)
    code, out, _ = install(root)
    assert code == 0 and "unchanged" in out
    assert snapshot(root) == installed
    assert run("uninstall", "--root", str(root))[0] == 0
    assert snapshot(root) == before


def test_uninstall_keeps_and_names_a_file_changed_since_install(root: Path) -> None:
    assert install(root)[0] == 0
    config = root / "etc/membrane/agent.yaml"
    config.write_text(config.read_text() + "mtu: 1400\n")
    code, _out, err = run("uninstall", "--root", str(root))
    assert code == 1
    assert f"kept {config}: changed since membrane install" in err
    assert config.read_text().endswith("mtu: 1400\n")
    assert not (root / "etc/systemd/system/membrane-agent.service").exists()
    # --force finishes the job the manifest still records.
    code, _, err = run("uninstall", "--root", str(root), "--force")
    assert code == 0, err
    assert not (root / "etc/membrane").exists()
    assert not (root / "var/lib/membrane").exists()


def test_a_different_conflist_of_the_same_name_is_refused_unless_forced(root: Path) -> None:
    theirs = root / "etc/cni/net.d/05-membrane.conflist"
    theirs.write_text('{"cniVersion": "0.4.0", "name": "membrane", "plugins": [{"type": "bridge"}]}\n')
    before = snapshot(root)
    refusal = [f"Error: {theirs}: a different CNI conflist of this name exists (--force replaces it)"]
    code, _, err = install(root)
    assert code == 1
    assert err.strip().splitlines() == refusal
    assert snapshot(root) == before  # a refusal writes nothing
    code, _, err = install(root, "--dry-run")
    assert (code, err.strip().splitlines()) == (1, refusal)

    code, out, err = install(root, "--force")
    assert code == 0, err
    assert json.loads(theirs.read_text())["plugins"][0]["type"] == "membrane-cni"
    assert "replaced the file there" in out
    assert run("uninstall", "--root", str(root))[0] == 0
    assert snapshot(root) == before  # their conflist is back


def test_another_file_defining_the_membrane_network_is_refused(root: Path) -> None:
    other = root / "etc/cni/net.d/50-membrane-old.conflist"
    other.write_text('{"cniVersion": "1.0.0", "name": "membrane", "plugins": []}')
    code, _, err = install(root)
    assert code == 1 and str(other) in err
    assert install(root, "--force")[0] == 0


def test_uninstall_without_an_install_says_so(root: Path) -> None:
    code, _, err = run("uninstall", "--root", str(root))
    assert code == 1
    assert "nothing to uninstall: no install manifest at" in err


def test_installing_to_the_host_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    code, _, err = run("install", "--bin-dir", str(BIN))
    assert code == 1
    assert err.strip() == ("Error: membrane install writes to /etc, /opt and /var: run it as root "
                           "(or pass --root DIR)")
