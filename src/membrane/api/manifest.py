"""Reading manifests: files, directories and stdin; multi-document YAML, JSON, ``kind: List``.

Everything wrong with an invocation is reported at once, one line per problem, in the shape

    FILE: Kind/name: field.path: message

(``FILE: document N: ...`` when a document has no usable kind, ``FILE: line L, column C: ...``
for YAML syntax errors). Nothing is returned unless every object of every file is valid.

Primitives: :class:`Document` (one parsed YAML/JSON document and where it came from),
:func:`read_documents`, :class:`Manifest` (one object of a manifest), :func:`load_objects`
(validated objects for ``apply``), :func:`load_refs` (just the names, for ``delete -f``),
:data:`STDIN`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from membrane.api.meta import ApiObject
from membrane.api.registry import KINDS, KindInfo, ObjectInvalid, ObjectRef, find_kind, validate_object
from membrane.core.errors import InvalidInput

#: How standard input is named in messages ("-f -"), as kubectl names it.
STDIN = "STDIN"
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


# --- YAML loading ---------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps timestamps as strings and refuses duplicate keys (as kubectl does)."""


# Timestamps stay strings (metadata.creationTimestamp is a string in the API); a bare "=" is a string.
_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # keys merged in with `<<` may legitimately be overridden
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            continue  # the default constructor reports unhashable keys itself
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"mapping key {json.dumps(str(key))} already defined at line {seen[key].start_mark.line + 1}",
                key_node.start_mark,
            )
        seen[key] = key_node
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_error(source: str, exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        text = f"{source}: line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
        if exc.context and exc.context_mark is not None:
            text += f" ({exc.context} at line {exc.context_mark.line + 1})"
        return text
    return f"{source}: {exc}"


# --- documents ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    source: str  # file name as given, or STDIN
    index: int  # 1-based position in its file
    data: Any


def _parse_text(source: str, text: str) -> list[Document]:
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        # JSON: parsed as such so that tabs and long lines behave; errors carry a line number.
        try:
            return [Document(source, 1, json.loads(text))]
        except json.JSONDecodeError as exc:
            raise InvalidInput([f"{source}: line {exc.lineno}, column {exc.colno}: {exc.msg}"]) from None
    try:
        loaded = list(yaml.load_all(text, Loader=_Loader))
    except yaml.YAMLError as exc:
        raise InvalidInput([_yaml_error(source, exc)]) from None
    return [Document(source, index, data) for index, data in enumerate(loaded, start=1)]


def _expand(path: str) -> list[Path]:
    target = Path(path)
    if target.is_dir():
        return sorted(p for p in target.iterdir() if p.is_file() and p.suffix in MANIFEST_SUFFIXES)
    return [target]


def read_documents(paths: Sequence[str], stdin: IO[str] | None = None) -> list[Document]:
    """Parse every file (a directory means its .yaml/.yml/.json files; ``-`` means stdin)."""
    documents, problems = _read(paths, stdin)
    if problems:
        raise InvalidInput(problems)
    return documents


def _read(paths: Sequence[str], stdin: IO[str] | None) -> tuple[list[Document], list[str]]:
    documents: list[Document] = []
    problems: list[str] = []
    for path in paths:
        if path == "-":
            sources: list[tuple[str, str | None, str]] = [(STDIN, (stdin or sys.stdin).read(), "")]
        else:
            sources = []
            for file in _expand(path):
                try:
                    sources.append((str(file), file.read_text(encoding="utf-8"), ""))
                except FileNotFoundError:
                    sources.append((str(file), None, "no such file or directory"))
                except (OSError, UnicodeDecodeError) as exc:
                    sources.append((str(file), None, f"cannot read: {getattr(exc, 'strerror', None) or exc}"))
        for source, text, error in sources:
            if text is None:
                problems.append(f"{source}: {error}")
                continue
            try:
                documents.extend(_parse_text(source, text))
            except InvalidInput as exc:
                problems.extend(exc.problems)
    return documents, problems


# --- objects ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """One object of a manifest and where it was written. ``obj`` is None from :func:`load_refs`."""

    source: str
    document: int
    ref: ObjectRef
    obj: ApiObject | None = None

    def where(self) -> str:
        """``FILE: Kind/name`` -- the prefix of every message about this object."""
        return f"{self.source}: {self.ref}"


@dataclass(frozen=True)
class _Item:
    doc: Document
    data: Any
    path: str  # "" for a top-level document, "items[3]" inside a List


def _items(doc: Document) -> Iterator[_Item | str]:
    """The objects of a document (a List yields its items); a string is a problem."""
    data = doc.data
    if data is None:
        return
    here = f"{doc.source}: document {doc.index}"
    if not isinstance(data, dict):
        yield f"{here}: expected an object with apiVersion, kind and metadata, got {type(data).__name__}"
        return
    kind = data.get("kind")
    if isinstance(kind, str) and kind.endswith("List") and "items" in data:
        items = data["items"]
        if not isinstance(items, list):
            yield f"{here}: items: must be a list"
            return
        for position, item in enumerate(items):
            if not isinstance(item, dict):
                yield f"{here}: items[{position}]: expected an object, got {type(item).__name__}"
            else:
                yield _Item(doc, item, f"items[{position}]")
        return
    yield _Item(doc, data, "")


def _identify(item: _Item, namespace: str | None) -> tuple[KindInfo, dict[str, Any], str] | str:
    """Kind, the mapping with its namespace settled, and the message prefix; or a problem."""
    doc, data = item.doc, item.data
    position = f"document {doc.index}" + (f" {item.path}" if item.path else "")
    kind = data.get("kind")
    if not isinstance(kind, str) or not kind:
        return f"{doc.source}: {position}: kind: required value"
    metadata = data.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    label = f"{kind}/{name}" if isinstance(name, str) and name else f"{kind} ({position})"
    prefix = f"{doc.source}: {label}"
    info = find_kind(kind)
    if info is None or info.kind != kind:
        hint = f' (did you mean "{info.kind}"?)' if info is not None else _kind_hint(kind)
        return f"{prefix}: kind: unknown kind {json.dumps(kind)}{hint}"
    api_version = data.get("apiVersion")
    if not isinstance(api_version, str) or not api_version:
        return f"{prefix}: apiVersion: required value"
    if api_version not in info.api_versions:
        served = " or ".join(info.api_versions)
        return f"{prefix}: apiVersion: {json.dumps(api_version)} is not served for kind {kind} (use {served})"
    data = dict(data)
    if isinstance(metadata, dict):
        metadata = dict(metadata)
        data["metadata"] = metadata
        given = metadata.get("namespace")
        if not info.namespaced:
            # The API server ignores a namespace on cluster-scoped objects; so do we.
            metadata.pop("namespace", None)
        elif given is None or given == "":
            metadata["namespace"] = namespace or "default"
        elif namespace is not None and isinstance(given, str) and given != namespace:
            return (
                f"{prefix}: the namespace from the provided object {json.dumps(given)} does not match "
                f"the namespace {json.dumps(namespace)}. You must pass '--namespace={given}' to perform this operation."
            )
    return info, data, prefix


def _kind_hint(kind: str) -> str:
    import difflib

    close = difflib.get_close_matches(kind, [info.kind for info in KINDS], n=1, cutoff=0.6)
    if close:
        return f' (did you mean "{close[0]}"?)'
    return f" (accepted kinds: {', '.join(info.kind for info in KINDS)})"


def _manifests(
    documents: Sequence[Document],
    namespace: str | None,
    *,
    validate: bool,
    allow_system: bool,
    problems: list[str] | None = None,
) -> list[Manifest]:
    problems = list(problems or ())
    found: list[Manifest] = []
    first_seen: dict[ObjectRef, Manifest] = {}
    for doc in documents:
        for item in _items(doc):
            if isinstance(item, str):
                problems.append(item)
                continue
            identified = _identify(item, namespace)
            if isinstance(identified, str):
                problems.append(identified)
                continue
            info, data, prefix = identified
            if validate and info.system and not allow_system:
                problems.append(
                    f"{prefix}: {info.kind} objects are maintained by the membrane agents and cannot be applied"
                )
                continue
            obj: ApiObject | None = None
            if validate:
                # Status belongs to the system; what a manifest says about it is ignored.
                data.pop("status", None)
                try:
                    obj = validate_object(data, info)
                except ObjectInvalid as exc:
                    problems.extend(f"{prefix}: {line}" for line in exc.problems)
                    continue
                ref = ObjectRef.of(obj)
            else:
                metadata = data.get("metadata")
                name = metadata.get("name") if isinstance(metadata, dict) else None
                if not isinstance(name, str) or not name:
                    problems.append(f"{prefix}: metadata.name: required value")
                    continue
                ref = ObjectRef(info.kind, metadata.get("namespace") if info.namespaced else None, name)  # type: ignore[union-attr]
            manifest = Manifest(doc.source, doc.index, ref, obj)
            if (earlier := first_seen.get(ref)) is not None:
                problems.append(
                    f"{prefix}: defined more than once (also in {earlier.source}, document {earlier.document})"
                )
                continue
            first_seen[ref] = manifest
            found.append(manifest)
    if problems:
        raise InvalidInput(problems)
    return found


def load_objects(
    paths: Sequence[str],
    *,
    stdin: IO[str] | None = None,
    namespace: str | None = None,
    allow_system: bool = False,
) -> list[Manifest]:
    """Every object of ``paths``, validated; namespaced objects without a namespace get
    ``namespace`` (default ``default``). Raises InvalidInput listing every problem."""
    documents, problems = _read(paths, stdin)
    return _manifests(documents, namespace, validate=True, allow_system=allow_system, problems=problems)


def load_refs(paths: Sequence[str], *, stdin: IO[str] | None = None, namespace: str | None = None) -> list[Manifest]:
    """The kind, namespace and name of every object of ``paths`` (for ``delete -f``; bodies are not validated)."""
    documents, problems = _read(paths, stdin)
    return _manifests(documents, namespace, validate=False, allow_system=True, problems=problems)


def parse_manifest_text(text: str, *, source: str = STDIN, namespace: str | None = None) -> list[ApiObject]:
    """Validated objects from a string (tests, demos and the lab's built-in manifests)."""
    manifests = _manifests(_parse_text(source, text), namespace, validate=True, allow_system=False)
    return [m.obj for m in manifests if m.obj is not None]
