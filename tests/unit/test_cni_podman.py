"""The podman test kit without podman: rendered configuration, argv order, rootfs, clean-up."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from membrane.testing.podman import (
    Podman,
    PodmanError,
    PodmanSetup,
    build_busybox_rootfs,
    membrane_conflist,
    podman_session,
    write_conflist,
)

# Stands in for podman: records its argv and environment, answers like `podman run -d`.
FAKE_PODMAN = """#!{python}
import json, os, sys
with open({log!r}, "a") as log:
    log.write(json.dumps({{"argv": sys.argv[1:], "conf": os.environ.get("CONTAINERS_CONF")}}) + "\\n")
if "fail" in sys.argv:
    print("Error: no such container", file=sys.stderr)
    sys.exit(125)
if "run" in sys.argv:
    print("f" * 64)
"""


def fake_podman(tmp_path: Path) -> tuple[dict[str, str], Path]:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    log = tmp_path / "podman.log"
    script = bin_dir / "podman"
    script.write_text(FAKE_PODMAN.format(python=sys.executable, log=str(log)))
    script.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}, log


def test_containers_conf_selects_cni_runc_and_private_paths(tmp_path: Path) -> None:
    setup = PodmanSetup(base=tmp_path, plugin_dirs=(Path("/opt/membrane/bin"),), default_network="net1")
    conf = setup.render_containers_conf()
    assert 'network_backend = "cni"' in conf
    assert f'network_config_dir = "{tmp_path}/cni-net.d"' in conf
    assert 'cni_plugin_dirs = ["/opt/membrane/bin", "/usr/lib/cni", "/opt/cni/bin"]' in conf
    assert 'default_network = "net1"' in conf
    assert 'cgroup_manager = "cgroupfs"' in conf and 'events_logger = "file"' in conf
    assert 'default_ulimits = ["nofile=4096:4096", "nproc=1024:1024"]' in conf
    assert f'runtime = "{tmp_path}/bin/runc"' in conf
    assert f'tmp_dir = "{tmp_path}/tmp"' in conf
    assert 'driver = "vfs"' in setup.render_storage_conf()


def test_runc_wrapper_keeps_runc_state_private(tmp_path: Path) -> None:
    setup = PodmanSetup(base=tmp_path)
    setup.write()
    wrapper = setup.runtime.read_text()
    assert f'--root "{tmp_path}/runc-state"' in wrapper
    assert os.access(setup.runtime, os.X_OK)


async def test_run_detached_puts_the_rootfs_and_command_last(tmp_path: Path) -> None:
    env, log = fake_podman(tmp_path)
    setup = PodmanSetup(base=tmp_path / "pm", extra_env=env)
    setup.write()
    podman = Podman(setup)
    cid = await podman.run_detached(
        "net1", tmp_path / "rootfs", "/bin/httpd", "-f", name="web", options=["--env", "A=1"]
    )
    assert cid == "f" * 64 and podman.containers == [cid]
    [call] = [json.loads(line) for line in log.read_text().splitlines()]
    argv = call["argv"]
    assert argv[:6] == ["--root", f"{setup.root}", "--runroot", f"{setup.runroot}", "--storage-driver", "vfs"]
    run = argv[argv.index("run") :]
    # --rootfs is a boolean flag: the directory takes the image position, options must precede it
    assert run[-4:] == ["--rootfs", str(tmp_path / "rootfs"), "/bin/httpd", "-f"]
    assert run[:4] == ["run", "-d", "--network", "net1"]
    assert "--cgroup-parent" in run and "--env" in run
    assert call["conf"] == str(setup.containers_conf)


async def test_podman_failure_names_the_command_and_its_error(tmp_path: Path) -> None:
    env, _ = fake_podman(tmp_path)
    setup = PodmanSetup(base=tmp_path / "pm", extra_env=env)
    setup.write()
    with pytest.raises(PodmanError, match="no such container") as err:
        await Podman(setup).run("inspect", "fail")
    assert err.value.returncode == 125


async def test_session_writes_conflists_and_removes_everything(tmp_path: Path) -> None:
    env, log = fake_podman(tmp_path)
    conflist = membrane_conflist(
        "net1",
        agent_socket="/run/membrane/agent.sock",
        del_queue_dir="/run/membrane/cni-del-queue",
        chained=[{"type": "tuning"}],
    )
    base = tmp_path / "pm"
    async with podman_session(base, [conflist], extra_env=env) as podman:
        written = json.loads((podman.setup.network_dir / "net1.conflist").read_text())
        assert [p["type"] for p in written["plugins"]] == ["membrane-cni", "tuning"]
        assert written["plugins"][0]["agentSocket"] == "/run/membrane/agent.sock"
        assert podman.setup.default_network == "net1"
    assert not base.exists()
    assert json.loads(log.read_text().splitlines()[-1])["argv"][-5:] == ["rm", "-a", "-f", "-t", "0"]


def test_write_conflist_names_the_file_after_the_network(tmp_path: Path) -> None:
    path = write_conflist(tmp_path / "net.d", {"cniVersion": "1.0.0", "name": "blue", "plugins": []})
    assert path == tmp_path / "net.d" / "blue.conflist"


@pytest.mark.skipif(not os.path.exists("/bin/busybox"), reason="busybox-static not installed")
def test_busybox_rootfs_has_applets_and_files(tmp_path: Path) -> None:
    root = build_busybox_rootfs(tmp_path / "rootfs", {"www/index.html": "hello\n"})
    assert os.readlink(root / "bin" / "httpd") == "busybox"
    assert (root / "bin" / "sh").is_symlink()
    assert (root / "www" / "index.html").read_text() == "hello\n"
    assert (root / "etc" / "passwd").read_text().startswith("root:x:0:0:")
