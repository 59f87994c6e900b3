"""What every kind shares: the model base, name and label syntax, metadata, label selectors.

Primitives:

- :class:`Model` -- the frozen, ``extra="forbid"`` pydantic base of every resource model. A model
  may override :meth:`Model.check` to report cross-field problems; :func:`collect_problems`
  walks a validated object and gathers them with their full field paths.
- :data:`Str`, :data:`Int`, :data:`Bool` -- strict scalars: a manifest that writes ``port: 80``
  where Kubernetes wants a string is refused the way the API server refuses it.
- syntax checks after Kubernetes' ``validation`` package: :func:`dns1123_label_error`,
  :func:`dns1123_subdomain_error`, :func:`dns1035_label_error`, :func:`label_key_error`,
  :func:`label_value_error`, :func:`port_name_error`, :func:`ip_error`, :func:`cidr_error`.
- :class:`ObjectMeta`, :class:`Condition`, :class:`ApiObject` (apiVersion, kind, metadata).
- :class:`LabelSelector` with :meth:`LabelSelector.matches` and :meth:`LabelSelector.format`
  (kubectl's rendering); :func:`parse_selector` reads the ``-l`` string syntax.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    SerializerFunctionWrapHandler,
    Strict,
    model_serializer,
)

from membrane.core.errors import InvalidInput

# --- strict scalars --------------------------------------------------------------------------------

Str = Annotated[str, Strict()]
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]

#: (path relative to the model that reports it, message); "" names the model itself.
Issue = tuple[str, str]


def quote(value: object) -> str:
    """A value as it appears in messages: strings in double quotes, like the Kubernetes API."""
    return json.dumps(value) if isinstance(value, str) else str(value)


def invalid(value: object, reason: str) -> str:
    return f"invalid value {quote(value)}: {reason}"


def join_path(base: str, sub: str) -> str:
    if not sub:
        return base
    if not base:
        return sub
    return base + sub if sub.startswith("[") else f"{base}.{sub}"


class Model(BaseModel):
    """Base of every resource model: frozen, unknown fields refused, upstream camelCase names."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )

    def check(self) -> Iterator[Issue]:
        """Cross-field problems of this model (paths relative to it). Children are walked separately."""
        return iter(())


class StatusModel(Model):
    """Status is written by the system, not by users: fields added by newer agents are kept."""

    model_config = ConfigDict(extra="allow")


def collect_problems(value: object, path: str = "") -> list[tuple[str, str]]:
    """Every :meth:`Model.check` issue in ``value`` and below, with full Kubernetes-style paths."""
    found: list[tuple[str, str]] = []
    _walk(value, path, found)
    return found


def _walk(value: object, path: str, found: list[tuple[str, str]]) -> None:
    if isinstance(value, Model):
        for sub, message in value.check():
            found.append((join_path(path, sub), message))
        for name, info in type(value).model_fields.items():
            child = getattr(value, name)
            if child is not None:
                _walk(child, join_path(path, info.alias or name), found)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _walk(item, f"{path}[{index}]", found)
    elif isinstance(value, dict):
        for key, item in value.items():
            _walk(item, f"{path}[{key}]", found)


# --- name syntax (k8s.io/apimachinery/pkg/util/validation) ----------------------------------------

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_IANA_SVC_NAME = re.compile(r"[-a-z0-9]*[a-z][-a-z0-9]*")


def dns1123_label_error(value: str) -> str | None:
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _DNS1123_LABEL.fullmatch(value):
        return (
            "must be a lowercase RFC 1123 label: lowercase alphanumerics or '-', "
            "starting and ending with an alphanumeric (e.g. 'my-name')"
        )
    return None


def dns1123_subdomain_error(value: str) -> str | None:
    if len(value) > 253:
        return "must be no more than 253 characters"
    if not _DNS1123_SUBDOMAIN.fullmatch(value):
        return (
            "must be a lowercase RFC 1123 subdomain: lowercase alphanumerics, '-' or '.', "
            "starting and ending with an alphanumeric (e.g. 'example.com')"
        )
    return None


def dns1035_label_error(value: str) -> str | None:
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _DNS1035_LABEL.fullmatch(value):
        return (
            "must be a lowercase RFC 1035 label: lowercase alphanumerics or '-', "
            "starting with a letter and ending with an alphanumeric (e.g. 'my-name')"
        )
    return None


def label_key_error(key: str) -> str | None:
    """A qualified name: optional DNS-subdomain prefix and '/', then a name of at most 63 chars."""
    prefix, slash, name = key.rpartition("/")
    if slash and not prefix:
        return "prefix part must be non-empty"
    if slash:
        if len(prefix) > 253:
            return "prefix part must be no more than 253 characters"
        if not _DNS1123_SUBDOMAIN.fullmatch(prefix):
            return "prefix part must be a lowercase RFC 1123 subdomain (e.g. 'example.com')"
    if not name:
        return "name part must be non-empty"
    if len(name) > 63:
        return "name part must be no more than 63 characters"
    if not _QUALIFIED_NAME.fullmatch(name):
        return (
            "name part must consist of alphanumerics, '-', '_' or '.', "
            "and must start and end with an alphanumeric (e.g. 'app.kubernetes.io/name')"
        )
    return None


def label_value_error(value: str) -> str | None:
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _LABEL_VALUE.fullmatch(value):
        return "must be empty or consist of alphanumerics, '-', '_' or '.', and must start and end with an alphanumeric"
    return None


def port_name_error(value: str) -> str | None:
    """An IANA service name, the syntax of named ports: at most 15 chars, a letter, no '--'."""
    if len(value) > 15:
        return "a port name must be no more than 15 characters"
    if not _IANA_SVC_NAME.fullmatch(value):
        return "a port name must contain only lowercase alphanumerics or '-' and at least one letter"
    if value.startswith("-") or value.endswith("-"):
        return "a port name must not begin or end with '-'"
    if "--" in value:
        return "a port name must not contain consecutive '-'"
    return None


def ip_error(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return "must be a valid IP address (e.g. 10.9.8.7 or 2001:db8::ffff)"
    return None


def cidr_error(value: str) -> str | None:
    """A prefix in address/length notation; host bits may be set, as the upstream parsers allow."""
    if "/" not in value:
        return "must be a CIDR in address/length notation (e.g. 10.0.0.0/8 or fd00::/64)"
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return "must be a valid CIDR (e.g. 10.0.0.0/8 or fd00::/64)"
    return None


def network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """The network of a validated CIDR (host bits cleared)."""
    return ipaddress.ip_network(value, strict=False)


# --- string types checked at field level ------------------------------------------------------------


def _checked(check: Any) -> Any:
    def validate(value: str) -> str:
        if (reason := check(value)) is not None:
            raise ValueError(invalid(value, reason))
        return value

    return AfterValidator(validate)


def _check_labels(value: dict[str, str]) -> dict[str, str]:
    for key, item in value.items():
        if (reason := label_key_error(key)) is not None:
            raise ValueError(f"invalid label key {quote(key)}: {reason}")
        if (reason := label_value_error(item)) is not None:
            raise ValueError(f"invalid value {quote(item)} for label {quote(key)}: {reason}")
    return value


def _check_annotations(value: dict[str, str]) -> dict[str, str]:
    total = 0
    for key, item in value.items():
        if (reason := label_key_error(key)) is not None:
            raise ValueError(f"invalid annotation key {quote(key)}: {reason}")
        total += len(key) + len(item)
    if total > 256 * 1024:
        raise ValueError("annotations may not be larger than 256 KiB in total")
    return value


IPString = Annotated[str, Strict(), _checked(ip_error)]
CIDRString = Annotated[str, Strict(), _checked(cidr_error)]
LabelMap = Annotated[dict[Str, Str], AfterValidator(_check_labels)]
AnnotationMap = Annotated[dict[Str, Str], AfterValidator(_check_annotations)]
QualifiedName = Annotated[str, Strict(), _checked(label_key_error)]


def unique_problems(values: Iterable[object], path: str) -> Iterator[Issue]:
    """A ``Duplicate value`` issue for every repeated item of a list field."""
    seen: set[object] = set()
    for index, value in enumerate(values):
        if value in seen:
            yield f"{path}[{index}]", f"duplicate value {quote(value)}"
        seen.add(value)


# --- metadata ----------------------------------------------------------------------------------------


class ObjectMeta(Model):
    """``metadata``. The system fields (uid, resourceVersion, generation, creationTimestamp) are
    accepted so that ``get -o yaml`` output can be applied again, and are then set by the store."""

    # In the order of Kubernetes' ObjectMeta, which is the order `-o json` prints.
    name: Str | None = None
    generateName: Str | None = None
    namespace: Str | None = None
    selfLink: Str | None = None
    uid: Str | None = None
    resourceVersion: Str | None = None
    generation: Int | None = None
    creationTimestamp: Str | None = None
    deletionTimestamp: Str | None = None
    deletionGracePeriodSeconds: Int | None = None
    labels: LabelMap = Field(default_factory=dict)
    annotations: AnnotationMap = Field(default_factory=dict)
    ownerReferences: tuple[JsonValue, ...] | None = None
    finalizers: tuple[Str, ...] | None = None
    managedFields: tuple[JsonValue, ...] | None = None

    @model_serializer(mode="wrap")
    def _omit_empty_maps(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        # Kubernetes omits empty label and annotation maps; so do we, for byte-stable output.
        for key in ("labels", "annotations"):
            if not data.get(key):
                data.pop(key, None)
        return data


class Condition(StatusModel):
    """A status condition (``metav1.Condition`` and the Cilium variants of it)."""

    type: Str
    status: Literal["True", "False", "Unknown"]
    observedGeneration: Int | None = None
    lastTransitionTime: Str | None = None
    reason: Str | None = None
    message: Str | None = None


def condition(conditions: Iterable[Condition] | None, type_: str) -> Condition | None:
    """The condition of ``type_`` in a status condition list, if present."""
    for item in conditions or ():
        if item.type == type_:
            return item
    return None


NameSyntax = Literal["dns1123-label", "dns1123-subdomain", "dns1035-label"]

_NAME_CHECKS = {
    "dns1123-label": dns1123_label_error,
    "dns1123-subdomain": dns1123_subdomain_error,
    "dns1035-label": dns1035_label_error,
}


class ApiObject(Model):
    """One API object: ``apiVersion``, ``kind``, ``metadata`` and the kind's own body."""

    #: The rule ``metadata.name`` follows for this kind (Kubernetes' per-kind name validation).
    name_syntax: ClassVar[NameSyntax] = "dns1123-subdomain"
    #: The apiVersions under which this kind is accepted, the preferred one first.
    api_versions: ClassVar[tuple[str, ...]] = ()

    apiVersion: Str
    kind: Str
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)

    @property
    def name(self) -> str:
        return self.metadata.name or ""

    @property
    def namespace(self) -> str | None:
        return self.metadata.namespace

    @property
    def labels(self) -> dict[str, str]:
        return self.metadata.labels

    def check(self) -> Iterator[Issue]:
        if self.apiVersion not in self.api_versions:
            served = ", ".join(self.api_versions)
            yield "apiVersion", f"{quote(self.apiVersion)} is not served for kind {self.kind} (use {served})"
        name = self.metadata.name
        if not name:
            yield "metadata.name", "required value"
        elif (reason := _NAME_CHECKS[self.name_syntax](name)) is not None:
            yield "metadata.name", invalid(name, reason)
        namespace = self.metadata.namespace
        if namespace and (reason := dns1123_label_error(namespace)) is not None:
            yield "metadata.namespace", invalid(namespace, reason)

    def body(self) -> dict[str, Any]:
        """Everything the user declares apart from metadata and status (the part generation tracks)."""
        data = self.model_dump(mode="json", exclude_none=True)
        for key in ("apiVersion", "kind", "metadata", "status"):
            data.pop(key, None)
        return data

    def to_dict(self) -> dict[str, Any]:
        """The object as Kubernetes would print it: upstream field names, unset fields omitted."""
        data: dict[str, Any] = self.model_dump(mode="json", exclude_none=True)
        return data


# --- label selectors ---------------------------------------------------------------------------------

Operator = Literal["In", "NotIn", "Exists", "DoesNotExist"]


class LabelSelectorRequirement(Model):
    key: Str
    operator: Operator
    values: tuple[Str, ...] | None = None

    #: Label keys of Cilium selectors may carry a source prefix (``k8s:app``); plain selectors not.
    cilium_keys: ClassVar[bool] = False

    def check(self) -> Iterator[Issue]:
        reason = (cilium_label_key_error if self.cilium_keys else label_key_error)(self.key)
        if reason is not None:
            yield "key", invalid(self.key, reason)
        if self.operator in ("In", "NotIn"):
            if not self.values:
                yield "values", "must be specified when `operator` is 'In' or 'NotIn'"
        elif self.values:
            yield "values", "may not be specified when `operator` is 'Exists' or 'DoesNotExist'"
        for index, value in enumerate(self.values or ()):
            if (reason := label_value_error(value)) is not None:
                yield f"values[{index}]", invalid(value, reason)

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return self.key in labels and labels[self.key] in (self.values or ())
        if self.operator == "NotIn":
            return self.key not in labels or labels[self.key] not in (self.values or ())
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels

    def format(self) -> str:
        values = ",".join(sorted(self.values or ()))
        if self.operator == "In":
            return f"{self.key} in ({values})"
        if self.operator == "NotIn":
            return f"{self.key} notin ({values})"
        if self.operator == "Exists":
            return self.key
        return f"!{self.key}"


class LabelSelector(Model):
    """A Kubernetes label selector. Empty (``{}``) selects everything; the requirements are ANDed."""

    matchLabels: dict[Str, Str] | None = None
    matchExpressions: tuple[LabelSelectorRequirement, ...] | None = None

    cilium_keys: ClassVar[bool] = False

    def check(self) -> Iterator[Issue]:
        key_error = cilium_label_key_error if self.cilium_keys else label_key_error
        for key, value in (self.matchLabels or {}).items():
            if (reason := key_error(key)) is not None:
                yield "matchLabels", f"invalid label key {quote(key)}: {reason}"
            if (reason := label_value_error(value)) is not None:
                yield "matchLabels", f"invalid value {quote(value)} for label {quote(key)}: {reason}"

    @property
    def is_empty(self) -> bool:
        return not self.matchLabels and not self.matchExpressions

    def requirements(self) -> list[LabelSelectorRequirement]:
        """matchLabels as ``In`` requirements followed by matchExpressions, sorted by key."""
        reqs = [
            LabelSelectorRequirement(key=key, operator="In", values=(value,))
            for key, value in (self.matchLabels or {}).items()
        ]
        reqs.extend(self.matchExpressions or ())
        return sorted(reqs, key=lambda r: r.key)

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a label set satisfies every requirement (keys compared literally)."""
        return all(req.matches(labels) for req in self.requirements())

    def format(self) -> str:
        """kubectl's rendering (``app=web,tier in (a,b)``); ``<none>`` for the empty selector."""
        if self.is_empty:
            return "<none>"
        parts = []
        for req in self.requirements():
            if req.operator == "In" and len(req.values or ()) == 1:
                parts.append(f"{req.key}={(req.values or ('',))[0]}")
            else:
                parts.append(req.format())
        return ",".join(parts)


# --- Cilium label keys -----------------------------------------------------------------------------

#: Label sources a Cilium selector key may name (``source:key``); ``any`` matches every source.
CILIUM_LABEL_SOURCES = frozenset(
    {"any", "k8s", "container", "reserved", "cidr", "cidrgroup", "fqdn", "node", "cni", "unspec", "directory"}
)


def split_cilium_label_key(key: str) -> tuple[str, str]:
    """``k8s:app`` -> (``k8s``, ``app``); a key without a known source prefix is ``any``."""
    source, colon, rest = key.partition(":")
    if colon and source in CILIUM_LABEL_SOURCES:
        return source, rest
    return "any", key


def cilium_label_key_error(key: str) -> str | None:
    source, colon, rest = key.partition(":")
    if not colon:
        return label_key_error(key)
    if source not in CILIUM_LABEL_SOURCES:
        known = ", ".join(sorted(CILIUM_LABEL_SOURCES))
        return f"unknown label source {quote(source)} (known: {known})"
    if not rest:
        return "the label name after the source prefix must be non-empty"
    if source in ("any", "k8s", "container", "node", "unspec"):
        return label_key_error(rest)
    # reserved:, cidr:, fqdn: ... keys are produced by Cilium itself and follow their own syntax.
    if any(ch.isspace() for ch in rest):
        return "must not contain whitespace"
    return None


# --- the -l selector string syntax --------------------------------------------------------------------

_SELECTOR_TERM = re.compile(
    r"\s*(?:(?P<not>!)\s*(?P<nkey>[^\s,!=()]+)"
    r"|(?P<key>[^\s,!=()]+)\s*(?:(?P<op>==|!=|=)\s*(?P<value>[^\s,!=()]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?)\s*(?:,|$)"
)


def parse_selector(text: str) -> LabelSelector:
    """Parse kubectl's selector syntax: ``a=b``, ``a==b``, ``a!=b``, ``a in (x,y)``, ``a notin (x)``,
    ``a``, ``!a``, comma-separated. Raises InvalidInput naming the selector."""
    labels: dict[str, str] = {}
    exprs: list[LabelSelectorRequirement] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        match = _SELECTOR_TERM.match(text, pos)
        if match is None or match.end() == pos:
            raise InvalidInput([f"invalid label selector {quote(text)}: unexpected text at {quote(text[pos:])}"])
        pos = match.end()
        if match["not"]:
            exprs.append(LabelSelectorRequirement(key=match["nkey"], operator="DoesNotExist"))
        elif match["op"] in ("=", "=="):
            labels[match["key"]] = match["value"]
        elif match["op"] == "!=":
            exprs.append(LabelSelectorRequirement(key=match["key"], operator="NotIn", values=(match["value"],)))
        elif match["setop"]:
            values = tuple(v.strip() for v in match["values"].split(",") if v.strip())
            operator: Operator = "In" if match["setop"] == "in" else "NotIn"
            exprs.append(LabelSelectorRequirement(key=match["key"], operator=operator, values=values))
        else:
            exprs.append(LabelSelectorRequirement(key=match["key"], operator="Exists"))
    selector = LabelSelector(matchLabels=labels or None, matchExpressions=tuple(exprs) or None)
    problems = collect_problems(selector)
    if problems:
        raise InvalidInput([f"invalid label selector {quote(text)}: {message}" for _, message in problems])
    return selector
