"""Which kinds exist, how users name them, and how a raw mapping becomes a validated object.

Primitives:

- :class:`KindInfo` -- one kind: its apiVersions, plural/singular/short names, scope, model.
- :data:`KINDS`, :func:`lookup_kind` (kind, plural, singular or short name, any case, with an
  optional ``.group`` suffix as kubectl accepts), :func:`kind_info` (by exact kind).
- :class:`ObjectRef` -- (kind, namespace, name) of an object, with its kubectl names (its store key
  is :func:`membrane.store.objects.ref_key`: the models know nothing of the store).
- :func:`validate_object` -- a mapping to a validated :class:`~membrane.api.meta.ApiObject`, or
  :class:`ObjectInvalid` carrying one (field path, message) per problem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from membrane.api import cilium, k8s
from membrane.api.meta import ApiObject, collect_problems, join_path
from membrane.core.errors import InvalidInput


@dataclass(frozen=True)
class KindInfo:
    kind: str
    api_versions: tuple[str, ...]  # the preferred one first
    plural: str
    singular: str
    short_names: tuple[str, ...]
    namespaced: bool
    model: type[ApiObject]
    #: Written by the agents; users may read and delete it but not apply it.
    system: bool = False

    @property
    def group(self) -> str:
        version = self.api_versions[0]
        return version.rpartition("/")[0] if "/" in version else ""

    @property
    def resource(self) -> str:
        """kubectl's name of the resource type: ``pod``, ``ciliumnetworkpolicy.cilium.io``."""
        return f"{self.singular}.{self.group}" if self.group else self.singular

    def names(self) -> tuple[str, ...]:
        return (self.kind.lower(), self.plural, self.singular, *self.short_names)


def _info(model: type[ApiObject], plural: str, short: tuple[str, ...], namespaced: bool, **kw: Any) -> KindInfo:
    kind = model.model_fields["kind"].default
    return KindInfo(kind, model.api_versions, plural, kind.lower(), short, namespaced, model, **kw)


KINDS: tuple[KindInfo, ...] = (
    _info(k8s.Namespace, "namespaces", ("ns",), False),
    _info(k8s.Pod, "pods", ("po",), True),
    _info(k8s.Service, "services", ("svc",), True),
    _info(k8s.NetworkPolicy, "networkpolicies", ("netpol",), True),
    _info(cilium.CiliumNetworkPolicy, "ciliumnetworkpolicies", ("cnp", "ciliumnp"), True),
    _info(cilium.CiliumClusterwideNetworkPolicy, "ciliumclusterwidenetworkpolicies", ("ccnp",), False),
    _info(
        cilium.CiliumLoadBalancerIPPool,
        "ciliumloadbalancerippools",
        ("ippools", "ippool", "lbippool", "lbippools"),
        False,
    ),
    _info(cilium.CiliumL2AnnouncementPolicy, "ciliuml2announcementpolicies", ("l2announcement",), False),
    _info(cilium.CiliumBGPPeeringPolicy, "ciliumbgppeeringpolicies", ("bgpp",), False),
    _info(cilium.CiliumBGPClusterConfig, "ciliumbgpclusterconfigs", ("cbgpcluster",), False),
    _info(cilium.CiliumBGPPeerConfig, "ciliumbgppeerconfigs", ("cbgppeer",), False),
    _info(cilium.CiliumBGPAdvertisement, "ciliumbgpadvertisements", ("cbgpadvert",), False),
    _info(cilium.CiliumNode, "ciliumnodes", ("cn", "ciliumn"), False, system=True),
    _info(k8s.EndpointSlice, "endpointslices", (), True),
)

_BY_KIND = {info.kind: info for info in KINDS}
_BY_NAME = {name: info for info in KINDS for name in info.names()}


#: The kinds that hold network policy, as the store names their prefixes.
POLICY_PLURALS: tuple[str, ...] = ("networkpolicies", "ciliumnetworkpolicies", "ciliumclusterwidenetworkpolicies")


def kind_info(kind: str) -> KindInfo:
    """The kind named exactly (``CiliumNetworkPolicy``); InvalidInput if unknown."""
    try:
        return _BY_KIND[kind]
    except KeyError:
        raise InvalidInput([f"unknown kind {kind!r}"]) from None


def find_kind(name: str) -> KindInfo | None:
    """Resolve what a user typed: kind, plural, singular or short name, any case, optional ``.group``."""
    lowered = name.lower()
    if (info := _BY_NAME.get(lowered)) is not None:
        return info
    base, dot, group = lowered.partition(".")
    if dot and (info := _BY_NAME.get(base)) is not None and info.group == group:
        return info
    return None


def lookup_kind(name: str) -> KindInfo:
    """Like :func:`find_kind`, raising InvalidInput (``unknown resource type``) when nothing matches."""
    info = find_kind(name)
    if info is None:
        raise InvalidInput([f"unknown resource type {name!r}{did_you_mean(name)}"])
    return info


def did_you_mean(name: str) -> str:
    import difflib

    names = sorted({n for info in KINDS for n in (info.kind, info.plural, *info.short_names)})
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
    if not close:
        close = difflib.get_close_matches(name.lower(), [n.lower() for n in names], n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True, order=True)
class ObjectRef:
    """Names one object. ``namespace`` is None for cluster-scoped kinds."""

    kind: str
    namespace: str | None
    name: str

    @classmethod
    def of(cls, obj: ApiObject) -> ObjectRef:
        return cls(obj.kind, obj.metadata.namespace, obj.name)

    @property
    def info(self) -> KindInfo:
        return kind_info(self.kind)

    def slash_name(self) -> str:
        """``pod/web``, ``ciliumnetworkpolicy.cilium.io/rule1`` (apply, label output)."""
        return f"{self.info.resource}/{self.name}"

    def quoted_name(self) -> str:
        """``pod "web"`` (delete output)."""
        return f'{self.info.resource} "{self.name}"'

    def not_found(self) -> str:
        """kubectl's NotFound message: ``pods "web" not found``."""
        return f'{self.info.plural} "{self.name}" not found'

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"


# --- validation: pydantic errors -> Kubernetes-style (path, message) ----------------------------------


class ObjectInvalid(InvalidInput):
    """A mapping that is not a valid object. ``issues`` holds (field path, message) pairs."""

    def __init__(self, issues: list[tuple[str, str]]) -> None:
        self.issues = issues
        super().__init__([f"{path}: {message}" if path else message for path, message in issues])


_QUOTED = re.compile(r"'((?:[^'\\]|\\.)*)'")


def _loc_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for item in loc:
        if item == "[key]":
            continue
        path = join_path(path, f"[{item}]" if isinstance(item, int) else str(item))
    return path


def _message(error: Any) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "missing":
        return "required value"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "literal_error":
        allowed = ", ".join(f'"{value}"' for value in _QUOTED.findall(str(ctx.get("expected", ""))))
        got = error.get("input")
        shown = f'"{got}"' if isinstance(got, str) else repr(got)
        return f"unsupported value {shown}: supported values: {allowed}"
    if kind in ("string_type", "string_sub_type"):
        return "must be a string"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return "must be an integer"
    if kind in ("bool_type", "bool_parsing"):
        return "must be a boolean"
    if kind in ("list_type", "tuple_type", "iterable_type"):
        return "must be a list"
    if kind in ("dict_type", "model_type", "model_attributes_type", "mapping_type"):
        return "must be an object"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    return str(error["msg"])


def validate_object(data: Any, info: KindInfo) -> ApiObject:
    """Validate a mapping as ``info``'s model: types and enums first, then the cross-field rules."""
    try:
        obj = info.model.model_validate(data)
    except ValidationError as exc:
        raise ObjectInvalid([(_loc_path(tuple(e["loc"])), _message(e)) for e in exc.errors()]) from None
    issues = collect_problems(obj)
    if issues:
        raise ObjectInvalid(issues)
    return obj
