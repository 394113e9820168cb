"""Strict config types and error reporting, shared by every config section (pydantic).

A config value has the type its field says: a bool is a bool (`flase` is an error, not
true), an int an int (2.5 and 64.0 are errors), lists hold ints. Floats also take ints and
the strings YAML 1.1 reads `3e-4` as. Every error of a config is reported at once, each with
its dotted key and the value given; the CLI turns a ``ConfigError`` into exit status 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
    create_model,
)


class ConfigError(ValueError):
    """A config that cannot work; the message names every key to fix (one per `lines`)."""

    def __init__(self, message: str, lines: list[str] | None = None):
        super().__init__(message)
        self.lines = lines if lines is not None else [message]


def _to_float(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    return value


Float = Annotated[float, BeforeValidator(_to_float), Field(allow_inf_nan=False)]
Int = StrictInt
Bool = StrictBool
Str = StrictStr

STRICT = ConfigDict(
    extra="forbid", use_attribute_docstrings=True, validate_assignment=True, strict=False
)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, fields documented in place."""

    model_config = STRICT

    resume_safe: typing.ClassVar[bool] = False
    """True for a section whose every key a resumed run may change (e.g. test hooks)."""


class _ResumeSafe:
    """Field marker: a resumed run may change this key (logging, fault tolerance, resources,
    how data is read), not what is learned or from what. Put it in the field's Annotated."""

    def __repr__(self) -> str:
        return "RESUME_SAFE"


RESUME_SAFE = _ResumeSafe()


def resume_safe_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted keys (fnmatch patterns: `debug.*` for a whole section) marked RESUME_SAFE,
    derived from the fields themselves, so a new field cannot be left off a list."""
    out = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, Section):
            out += [f"{key}.*"] if sub.resume_safe else resume_safe_keys(sub, f"{key}.")
        elif any(m is RESUME_SAFE for m in info.metadata):
            out.append(key)
    return out


# --- error messages --------------------------------------------------------------------------


def _clean_loc(loc: tuple[Any, ...]) -> list[str]:
    # Tags that pick a union member ("<capsnet>", "<dynamic>") are not keys a user writes.
    return [str(p) for p in loc if not (isinstance(p, str) and p.startswith("<"))]


def error_lines(
    err: ValidationError, prefix: tuple[str, ...] = (), root: type[BaseModel] | None = None
) -> list[str]:
    """One line per error: `dotted.key: what is wrong (got VALUE)`; unknown keys list the
    known ones of their section when `root` (the validated model class) is given."""
    lines = []
    for e in err.errors(include_url=False):
        loc = _clean_loc(e["loc"])
        msg = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        given = e.get("input")
        tail = ""
        if e["type"] == "extra_forbidden":
            known = _known_keys(root, loc[:-1]) if root is not None else []
            close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
            msg = f"unknown key (did you mean {close[0]!r}?)" if close else "unknown key"
            tail = f"; known: {', '.join(known)}" if known else ""
        elif e["type"] in ("unknown_name", "unknown_model") and isinstance(given, dict):
            loc.append("name" if e["type"] == "unknown_name" else "type")
            given = given.get(loc[-1])
            msg = msg.split(" must be ", 1)[-1]
            msg = f"must be {msg}"
        key = ".".join([*prefix, *loc])
        shown = (
            ""
            if e["type"] == "missing" or isinstance(given, dict) or repr(given) in msg
            else f" (got {given!r})"
        )
        lines.append(f"{key}: {msg}{shown}{tail}" if key else msg)
    return lines


def _known_keys(model: Any, path: list[str]) -> list[str]:
    for part in path:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return sorted(getattr(model, "model_fields", {}))


def raise_config_error(lines: list[str], source: str = "") -> typing.NoReturn:
    head = f"{source}: " if source else ""
    if len(lines) == 1:
        raise ConfigError(head + lines[0], lines)
    raise ConfigError(f"{head}{len(lines)} config errors:\n  " + "\n  ".join(lines), lines)


def validate(model: type[BaseModel], raw: Any, source: str = "") -> Any:
    """model.model_validate(raw), with every error in one ConfigError."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise_config_error(error_lines(err, root=model), source)


# --- strict pydantic models for capscore's dataclass configs ---------------------------------


def strict_type(hint: Any) -> Any:
    """The strict pydantic type for a dataclass field's type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return Bool
    if hint is int:
        return Int
    if hint is float:
        return Float
    if hint is str:
        return Str
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple[strict_type(args[0]), ...]  # type: ignore[misc]
        return tuple[tuple(strict_type(a) for a in args)]  # type: ignore[misc]
    if origin in (Union, types.UnionType):
        return Union[tuple(strict_type(a) for a in args)]  # noqa: UP007
    if origin is Literal or hint is type(None) or hint is Any:
        return hint
    if dataclasses.is_dataclass(hint):
        return partial_model(hint)
    raise TypeError(f"no strict config type for {hint!r}")


_PARTIAL: dict[type, type[BaseModel]] = {}


def partial_model(cls: type) -> type[BaseModel]:
    """A pydantic model of dataclass `cls` whose fields are all optional overrides, typed
    strictly; nested configs of a registry (field metadata {"registry": {name: spec}}) become
    a union picked by their "name" (default: the registry's first entry)."""
    if cls in _PARTIAL:
        return _PARTIAL[cls]
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        registry = f.metadata.get("registry")
        hint = _registry_union(registry) if registry else strict_type(hints[f.name])
        # Default None means "not given"; None itself never validates (types are not Optional).
        fields[f.name] = (hint, None)
    _PARTIAL[cls] = create_model(f"{cls.__name__}Overrides", __config__=STRICT, **fields)
    return _PARTIAL[cls]


def _registry_union(registry: dict[str, Any]) -> Any:
    default = next(iter(registry))

    def pick(value: Any) -> str:
        # A dict being validated, or (serialising) a parsed model whose name may be unset.
        name = value.get("name") if isinstance(value, dict) else getattr(value, "name", None)
        return f"<{default if name is None else name}>"

    members = [Annotated[partial_model(spec.config), Tag(f"<{n}>")] for n, spec in registry.items()]
    return Annotated[
        Union[tuple(members)],  # noqa: UP007
        Discriminator(
            pick,
            custom_error_type="unknown_name",
            custom_error_message=f"name must be one of {sorted(registry)}",
        ),
    ]


def plain(value: Any) -> Any:
    """Tuples as lists, recursively: what YAML and JSON can hold."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections -> {"dotted.key": value} (empty sections kept as values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
