"""Typed pass options: declared once with default, type and help; parsed from text in one place.

The same converter serves the CLI, the pipeline text and recipes, so `0.5`, `"0.5"` and
`sparsity=0.5` all mean the same thing everywhere.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from .errors import UsageError


def option(default: Any, help: str, *, choices: tuple | None = None, low: float | None = None,
           high: float | None = None, high_exclusive: bool = False):
    """Declare a pass option as a dataclass field carrying its help text and allowed values."""
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "low": low, "high": high, "high_exclusive": high_exclusive,
    })


@dataclasses.dataclass(frozen=True)
class PassOptions:
    """Base of every pass's options; subclasses add fields made with `option()`."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            object.__setattr__(self, field.name, coerce(value, hints[field.name], field.name))
            check_bounds(getattr(self, field.name), field)

    @classmethod
    def describe(cls) -> list[dict]:
        hints = typing.get_type_hints(cls)
        return [{"name": f.name, "type": type_name(hints[f.name]), "default": f.default,
                 "help": f.metadata.get("help", ""), "choices": f.metadata.get("choices")}
                for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, values: dict, owner: str) -> "PassOptions":
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                hint = f" (options: {', '.join(sorted(known))})" if known else " (it takes no options)"
                raise UsageError(f"{owner}: unknown option '{key}'{hint}")
        try:
            return cls(**values)
        except UsageError as exc:
            raise UsageError(f"{owner}: {exc}") from None

    def changed(self) -> dict:
        """Options that differ from their defaults, for printing a pipeline compactly."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}


def type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{type_name(args[0])} or none"
    if typing.get_origin(tp) is tuple:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp, name: str) -> Any:
    """Turn `value` (text from a pipeline or CLI, or a Python value) into type `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return coerce(value, args[0], name)
    if origin is tuple:
        item = typing.get_args(tp)[0]
        if isinstance(value, str):
            value = split_list(value)
        elif not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(coerce(v, item, name) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise UsageError(f"option '{name}' takes true or false, got '{value}'")
    if tp is int:
        if isinstance(value, bool):
            raise UsageError(f"option '{name}' takes an integer, got '{value}'")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"option '{name}' takes an integer, got '{value}'") from None
        if not number.is_integer():
            raise UsageError(f"option '{name}' takes an integer, got '{value}'")
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise UsageError(f"option '{name}' takes a number, got '{value}'")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"option '{name}' takes a number, got '{value}'") from None
        if not math.isfinite(number):
            raise UsageError(f"option '{name}' takes a finite number, got '{value}'")
        return number
    if tp is str:
        return unquote(str(value))
    raise TypeError(f"option '{name}': unsupported option type {tp!r}")


def check_bounds(value: Any, field: dataclasses.Field) -> None:
    meta = field.metadata
    values = value if isinstance(value, tuple) else (value,)
    for item in values:
        if item is None:
            continue
        choices = meta.get("choices")
        if choices and item not in choices:
            raise UsageError(f"option '{field.name}' must be one of {', '.join(map(str, choices))}; got '{item}'")
        low, high = meta.get("low"), meta.get("high")
        if low is not None and item < low:
            raise UsageError(f"option '{field.name}' must be >= {low}; got {item}")
        if high is not None and (item >= high if meta.get("high_exclusive") else item > high):
            bound = f"< {high}" if meta.get("high_exclusive") else f"<= {high}"
            raise UsageError(f"option '{field.name}' must be {bound}; got {item}")


def format_value(value: Any) -> str:
    """Text that `coerce` turns back into the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    if text == "" or any(c in text for c in ",()[]=\"' ") or text.lower() in ("none", "null"):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        body, out, i = text[1:-1], [], 0
        while i < len(body):
            if body[i] == "\\" and i + 1 < len(body):
                i += 1
            out.append(body[i])
            i += 1
        return "".join(out)
    return text


def split_top_level(text: str, separator: str = ",") -> list[str]:
    """Split on `separator` outside brackets, parentheses and quotes."""
    parts, depth, quote, current, i = [], 0, None, [], 0
    while i < len(text):
        ch = text[i]
        if quote:
            current.append(ch)
            if ch == "\\" and i + 1 < len(text):
                current.append(text[i + 1])
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
            current.append(ch)
        elif ch in "([":
            depth += 1
            current.append(ch)
        elif ch in ")]":
            depth -= 1
            if depth < 0:
                raise UsageError(f"unbalanced '{ch}' in '{text}'")
            current.append(ch)
        elif ch == separator and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    if quote:
        raise UsageError(f"unterminated quote in '{text}'")
    if depth:
        raise UsageError(f"unbalanced brackets in '{text}'")
    parts.append("".join(current))
    return parts


def split_list(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return [p.strip() for p in split_top_level(text) if p.strip()]
