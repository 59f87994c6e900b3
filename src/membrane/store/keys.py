"""Where everything lives in the store. One module, so the layout can be read in one place.

    /membrane/objects/<plural>/<namespace>/<name>   namespaced API objects (Pod, Service, CNP, ...)
    /membrane/objects/<plural>/<name>               cluster-scoped API objects (Namespace, CCNP, CiliumNode, ...)
    /membrane/config/cluster                        cluster-wide settings, written once by the first agent
    /membrane/ipam/podcidrs/<a.b.c.d_len>           node pod CIDR allocation -> node name
    /membrane/ipam/ips/<a.b.c.d>                    pod IP allocation -> endpoint key
    /membrane/identities/id/<id>                    identity -> canonical label list (JSON)
    /membrane/identities/labels/<sha256>            sha256 of the canonical label list -> identity
    /membrane/endpoints/<node>/<container id>       endpoint record (owned by that node's agent)
    /membrane/heartbeats/<node>                     node liveness, bound to the agent's lease
    /membrane/leases/<role>                         cluster-wide roles held by one agent (operator)
"""

from __future__ import annotations

import hashlib
import ipaddress

ROOT = "/membrane/"
OBJECTS = ROOT + "objects/"
CLUSTER_CONFIG = ROOT + "config/cluster"
POD_CIDRS = ROOT + "ipam/podcidrs/"
POD_IPS = ROOT + "ipam/ips/"
IDENTITY_BY_ID = ROOT + "identities/id/"
IDENTITY_BY_LABELS = ROOT + "identities/labels/"
ENDPOINTS = ROOT + "endpoints/"
HEARTBEATS = ROOT + "heartbeats/"
ROLES = ROOT + "leases/"


def object_key(plural: str, namespace: str | None, name: str) -> str:
    if namespace:
        return f"{OBJECTS}{plural}/{namespace}/{name}"
    return f"{OBJECTS}{plural}/{name}"


def objects_prefix(plural: str, namespace: str | None = None) -> str:
    if namespace:
        return f"{OBJECTS}{plural}/{namespace}/"
    return f"{OBJECTS}{plural}/"


def pod_cidr_key(cidr: ipaddress.IPv4Network) -> str:
    return f"{POD_CIDRS}{cidr.network_address}_{cidr.prefixlen}"


def pod_ip_key(ip: ipaddress.IPv4Address) -> str:
    return f"{POD_IPS}{ip}"


def identity_id_key(identity: int) -> str:
    return f"{IDENTITY_BY_ID}{identity}"


def identity_labels_key(canonical_labels: list[str]) -> str:
    digest = hashlib.sha256("\n".join(canonical_labels).encode()).hexdigest()
    return f"{IDENTITY_BY_LABELS}{digest}"


def endpoint_key(node: str, container_id: str) -> str:
    return f"{ENDPOINTS}{node}/{container_id}"


def endpoints_prefix(node: str | None = None) -> str:
    return f"{ENDPOINTS}{node}/" if node else ENDPOINTS


def heartbeat_key(node: str) -> str:
    return f"{HEARTBEATS}{node}"


def role_key(role: str) -> str:
    return f"{ROLES}{role}"
