"""Every validation error of a document at once, each placed and explained.

``report(exc, model, doc)`` turns a pydantic ``ValidationError`` into one
:class:`ConfigError` per problem, in document order, each naming the file, the line and
column (from the :class:`~authz.config.yamlfile.YamlDocument` node tree), the dotted field
and a reason a person can act on:

    settings.yaml:line 5, column 3 (oidc.audiance): unknown key 'audiance'; did you mean 'audience'?

An unknown key that is a near miss of a required field also explains that field's
"required" error, so the typo is reported once, not as a misleading "audience: missing".
Fields set from the environment (``STEPUP_GRPC_PORT``) are reported against the variable,
not the file. :class:`ConfigErrors` carries them all; it is a ``ConfigError``, so every
caller that catches one keeps working.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from authz.config.yamlfile import YamlDocument
from authz.errors import ConfigError

Loc = tuple[str | int, ...]


class ConfigErrors(ConfigError):
    """Several problems in one document; ``errors`` holds each, ``str()`` one per line."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        if not errors:
            raise ValueError("ConfigErrors needs at least one error")
        self.errors = tuple(errors)
        first = self.errors[0]
        super().__init__(first.reason, source=first.source, location=first.location)
        self.args = ("\n".join(str(e) for e in self.errors),)

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


def _model_at(annotation: Any, parts: Sequence[str | int]) -> type[BaseModel] | None:
    """The pydantic model that validates the value at ``parts`` below ``annotation``."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        for arg in get_args(annotation):
            if arg is not type(None) and (found := _model_at(arg, parts)) is not None:
                return found
        return None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if not parts:
            return annotation
        field = _field(annotation, str(parts[0]))
        return None if field is None else _model_at(field, parts[1:])
    if origin in (dict, Mapping) and parts:
        return _model_at(get_args(annotation)[-1], parts[1:])
    if origin in (tuple, list) and parts:
        return _model_at(get_args(annotation)[0], parts[1:])
    return None


def _field(model: type[BaseModel], name: str) -> Any | None:
    for field_name, info in model.model_fields.items():
        if name in (field_name, info.alias):
            return info.annotation
    return None


def known_keys(model: type[BaseModel]) -> list[str]:
    """The keys a document may use for ``model`` (aliases where they are set)."""
    return [info.alias or name for name, info in model.model_fields.items()]


def suggestion(key: str, choices: Iterable[str]) -> str | None:
    """The closest of ``choices`` to a mistyped ``key``, if any is close."""
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def _message(error: Mapping[str, Any], model: type[BaseModel], loc: Loc) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        key = str(loc[-1])
        keys = known_keys(parent) if parent is not None else []
        near = suggestion(key, keys)
        if near is not None:
            return f"unknown key {key!r}; did you mean {near!r}?"
        return (
            f"unknown key {key!r}; known keys: {', '.join(keys)}"
            if keys
            else f"unknown key {key!r}"
        )
    if kind == "missing":
        return "required field missing"
    msg = str(error["msg"])
    # Our own validators raise ValueError("..."): pydantic prefixes "Value error, ".
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def report(
    exc: ValidationError,
    model: type[BaseModel],
    doc: YamlDocument | None,
    *,
    source: str,
    from_env: Mapping[tuple[str, ...], str] | None = None,
) -> ConfigErrors:
    """One ConfigError per problem in ``exc`` (see the module docstring)."""
    raw = exc.errors()
    locs: list[Loc] = [tuple(e["loc"]) for e in raw]
    # A typo of a field name ('audiance') explains that field's "required" error.
    explained: set[Loc] = set()
    for e, loc in zip(raw, locs, strict=True):
        if e["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            near = suggestion(str(loc[-1]), known_keys(parent)) if parent is not None else None
            if near is not None:
                explained.add((*loc[:-1], near))
    out: list[tuple[tuple[int, int], ConfigError]] = []
    env = from_env or {}
    for e, loc in zip(raw, locs, strict=True):
        if e["type"] == "missing" and loc in explained:
            continue
        dotted = ".".join(str(p) for p in loc)
        message = _message(e, model, loc)
        var = next(
            (v for path, v in env.items() if tuple(map(str, loc[: len(path)])) == path), None
        )
        if var is not None:
            out.append(((-1, 0), ConfigError(message, source=f"${var}", location=dotted)))
            continue
        if doc is None:
            out.append(((0, 0), ConfigError(message, source=source, location=dotted)))
            continue
        where = doc.locate(dotted)
        out.append((_order(where), ConfigError(message, source=source, location=where)))
    out.sort(key=lambda pair: pair[0])  # document order; the environment's first
    return ConfigErrors([err for _, err in out])


def _order(where: str) -> tuple[int, int]:
    # "line L, column C (...)" -> (L, C); anything else sorts first.
    try:
        line, _, rest = where.removeprefix("line ").partition(", column ")
        return int(line), int(rest.split(" ", 1)[0])
    except ValueError:
        return 0, 0
