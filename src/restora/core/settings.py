"""Settings given as loose values (a TOML table, JSON) checked against a settings dataclass's annotations.

The settings dataclasses (restora.train.config, restora.infer.settings) check their values' meaning on
construction; this module checks their kinds first, so a config file's mistake is one line naming the key."""

from __future__ import annotations

from dataclasses import fields
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

__all__ = ["checked_value", "settings_from"]

_KIND_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def checked_value(key: str, value: Any, hint: Any, where: str = "", noun: str = "setting") -> Any:
    """`value` if the field's annotation `hint` admits it (a whole number where a float is expected becomes that
    float; a list or tuple where list[X] or tuple[X, ...] is expected becomes that kind, each item checked);
    otherwise a one-line error saying what the field takes."""
    options = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    for option in options:
        if _sequence_of(option) is not None:
            if isinstance(value, (list, tuple)):
                items = [checked_value(f"{key}[{i}]", v, _sequence_of(option), where, noun) for i, v in enumerate(value)]
                return items if get_origin(option) is list else tuple(items)
        elif get_origin(option) is Literal:
            if value in get_args(option) and type(value) is not bool:
                return value
        elif option is type(None):
            if value is None:
                return value
        elif option is float and type(value) in (int, float):
            return float(value)
        elif option in (bool, int, str) and type(value) is option:
            return value
        elif option not in _KIND_NAMES:
            return value  # a type this check does not know: the dataclass's own checks decide
    raise ValueError(f"{where}{noun} {key!r} must be {_describe(options)}, got {value!r}")


def _sequence_of(hint: Any) -> Any:
    """X for list[X] or tuple[X, ...] (a sequence of any length), else None."""
    args = get_args(hint)
    if get_origin(hint) is list and len(args) == 1:
        return args[0]
    if get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0]
    return None


def _describe(options: tuple) -> str:
    words = []
    for option in options:
        if _sequence_of(option) is not None:
            words.append("a list")
        elif get_origin(option) is Literal:
            words.append("one of " + ", ".join(repr(v) for v in get_args(option)))
        elif option is type(None):
            words.append("unset")
        else:
            words.append(_KIND_NAMES[option])
    return " or ".join(words)


def settings_from(cls: type, flat: dict[str, Any], where: str = "", noun: str = "setting") -> Any:
    """`cls(**flat)` with every key known and every value of its field's kind; errors are one line naming the key
    and `where` it came from (the dataclass's own value checks included)."""
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key in flat:
        if key not in hints:
            raise ValueError(f"{where}unknown {noun} {key!r}: expected one of {', '.join(sorted(names))}")
    values = {k: checked_value(k, v, hints[k], where, noun) for k, v in flat.items()}
    try:
        return cls(**values)
    except ValueError as e:
        raise ValueError(f"{where}{e}") from None
