"""Name registries shared by models, defenses, attacks, label methods and engine parts."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

T = TypeVar("T")


def register(registry: dict[str, T], name: str) -> Callable[[T], T]:
    """Decorator: ``@register(MODELS, "lenet_zhu")`` puts the object in ``registry`` under ``name``."""

    def wrap(obj: T) -> T:
        registry[name] = obj
        return obj

    return wrap


def lookup(registry: dict[str, T], name: Any, kind: str) -> T:
    """``registry[name]`` or a ValueError that lists the choices."""
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {sorted(registry)}")
    return registry[name]


def build_from_spec(registry: dict[str, type], spec: dict, kind: str):
    """Construct ``registry[spec["name"]](**rest)`` from a config table."""
    spec = dict(spec)
    return lookup(registry, spec.pop("name", None), kind)(**spec)

