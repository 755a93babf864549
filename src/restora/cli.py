"""The `restora` command line, generated from typed functions.

Each subcommand is a plain function in restora.commands with type hints and a
docstring whose "Args:" section documents each parameter. This module turns the
signature into argparse options: parameters without a default become positionals
(keyword-only ones become required options such as --out),
`bool` becomes --flag/--no-flag, `Literal[...]` becomes choices, `X | None` is optional.
Defaults and help live only in the function. Errors users cause (ValueError,
OSError such as FileNotFoundError, RuntimeError, KeyError) print as one line, with exit code 2;
so does a missing optional dependency (ModuleNotFoundError), naming the extra that installs it.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, get_args, get_origin

from restora import commands
from restora.commands.extras import missing_module_message
from restora.commands.runtime import release_freed_memory

__all__ = ["main", "build_parser"]

# Commands whose peak memory is a promise (a budget, the planner's figure) and which do not train: freed memory goes
# back to the OS at once (restora.commands.runtime). Training keeps glibc's default, which is faster there.
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


def _add_command(sub: Any, name: str, fn: Callable[..., Any]) -> None:
    summary, docs = _param_docs(fn)
    p = sub.add_parser(name, help=summary.splitlines()[0] if summary else name, description=summary)
    hints = typing.get_type_hints(fn)
    for pname, param in inspect.signature(fn).parameters.items():
        tp = _unwrap_optional(hints.get(pname, str))
        flag = "--" + pname.replace("_", "-")
        help_ = docs.get(pname, "")
        kwargs: dict[str, Any] = {"help": help_}
        if get_origin(tp) in (typing.Union, types.UnionType):  # e.g. int | Literal["auto"]: a number or a word
            tp = _number_or_word(tp)
        elif get_origin(tp) is Literal:
            kwargs["choices"] = list(get_args(tp))
            tp = type(get_args(tp)[0])
        if param.default is inspect.Parameter.empty:
            if param.kind is inspect.Parameter.KEYWORD_ONLY:  # required option, e.g. --out DIR
                p.add_argument(flag, dest=pname, type=tp, required=True, **kwargs)
            else:
                p.add_argument(pname, type=tp, **kwargs)
            continue
        if tp is bool:
            p.add_argument(flag, dest=pname, action=argparse.BooleanOptionalAction, default=param.default, help=help_)
            continue
        if get_origin(tp) in (list, tuple):
            inner = get_args(tp)[0] if get_args(tp) else str
            p.add_argument(flag, dest=pname, type=inner, nargs="+", default=param.default, **kwargs)
            continue
        if param.default is not None:
            kwargs["help"] = f"{help_} (default: {param.default})".strip()
        p.add_argument(flag, dest=pname, type=tp, default=param.default, **kwargs)
    p.set_defaults(_fn=fn)


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
        result = fn(**args)
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
