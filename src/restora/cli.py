"""The `restora` command line, generated from typed functions.

Each subcommand is a plain function in restora.commands with type hints and a
docstring whose "Args:" section documents each parameter. This module turns the
signature into argparse options: parameters without a default become positionals
(keyword-only ones become required options such as --out),
`bool` becomes --flag/--no-flag, `Literal[...]` becomes choices, `X | None` is optional,
`int | Literal["auto"]` takes a number or the word. A parameter typed as a dataclass (grouped settings, such
as restora.restore.adapter.RestoreOptions) becomes one option per field, documented in the dataclass's own
"Args:" section. Defaults and help live only in the function or the dataclass. Errors users cause (ValueError,
OSError such as FileNotFoundError, RuntimeError, KeyError) print as one line, with exit code 2;
so does a missing optional dependency (ModuleNotFoundError), naming the extra that installs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, get_args, get_origin

from restora import commands
from restora.commands.extras import missing_module_message
from restora.core.runtime import release_freed_memory

__all__ = ["main", "build_parser"]

# Commands whose peak memory is a promise (a budget, the planner's figure) and which do not train: freed memory goes
# back to the OS at once (restora.core.runtime). Training keeps glibc's default below 1B parameters (faster there).
RELEASE_BY_DEFAULT = {"serve", "quantize", "restore", "export"}


def _param_docs(fn: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    doc = inspect.getdoc(fn) or ""
    summary, _, rest = doc.partition("\nArgs:\n")
    docs: dict[str, str] = {}
    current = None
    for line in rest.splitlines():
        m = re.match(r"\s{4}(\w+):\s*(.*)", line)
        if m:
            current = m.group(1)
            docs[current] = m.group(2)
        elif current and line.startswith(" " * 8):
            docs[current] += " " + line.strip()
        else:
            current = None
    return summary.strip(), docs


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _number_or_word(tp: Any) -> Callable[[str], Any]:
    """An argparse type for `int | Literal["auto", ...]`: one of the words, else a number of the given type."""
    words = [w for a in get_args(tp) if get_origin(a) is Literal for w in get_args(a)]
    numbers = [a for a in get_args(tp) if a in (int, float)]

    def parse(text: str) -> Any:
        if text in words:
            return text
        for kind in numbers:
            try:
                return kind(text)
            except ValueError:
                pass
        raise argparse.ArgumentTypeError(f"expected {' or '.join(map(repr, words))} or a number, got {text!r}")

    parse.__name__ = " or ".join([*words, *(k.__name__ for k in numbers)])
    return parse


def _add_flag(p: Any, name: str, tp: Any, default: Any, help_: str, dest: str, keyword_only: bool = True) -> None:
    """One option (or positional) for a typed parameter or a settings field."""
    tp = _unwrap_optional(tp)
    flag = "--" + name.replace("_", "-")
    kwargs: dict[str, Any] = {"help": help_, "metavar": name.upper()}
    if get_origin(tp) in (typing.Union, types.UnionType):  # e.g. int | Literal["auto"]: a number or a word
        tp = _number_or_word(tp)
    elif get_origin(tp) is Literal:
        kwargs["choices"] = list(get_args(tp))
        tp = type(get_args(tp)[0])
    if default is inspect.Parameter.empty:
        if keyword_only:  # required option, e.g. --out DIR
            p.add_argument(flag, dest=dest, type=tp, required=True, **kwargs)
        else:
            p.add_argument(dest, type=tp, **kwargs)
        return
    if tp is bool:
        p.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=help_)
        return
    if "choices" in kwargs:
        del kwargs["metavar"]  # argparse lists the choices
    if get_origin(tp) in (list, tuple):
        inner = get_args(tp)[0] if get_args(tp) else str
        p.add_argument(flag, dest=dest, type=inner, nargs="+", default=default, **kwargs)
        return
    if default is not None:
        kwargs["help"] = f"{help_} (default: {default})".strip()
    p.add_argument(flag, dest=dest, type=tp, default=default, **kwargs)


def _add_command(sub: Any, name: str, fn: Callable[..., Any]) -> None:
    summary, docs = _param_docs(fn)
    p = sub.add_parser(name, help=summary.splitlines()[0] if summary else name, description=summary)
    hints = typing.get_type_hints(fn)
    groups: dict[str, type] = {}
    for pname, param in inspect.signature(fn).parameters.items():
        tp = hints.get(pname, str)
        if dataclasses.is_dataclass(tp):  # grouped settings: one option per field, documented on the dataclass
            _, field_docs = _param_docs(tp)
            field_hints = typing.get_type_hints(tp)
            for f in dataclasses.fields(tp):
                _add_flag(p, f.name, field_hints[f.name], f.default, field_docs.get(f.name, ""), f"{pname}.{f.name}")
            groups[pname] = tp
            continue
        _add_flag(p, pname, tp, param.default, docs.get(pname, ""), pname,
                  keyword_only=param.kind is inspect.Parameter.KEYWORD_ONLY)
    p.set_defaults(_fn=fn, _groups=groups)


def _regroup(args: dict[str, Any]) -> dict[str, Any]:
    """Collect the `group.field` options back into each grouped-settings dataclass."""
    groups = args.pop("_groups")
    for pname, cls in groups.items():
        fields = {k.split(".", 1)[1]: args.pop(k) for k in [k for k in args if k.startswith(pname + ".")]}
        args[pname] = cls(**fields)
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="restora", description="LoRA on quantized bases, and Post LoRA Restoration.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in commands.COMMANDS.items():
        _add_command(sub, name, fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    release_freed_memory(default=args.get("command") in RELEASE_BY_DEFAULT)
    fn = args.pop("_fn")
    args.pop("command")
    try:
        result = fn(**_regroup(args))
    except ModuleNotFoundError as e:  # an optional dependency imported deep inside: name the extra
        print(f"restora: error: {missing_module_message(e)}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"restora: error: {msg}", file=sys.stderr)
        return 2
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
