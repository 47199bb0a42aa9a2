"""One registry for backbones: ``create("cifar_resnet110", num_classes=10)`` and ``list_backbones()``."""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backbones.base import Backbone

_REGISTRY: dict[str, Callable[..., Backbone]] = {}


def register(name: str) -> Callable[[Callable[..., Backbone]], Callable[..., Backbone]]:
    """Decorator that files a backbone constructor under ``name``."""

    def decorate(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return decorate


def register_depths(prefix: str, builder: Callable[..., Backbone], depths: tuple[int, ...], doc: str) -> None:
    """Register ``builder(depth, **kwargs)`` as ``f"{prefix}{depth}"`` for every depth."""
    for depth in depths:
        build = functools.partial(builder, depth)
        build.__doc__ = doc.format(depth=depth)
        register(f"{prefix}{depth}")(build)


def list_backbones(pattern: str = "*") -> list[str]:
    """Registered backbone names matching a shell-style ``pattern``, sorted, and the zoo backbones
    the tests route (any ``timm:<model>`` or ``torchvision:<model>`` of their shapes works too)."""
    from backbones.zoo import TESTED

    return sorted(n for n in (*_REGISTRY, *TESTED) if fnmatch.fnmatch(n, pattern))


def _constructor(name: str) -> Callable[..., Backbone]:
    """The constructor of backbone ``name``: a registered one, or a model zoo's (``timm:``, ``torchvision:``)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:  # a model zoo's (timm:<model>, torchvision:<model>) or the user's (<module or file.py>:<function>)
        from backbones.zoo import zoo_backbone

        return functools.partial(zoo_backbone, name)
    raise ValueError(
        f"unknown backbone {name!r}; valid names: {', '.join(list_backbones())}, or timm:<model>, torchvision:<model>, "
        "<module or file.py>:<function>"
    )


def options(name: str) -> set[str]:
    """The constructor options backbone ``name`` takes beyond ``num_classes`` (e.g. ``width``,
    ``in_channels`` for CIFAR ResNets): callers ask this instead of testing the name's prefix."""
    import inspect

    return set(inspect.signature(_constructor(name)).parameters) - {"num_classes"}


def create(name: str, **kwargs: Any) -> Backbone:
    """Build the backbone registered as ``name`` (or a zoo model: ``timm:<model>``,
    ``torchvision:<model>``); keyword arguments go to its constructor."""
    return _constructor(name)(**kwargs)
