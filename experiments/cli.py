"""Build an ``argparse`` command line from a ``@dataclass`` configuration (CleanRL style).

Each option becomes ``--option-name`` (nested parts flat: :mod:`backbones.options`); the docstring
under the field is its help text, ``Literal`` annotations its choices.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import os
import sys
import textwrap
import types
import typing
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

from agents.registry import import_agents
from backbones.options import at, build, flag, option_fields

T = TypeVar("T")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The string literal right under each field of dataclass ``cls`` (read from the source once
    per class: a parser asks for every field's)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _parser_type(tp: Any) -> tuple[Any, dict[str, Any]]:
    """argparse ``type`` and extra kwargs for a field's annotation."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _parser_type(args[0])
    if origin is typing.Literal:
        return type(args[0]), {"choices": list(args)}
    if origin in (list, tuple, Sequence):  # may be given more than once: --grid a=1 b=2 --grid c=3 gives all three
        inner, _ = _parser_type(args[0]) if args else (str, {})
        return inner, {"nargs": "+", "action": "extend"}
    return tp, {}


def _or_none(kind: Any) -> Any:
    """argparse ``type`` of an option that may be ``None``: ``None`` as the word, else ``kind``."""

    def parse(text: str) -> Any:
        return None if text == "None" else kind(text)

    parse.__name__ = kind.__name__  # argparse's error names the type: "invalid float value"
    return parse


def parse_value(cls: type, name: str, text: str) -> Any:
    """``text`` as option ``name`` of configuration ``cls`` takes it from its flag (its type and
    choices; ``None`` where the option allows it; booleans as true / false / 1 / 0)."""
    tp = option_fields(cls)[name].hint
    if text == "None" and type(None) in typing.get_args(tp):
        return None
    kind, extra = _parser_type(tp)
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{name} is true or false, got {text!r}")
        return text.lower() in ("true", "1")
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{name} takes {kind.__name__} values, got {text!r}") from None
    if "choices" in extra and value not in extra["choices"]:
        raise ValueError(f"{name} is one of {', '.join(map(str, extra['choices']))}, got {text!r}")
    return value


def declared_defaults(cls: type) -> dict[str, Any]:
    """Each option's default as its field declares it (never as a ``__post_init__`` filled it in:
    ``TrainConfig.epochs`` stays unset, so that the data set given on the command line picks it); a
    nested part's defaults are those of the outer field's default instance (``RunConfig(progress=False)``)."""
    declared = {f.name: f for f in dataclasses.fields(cls)}
    parts: dict[str, Any] = {}  # a nested part's default instance, made once
    out = {}
    for name, opt in option_fields(cls).items():
        head, *inside = opt.path
        f = declared[head]
        if not inside:
            out[name] = f.default if f.default is not dataclasses.MISSING else cast(Any, f.default_factory)()
            continue
        if head not in parts:
            parts[head] = cast(Any, f.default_factory)()
        out[name] = at(parts[head], tuple(inside))
    return out


def build_parser(cls: type, description: str | None = None, epilog: str | None = None) -> argparse.ArgumentParser:
    """A flag per option of configuration ``cls`` (nested parts included: :func:`option_fields`),
    its help the docstring under the field and the field's default. The namespace it parses holds
    only the options given (their defaults are :func:`declared_defaults`)."""
    parser = argparse.ArgumentParser(
        description=description or (cls.__doc__ or "").strip().splitlines()[0], epilog=epilog,
        argument_default=argparse.SUPPRESS,
    )  # fmt: skip
    defaults = declared_defaults(cls)
    groups: dict[tuple[str, ...], Any] = {(): parser}  # a nested part's flags under its own heading
    for name, opt in option_fields(cls).items():
        where = opt.path[:-1]
        if where not in groups:
            summary = (opt.owner.__doc__ or "").strip().split("\n\n")[0]  # the docstring's first paragraph
            groups[where] = parser.add_argument_group(where[-1], " ".join(summary.split()))
        doc = field_docs(opt.owner).get(opt.field.name, "")
        help_text = f"{doc} (default: {defaults[name]})".replace("%", "%%")  # argparse formats help with %
        kind, extra = _parser_type(opt.hint)
        if kind is bool:
            extra = {"action": argparse.BooleanOptionalAction}
        else:
            extra["type"] = _or_none(kind) if type(None) in typing.get_args(opt.hint) else kind
        former = [flag(f) for f in opt.field.metadata.get("was", ())]  # renamed options keep their old flags
        groups[where].add_argument(flag(name), *former, dest=name, help=help_text, **extra)
    return parser


def agents_from(argv: Sequence[str]) -> list[str]:
    """The values of ``--agents-from`` in ``argv``: read before the parser is built, since the
    agents they register bring options of their own."""
    out, taking = [], False
    for arg in argv:
        if arg.startswith("--agents-from="):
            out.append(arg.split("=", 1)[1])
        taking = arg == "--agents-from" or (taking and not arg.startswith("-"))
        if taking and arg != "--agents-from":
            out.append(arg)
    return out


def parse(
    cls: type[T],
    argv: Sequence[str] | None = None,
    description: str | None = None,
    epilog: str | None = None,
    data_parallel: bool = False,
) -> T:
    """Parse ``argv`` (default: ``sys.argv[1:]``) into configuration ``cls`` (the agents of
    ``--agents-from`` imported first). Under ``torchrun`` with more than one rank, only an entry
    point that trains on ranks (``data_parallel``) goes on; the others say so, before any work."""
    argv = sys.argv[1:] if argv is None else argv
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not data_parallel:
        raise ValueError(
            f"{Path(sys.argv[0]).name} does not run on several ranks: run it as one process (python, not torchrun); "
            "experiments/run.py, experiments/reproduce.py and experiments.train_backbone train on several "
            "(README: More than one GPU)"
        )
    for source in agents_from(argv):
        import_agents(source)
    values = {**declared_defaults(cls), **vars(build_parser(cls, description, epilog).parse_args(argv))}
    hints = option_fields(cls)
    for name, value in values.items():
        if isinstance(value, list) and typing.get_origin(hints[name].hint) is tuple:
            values[name] = tuple(value)
    return cast(T, build(cls, values))


def given_fields(cls: type, argv: Sequence[str] | None = None) -> set[str]:
    """Names of the options whose flags appear in ``argv`` (as opposed to taking their defaults)."""
    return set(vars(build_parser(cls).parse_args(argv)))


# what an entry point answers with one line: bad input (a device that is not here included), missing
# files or optional packages, a folder that would be overwritten, a diverged run
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ImportError, FloatingPointError)


@contextmanager
def one_line_errors(argv: Sequence[str]) -> Iterator[None]:
    """An entry point's user errors (:data:`USER_ERRORS`) as one line on stderr and exit status 2;
    ``--debug`` in ``argv`` shows the traceback instead. Bugs keep their tracebacks."""
    try:
        yield
    except USER_ERRORS as err:
        if "--debug" in argv:
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
