"""Options declared on the dataclass field that holds them, for every configuration of the project.

A field made with :func:`option` carries its rule (``POSITIVE``, ``FRACTION``, ...) and whether a
resumed run may change it; :func:`check_options` checks a whole dataclass against its fields' rules
and ``Literal`` choices, once, with messages that name the command-line flag. A field made with
:func:`nested` holds another configuration, one made with :func:`parts` the configurations of the
parts registered when it is read (each agent's own): a run's configuration is a tree of the parts each
module owns (the hybrid trainer's, the gates', BlockDrop's, ...), and :func:`option_fields`,
:func:`flatten` and :func:`build` see it as one flat set of uniquely named options, the names of its
flags. One rule names them: every part declares a ``flag_prefix``, which goes before its fields
(``JointConfig.lr`` is ``--joint-lr``, ``HRLConfig.gamma`` ``--hrl-gamma``); the tree refuses a part without one.

It lives in the lowest package so that every layer's configuration can use it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any, NamedTuple


class Rule(NamedTuple):
    ok: Callable[[Any], bool]
    says: str
    """what a value must be, completing "--flag must be ..." """


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


POSITIVE_INT = Rule(lambda v: _integer(v) and v >= 1, "an integer >= 1")
COUNT = Rule(lambda v: _integer(v) and v >= 0, "an integer >= 0")
POSITIVE = Rule(lambda v: _number(v) and v > 0, "a finite number > 0")
NON_NEGATIVE = Rule(lambda v: _number(v) and v >= 0, "a finite number >= 0")
UNIT = Rule(lambda v: _number(v) and 0 <= v <= 1, "in [0, 1]")
FLOPS_FRACTION = Rule(lambda v: _number(v) and 0 < v <= 1, "a fraction of the full network's FLOPs in (0, 1]")


def option(
    default: Any = dataclasses.MISSING,
    rule: Rule | None = None,
    *,
    resumable: bool = False,
    was: tuple[str, ...] = (),
) -> Any:
    """A configuration field: its default, the rule its values meet (``None`` passes where the type
    allows it), whether a resumed run may change it (how the run runs, not what it computes; the
    learning rates too, so that a diverged run can be resumed more gently) and the flat names it
    had before (``was``): their flags still work, and configurations stored under them still build."""
    return dataclasses.field(default=default, metadata={"rule": rule, "resumable": resumable, "was": was})


def nested(cls: type, factory: Callable[[], Any] | None = None) -> Any:
    """A field holding configuration ``cls`` (``factory()``, default ``cls()``): a field annotated
    with a dataclass is a part of the tree, its options the tree's too."""
    return dataclasses.field(default_factory=factory or cls)


def parts(provider: Callable[[], dict[str, type]]) -> Any:
    """A field holding ``{name: configuration}`` for the parts ``provider()`` names when the tree is
    walked, not when the class is made: the agents' parts, which agents register as they are
    imported (a user's own included). Annotate it ``dict[str, Any]``; its options are the tree's."""
    return dataclasses.field(
        default_factory=lambda: {name: cls() for name, cls in provider().items()}, metadata={"parts": provider}
    )


def at(config: Any, path: tuple[str, ...]) -> Any:
    """The value at ``path`` (attribute names, and part names inside a :func:`parts` field) of ``config``."""
    for name in path:
        config = config[name] if isinstance(config, dict) else getattr(config, name)
    return config


def _parts_of(f: dataclasses.Field) -> dict[str, type]:
    return f.metadata["parts"]() if "parts" in f.metadata else {}


def flag(name: str) -> str:
    """The command-line flag of option ``name``: ``hrl_lr`` -> ``--hrl-lr``."""
    return "--" + name.replace("_", "-")


def _allows_none(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


def choices(hint: Any) -> tuple | None:
    """The values a ``Literal`` annotation (optionally ``| None``) allows, else ``None``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return choices(args[0])
    return tuple(args) if typing.get_origin(hint) is typing.Literal else None


def check_options(config: Any) -> None:
    """Check every field of dataclass ``config`` against its rule and its ``Literal`` choices (call
    it from ``__post_init__``); one ``ValueError`` names every bad value by its flag."""
    prefix = getattr(config, "flag_prefix", "")
    hints = typing.get_type_hints(type(config))
    problems = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None and _allows_none(hints[f.name]):
            continue
        allowed = choices(hints[f.name])
        rule: Rule | None = f.metadata.get("rule")
        if allowed is not None and value not in allowed:
            problems.append(f"{flag(prefix + f.name)} must be one of {', '.join(map(str, allowed))}, got {value!r}")
        elif rule is not None and not rule.ok(value):
            problems.append(f"{flag(prefix + f.name)} must be {rule.says}, got {value!r}")
    if problems:
        raise ValueError("; ".join(problems))


class Option(NamedTuple):
    """One option of a configuration tree: where it sits and what it is."""

    path: tuple[str, ...]
    """attribute names from the root to the field"""
    field: dataclasses.Field
    owner: type
    """the dataclass that declares the field"""
    hint: Any
    """the field's resolved annotation"""


def option_fields(cls: type) -> dict[str, Option]:
    """The options of configuration ``cls`` and of the configurations nested in it, by their flat
    names (a nested part's ``flag_prefix`` + the field's name); a name given twice is an error."""
    out: dict[str, Option] = {}

    def walk(klass: type, path: tuple[str, ...], prefix: str) -> None:
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            for part, inner in _parts_of(f).items():
                walk(inner, (*path, f.name, part), prefix + getattr(inner, "flag_prefix", ""))
            if "parts" in f.metadata:
                continue
            if dataclasses.is_dataclass(hints[f.name]):
                inner = hints[f.name]
                walk(inner, (*path, f.name), prefix + getattr(inner, "flag_prefix", ""))
                continue
            if path and not hasattr(klass, "flag_prefix"):  # one rule: a part's flags begin with its prefix
                raise TypeError(f"{klass.__name__} (a part, at {'.'.join(path)}) declares no flag_prefix")
            name = prefix + f.name
            if name in out:
                raise TypeError(f"option {name!r} of {klass.__name__} repeats one of {out[name].owner.__name__}")
            out[name] = Option((*path, f.name), f, klass, hints[f.name])

    walk(cls, (), "")
    return out


def former_names(cls: type) -> dict[str, str]:
    """``{former flat name: flat name}`` of the options of ``cls`` that were renamed (``option(was=...)``)."""
    return {old: name for name, opt in option_fields(cls).items() for old in opt.field.metadata.get("was", ())}


def current_names(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (flat) with former option names replaced by today's (a stored configuration)."""
    renamed = former_names(cls)
    return {renamed.get(k, k): v for k, v in values.items()}


def flatten(config: Any) -> dict[str, Any]:
    """``{flat name: value}`` of every option in the tree ``config`` (what runs store and compare)."""
    return {name: at(config, opt.path) for name, opt in option_fields(type(config)).items()}


def build(cls: type, values: dict[str, Any], base: Any = None) -> Any:
    """Configuration ``cls`` from flat ``values`` (options left out keep ``base``'s values, or the
    defaults); an unknown name is a ``ValueError`` listing the options. Every part checks itself as
    it is built."""
    known = option_fields(cls)
    values = current_names(cls, values)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown options {', '.join(unknown)}; options: {', '.join(sorted(known))}")
    merged = {**(flatten(base) if base is not None else {}), **values}
    by_path = {opt.path: merged[name] for name, opt in known.items() if name in merged}

    def make(klass: type, path: tuple[str, ...]) -> Any:
        hints = typing.get_type_hints(klass)
        kwargs = {}
        for f in dataclasses.fields(klass):
            here = (*path, f.name)
            if "parts" in f.metadata:
                kwargs[f.name] = {part: make(inner, (*here, part)) for part, inner in _parts_of(f).items()}
            elif dataclasses.is_dataclass(hints[f.name]):
                kwargs[f.name] = make(hints[f.name], here)
            elif here in by_path:
                kwargs[f.name] = by_path[here]
        return klass(**kwargs)

    return make(cls, ())


def replace(config: Any, **values: Any) -> Any:
    """``config`` with the options ``values`` (flat names) changed: ``replace(run, sp_lr=1e-3)``."""
    return build(type(config), values, base=config)


def resumable_options(cls: type) -> frozenset[str]:
    """The flat names of the options of ``cls`` declared ``resumable``."""
    return frozenset(name for name, opt in option_fields(cls).items() if opt.field.metadata.get("resumable"))
