"""The resource store: a protocol (``base``), the embedded SQLite backend, the etcd backend and
an in-memory fake; the key layout (``keys``) and what lives under it: API objects (``objects``,
the typed client), identities (``identities``) and node pod CIDRs (``ipam``).

:func:`open_store` turns a store URL into a :class:`~membrane.store.base.Store`:

    sqlite:///ABSOLUTE/PATH.db   the embedded default (shared by every process on the host)
    etcd://HOST:PORT[,HOST:PORT…][?cacert=PATH&cert=PATH&key=PATH]
                                 an etcd v3 cluster (see docs/store.md)
    memory://                    a fresh in-process store (tests, demos)
"""

from __future__ import annotations

from membrane.core.errors import InvalidInput
from membrane.store.base import Store

SUPPORTED_URLS = "sqlite:///ABSOLUTE/PATH.db, etcd://HOST:PORT[,HOST:PORT…] or memory://"


async def open_store(url: str) -> Store:
    """Open the store named by ``url``.

    Raises InvalidInput for a URL no backend understands and StoreError when the backend cannot
    open it (permissions, corrupt file, unreachable). Each backend is one branch here; backends
    are imported lazily so that a short-lived command pays only for the one it uses.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise InvalidInput([f"store URL {url!r} is not a URL: use {SUPPORTED_URLS}"])
    if scheme == "memory":
        if rest not in ("", "/"):
            raise InvalidInput([f"store URL {url!r}: memory:// takes no path"])
        from membrane.store.memory import MemoryStore

        return MemoryStore()
    if scheme == "sqlite":
        if not rest.startswith("/") or rest.endswith("/"):
            raise InvalidInput(
                [f"store URL {url!r}: the path must be absolute, as in sqlite:///var/lib/x.db"]
            )
        from membrane.store.sqlite import SqliteStore

        return SqliteStore(rest)
    if scheme == "etcd":
        from membrane.store.etcd import EtcdStore

        return EtcdStore(url)
    raise InvalidInput([f"unsupported store URL {url!r}: use {SUPPORTED_URLS}"])
