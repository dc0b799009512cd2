"""The one YAML loader: settings, the policy and the exporter's settings all go through it.

``load_yaml(raw, source)`` parses once (PyYAML's safe loader) and keeps the node tree, so
a validation error found later can still be placed on its line and column
(``YamlDocument.locate("routes.2.level")``). Refused at parse time, with file, line and
column: syntax errors, and a key given twice in one mapping (YAML 1.2 section 3.2.1.1 says
keys are unique; PyYAML would silently keep the last one, so a second ``default_level:``
or ``high: {}`` further down a file would quietly replace the first).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from authz.errors import ConfigError

_MERGE = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (merge keys aside)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Hashable, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:
                continue  # `<<: *anchor` overrides on purpose
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable) and key in seen:
                first = seen[key].start_mark
                raise _DuplicateKey(key, key_node.start_mark, first)
            if isinstance(key, Hashable):
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: object, mark: yaml.Mark, first: yaml.Mark) -> None:
        self.key, self.mark, self.first = key, mark, first
        super().__init__(f"duplicate key {key!r}")


@dataclass(frozen=True, slots=True)
class YamlDocument:
    """A parsed document and its node tree (for error locations)."""

    doc: Any
    node: yaml.Node | None
    source: str

    def locate(self, location: str) -> str:
        """``line L, column C (location)`` of a dotted location (``routes.2.level``), as
        deep as the document goes; "" when there is no document."""
        node = self.node
        if node is None:
            return location
        found = node
        for part in location.split(".") if location else ():
            nxt: yaml.Node | None = None
            if isinstance(found, yaml.MappingNode):
                for key, value in found.value:
                    if isinstance(key, yaml.ScalarNode) and key.value == part:
                        nxt = value
                        break
            elif isinstance(found, yaml.SequenceNode) and part.isdigit():
                idx = int(part)
                nxt = found.value[idx] if idx < len(found.value) else None
            if nxt is None:
                break
            found = nxt
        mark = found.start_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        return f"{where} ({location})" if location else where

    def error(self, message: str, location: str) -> ConfigError:
        """A ConfigError naming the file, the line and column, and the location."""
        return ConfigError(message, source=self.source, location=self.locate(location))


def load_yaml(raw: str | bytes, source: str) -> YamlDocument:
    """Parse one YAML document. Raises ConfigError (file, line, column) when it is not
    well-formed or repeats a key; an empty document is ``None``."""
    try:
        loader = _StrictLoader(raw)
        try:
            node = loader.get_single_node()
            doc = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except _DuplicateKey as exc:
        where = f"line {exc.mark.line + 1}, column {exc.mark.column + 1}"
        raise ConfigError(
            f"duplicate key {exc.key!r} (first given at line {exc.first.line + 1})",
            source=source,
            location=where,
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"invalid YAML: {problem}", source=source, location=where) from None
    return YamlDocument(doc, node, source)


M = TypeVar("M", bound=BaseModel)


def read_mapping(path: Path, what: str) -> YamlDocument:
    """Read and parse a YAML file whose document must be a mapping (``what`` names it in
    the error); an empty file is an empty mapping."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=str(path)) from exc
    parsed = load_yaml(raw, str(path))
    if parsed.doc is None:
        return YamlDocument({}, parsed.node, parsed.source)
    if not isinstance(parsed.doc, dict):
        raise ConfigError(f"the {what} must be a mapping", source=str(path))
    return parsed


def validated(parsed: YamlDocument, model: type[M], doc: Any = None) -> M:
    """``model`` validated from ``doc`` (default: the parsed document); a refusal names
    the file, the line and column and the field."""
    try:
        return model.model_validate(parsed.doc if doc is None else doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise parsed.error(first["msg"], ".".join(str(p) for p in first["loc"])) from None
