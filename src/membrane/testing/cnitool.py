"""A Python ``cnitool``: runs the plugins of a network configuration list as a CNI runtime does.

Primitives: :class:`CniTool` (``add``, ``delete``, ``check``, ``status``, ``gc``, ``version``),
:class:`PluginRun`, :class:`ChainResult`, :func:`derive_plugin_config` (pure: the request
configuration of one plugin, SPEC.md section 3), :func:`load_conflist`,
:func:`default_cni_path`, and :class:`FakeEndpointService`, an agent side to run the plugin
against (with ``membrane.agent.api.AgentApiServer``) when no datapath should be touched.

ADD runs the plugins in order and hands each the previous one's result as ``prevResult``; DEL
runs them in reverse with the cached ADD result; CHECK runs them in order with it; an error stops
the chain (GC carries on and reports the first error). Plugins are found on the CNI path, by
default the distribution's directory plus the directory of the running interpreter, where
``membrane-cni`` is installed. The methods are coroutines so that a test can serve the agent's
API in the same event loop while the plugins run.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from membrane.agent.contract import CNI_ERR_UNKNOWN_CONTAINER, CniFailure, CniRequest

DISTRIBUTION_CNI_DIRS = ("/usr/lib/cni", "/opt/cni/bin")


def default_cni_path() -> tuple[str, ...]:
    """Where plugins are looked up: the distribution's directories, then this interpreter's bin dir."""
    return (*DISTRIBUTION_CNI_DIRS, str(Path(sys.executable).parent))


def load_conflist(path: str | Path) -> dict[str, Any]:
    """Read a ``.conflist``; a single-plugin ``.conf`` is wrapped into a list of one."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    if "plugins" not in data:
        plugin = {k: v for k, v in data.items() if k not in ("cniVersion", "name")}
        data = {"cniVersion": data.get("cniVersion", "1.0.0"), "name": data.get("name"), "plugins": [plugin]}
    return data


def format_cni_args(args: Mapping[str, str]) -> str:
    """``{"A": "1", "B": "2"}`` -> ``"A=1;B=2"`` (the CNI_ARGS format)."""
    return ";".join(f"{k}={v}" for k, v in args.items())


def derive_plugin_config(
    conflist: Mapping[str, Any],
    plugin: Mapping[str, Any],
    *,
    prev_result: Mapping[str, Any] | None = None,
    capability_args: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The configuration one plugin receives on stdin (SPEC.md "Deriving request configuration").

    ``cniVersion`` and ``name`` come from the list; ``runtimeConfig`` holds the capability
    arguments the plugin declared in ``capabilities`` (which is itself removed); ``prevResult``
    is set when given; ``extra`` adds keys such as ``cni.dev/valid-attachments``.
    """
    config = {k: v for k, v in plugin.items() if k != "capabilities"}
    config["cniVersion"] = conflist["cniVersion"]
    config["name"] = conflist["name"]
    capabilities = plugin.get("capabilities") or {}
    runtime_config = {
        name: value for name, value in (capability_args or {}).items() if capabilities.get(name) is True
    }
    if runtime_config:
        config["runtimeConfig"] = runtime_config
    if prev_result is not None:
        config["prevResult"] = dict(prev_result)
    if extra:
        config.update(extra)
    return config


@dataclass(frozen=True)
class PluginRun:
    """One plugin execution: its output parsed as JSON (result or error object), stderr as text."""

    plugin: str
    command: str
    returncode: int
    output: dict[str, Any] | None
    stderr: str
    config: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def error(self) -> dict[str, Any] | None:
        """The spec error object of a failed run (synthesised when the plugin printed none)."""
        if self.ok:
            return None
        if self.output and "code" in self.output:
            return self.output
        return {
            "code": 999,
            "msg": f"plugin {self.plugin} exited {self.returncode} without an error object",
            "details": self.stderr.strip(),
        }


class CniChainError(Exception):
    """A chain failed; ``error`` is the spec error object of the plugin that failed."""

    def __init__(self, plugin: str, error: Mapping[str, Any]) -> None:
        self.plugin = plugin
        self.error = dict(error)
        super().__init__(f"{plugin}: code {error.get('code')}: {error.get('msg')} {error.get('details', '')}")


@dataclass(frozen=True)
class ChainResult:
    """A whole chain: every plugin run in execution order, the final result, the first error."""

    command: str
    runs: tuple[PluginRun, ...]
    result: dict[str, Any] | None = None

    @property
    def failed_run(self) -> PluginRun | None:
        return next((run for run in self.runs if not run.ok), None)

    @property
    def error(self) -> dict[str, Any] | None:
        failed = self.failed_run
        return failed.error if failed else None

    @property
    def ok(self) -> bool:
        return self.failed_run is None

    @property
    def order(self) -> list[str]:
        """Plugin types in the order they ran."""
        return [run.plugin for run in self.runs]

    def raise_for_error(self) -> ChainResult:
        failed = self.failed_run
        if failed is not None:
            raise CniChainError(failed.plugin, failed.error or {})
        return self


class CniTool:
    """Runs plugins found on ``cni_path`` with a minimal environment (PATH plus ``CNI_*``).

    ``launcher`` is an argv prefix every plugin runs under, e.g. ``("nsenter", "--net=PATH")``:
    a runtime runs its plugins in the host's namespace, and chained plugins such as ``portmap``
    act on the namespace they run in, so a test whose "host" is a namespace runs them there.
    """

    def __init__(
        self,
        cni_path: Sequence[str | Path] | None = None,
        *,
        timeout: float = 120.0,
        extra_env: Mapping[str, str] | None = None,
        launcher: Sequence[str] = (),
    ) -> None:
        self.cni_path = tuple(str(p) for p in (cni_path or default_cni_path()))
        self.timeout = timeout
        self.extra_env = dict(extra_env or {})
        self.launcher = tuple(launcher)

    def find_plugin(self, plugin_type: str) -> Path:
        for directory in self.cni_path:
            candidate = Path(directory) / plugin_type
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
        raise FileNotFoundError(f"CNI plugin {plugin_type!r} not found in {':'.join(self.cni_path)}")

    async def exec_plugin(
        self, plugin_type: str, command: str, config: Mapping[str, Any], env: Mapping[str, str]
    ) -> PluginRun:
        """Run one plugin with ``CNI_COMMAND=command`` and ``config`` on stdin."""
        executable = self.find_plugin(plugin_type)
        full_env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            **self.extra_env,
            **env,
            "CNI_COMMAND": command,
            "CNI_PATH": ":".join(self.cni_path),
        }
        proc = await asyncio.create_subprocess_exec(
            *self.launcher,
            str(executable),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=full_env,
        )
        try:
            stdout, stderr = await asyncio.wait_for(
                proc.communicate(json.dumps(config).encode()), self.timeout
            )
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return PluginRun(plugin_type, command, -9, None, f"timed out after {self.timeout}s", dict(config))
        output: dict[str, Any] | None = None
        if stdout.strip():
            try:
                parsed = json.loads(stdout)
                output = parsed if isinstance(parsed, dict) else None
            except ValueError:
                output = None
        assert proc.returncode is not None
        return PluginRun(
            plugin_type, command, proc.returncode, output, stderr.decode(errors="replace"), dict(config)
        )

    @staticmethod
    def _attachment_env(
        container_id: str, netns: str, ifname: str, args: Mapping[str, str] | None
    ) -> dict[str, str]:
        env = {"CNI_CONTAINERID": container_id, "CNI_IFNAME": ifname, "CNI_NETNS": netns}
        if args:
            env["CNI_ARGS"] = format_cni_args(args)
        return env

    async def add(
        self,
        conflist: Mapping[str, Any],
        container_id: str,
        netns: str,
        ifname: str = "eth0",
        *,
        args: Mapping[str, str] | None = None,
        capability_args: Mapping[str, Any] | None = None,
    ) -> ChainResult:
        """ADD through the chain in order; each plugin after the first gets the previous result."""
        env = self._attachment_env(container_id, netns, ifname, args)
        runs: list[PluginRun] = []
        prev: dict[str, Any] | None = None
        for plugin in conflist["plugins"]:
            config = derive_plugin_config(conflist, plugin, prev_result=prev, capability_args=capability_args)
            run = await self.exec_plugin(plugin["type"], "ADD", config, env)
            runs.append(run)
            if not run.ok:
                return ChainResult("ADD", tuple(runs))
            prev = run.output
        return ChainResult("ADD", tuple(runs), prev)

    async def delete(
        self,
        conflist: Mapping[str, Any],
        container_id: str,
        netns: str = "",
        ifname: str = "eth0",
        *,
        prev_result: Mapping[str, Any] | None = None,
        args: Mapping[str, str] | None = None,
        capability_args: Mapping[str, Any] | None = None,
    ) -> ChainResult:
        """DEL through the chain in reverse order, each plugin getting the cached ADD result."""
        env = self._attachment_env(container_id, netns, ifname, args)
        return await self._sequence(
            "DEL", reversed(conflist["plugins"]), conflist, env, prev_result, capability_args
        )

    async def check(
        self,
        conflist: Mapping[str, Any],
        container_id: str,
        netns: str,
        ifname: str = "eth0",
        *,
        prev_result: Mapping[str, Any],
        args: Mapping[str, str] | None = None,
        capability_args: Mapping[str, Any] | None = None,
    ) -> ChainResult:
        """CHECK through the chain in order (nothing runs when the list sets ``disableCheck``)."""
        if conflist.get("disableCheck") in (True, "true"):
            return ChainResult("CHECK", ())
        env = self._attachment_env(container_id, netns, ifname, args)
        return await self._sequence("CHECK", conflist["plugins"], conflist, env, prev_result, capability_args)

    async def status(self, conflist: Mapping[str, Any]) -> ChainResult:
        """STATUS (CNI 1.1) for every plugin in order, stopping at the first error."""
        return await self._sequence("STATUS", conflist["plugins"], conflist, {}, None, None)

    async def gc(
        self, conflist: Mapping[str, Any], valid_attachments: Iterable[tuple[str, str]]
    ) -> ChainResult:
        """GC (CNI 1.1) for every plugin; errors do not stop the others."""
        extra = {
            "cni.dev/valid-attachments": [
                {"containerID": cid, "ifname": ifname} for cid, ifname in valid_attachments
            ]
        }
        runs = []
        for plugin in conflist["plugins"]:
            config = derive_plugin_config(conflist, plugin, extra=extra)
            runs.append(await self.exec_plugin(plugin["type"], "GC", config, {}))
        return ChainResult("GC", tuple(runs))

    async def version(self, plugin_type: str, cni_version: str = "1.0.0") -> PluginRun:
        return await self.exec_plugin(plugin_type, "VERSION", {"cniVersion": cni_version}, {})

    async def _sequence(
        self,
        command: str,
        plugins: Iterable[Mapping[str, Any]],
        conflist: Mapping[str, Any],
        env: Mapping[str, str],
        prev_result: Mapping[str, Any] | None,
        capability_args: Mapping[str, Any] | None,
    ) -> ChainResult:
        runs: list[PluginRun] = []
        for plugin in plugins:
            config = derive_plugin_config(
                conflist, plugin, prev_result=prev_result, capability_args=capability_args
            )
            run = await self.exec_plugin(plugin["type"], command, config, env)
            runs.append(run)
            if not run.ok:
                break
        return ChainResult(command, tuple(runs))


def fake_cni_result(request: CniRequest) -> dict[str, Any]:
    """The 1.0.0 result :class:`FakeEndpointService` answers an ADD with (fixed addresses)."""
    return {
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "lxc0a1b2c3d4e5", "mac": "7e:3b:00:00:00:01"},
            {"name": request.ifname, "mac": "7e:3b:00:00:00:02", "sandbox": request.netns},
        ],
        "ips": [
            {"address": "10.244.1.23/32", "gateway": "10.244.1.1", "interface": 1},
            {"address": "fd00:10:244:1::17/128", "gateway": "fd00:10:244:1::1", "interface": 1},
        ],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}, {"dst": "::/0", "gw": "fd00:10:244:1::1"}],
        "dns": {"nameservers": ["10.96.0.10"], "search": ["default.svc.cluster.local"]},
    }


class FakeEndpointService:
    """An EndpointService that records every request and answers ADD with :func:`fake_cni_result`.

    ``failures`` maps a command ("ADD", "DEL", "CHECK", "GC") to the exception to raise for it;
    ``attached`` holds (containerID, ifname) of attachments added and not yet deleted.
    """

    def __init__(self) -> None:
        self.requests: list[CniRequest] = []
        self.failures: dict[str, Exception] = {}
        self.attached: set[tuple[str, str]] = set()
        self.gc_calls: list[list[tuple[str, str]]] = []

    def commands(self) -> list[tuple[str, str]]:
        """(command, containerID) of every request, in order."""
        return [(r.command, r.container_id) for r in self.requests]

    def _record(self, request: CniRequest) -> None:
        self.requests.append(request)
        failure = self.failures.get(request.command)
        if failure is not None:
            raise failure

    async def cni_add(self, request: CniRequest) -> dict[str, Any]:
        self._record(request)
        self.attached.add((request.container_id, request.ifname))
        return fake_cni_result(request)

    async def cni_del(self, request: CniRequest) -> None:
        self._record(request)
        self.attached.discard((request.container_id, request.ifname))

    async def cni_check(self, request: CniRequest) -> None:
        self._record(request)
        if (request.container_id, request.ifname) not in self.attached:
            raise CniFailure(CNI_ERR_UNKNOWN_CONTAINER, f"no endpoint for container {request.container_id}")

    async def cni_gc(self, request: CniRequest, valid_attachments: list[tuple[str, str]]) -> None:
        self._record(request)
        self.gc_calls.append(list(valid_attachments))
        self.attached &= set(valid_attachments)
