"""Name registries shared by models, defenses, attacks, label methods, generators and engine parts.

A :class:`PluginRegistry` is also filled from a Python entry-point group, so an outside package adds an attack (or a
defense, a label method, a generator) by declaring it in its own metadata, without editing fedsim::

    [project.entry-points."fedsim.attacks"]
    my_attack = "my_package.attacks:MyAttack"

An entry point is loaded (its module imported) the first time its name is looked up.
"""

from __future__ import annotations

import difflib
from importlib.metadata import entry_points
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class PluginError(ValueError):
    """An entry point named in some package's metadata failed to load."""


class PluginRegistry(dict):
    """A dict of name -> object that falls back on the entry points of ``group`` for names it does not hold yet."""

    def __init__(self, group: str, kind: str) -> None:
        super().__init__()
        self.group, self.kind = group, kind

    def _entry_points(self) -> dict:
        return {ep.name: ep for ep in entry_points(group=self.group)}

    def _load(self, name: Any) -> bool:
        if dict.__contains__(self, name) or not isinstance(name, str):
            return dict.__contains__(self, name)
        ep = self._entry_points().get(name)
        if ep is None:
            return False
        try:
            obj = ep.load()  # importing the module registers what it defines
        except Exception as err:  # noqa: BLE001 - a broken plugin is a one-line configuration error
            raise PluginError(f"{self.kind} {name!r} from entry point {ep.value!r} failed to load: "
                              f"{type(err).__name__}: {err}") from None
        if not dict.__contains__(self, name):
            self[name] = obj
        return True

    def __contains__(self, name: object) -> bool:
        return self._load(name)

    def __getitem__(self, name: Any):
        self._load(name)
        return dict.__getitem__(self, name)

    def get(self, name: Any, default=None):
        return self[name] if name in self else default

    def names(self) -> list[str]:
        """Every available name: registered ones and those an entry point offers (not loaded)."""
        return sorted(set(dict.keys(self)) | set(self._entry_points()))


def register(registry: dict[str, T], name: str) -> Callable[[T], T]:
    """Decorator: ``@register(MODELS, "lenet_zhu")`` puts the object in ``registry`` under ``name``."""

    def wrap(obj: T) -> T:
        registry[name] = obj
        return obj

    return wrap


def lookup(registry: dict[str, T], name: Any, kind: str) -> T:
    """``registry[name]`` or a ValueError that lists the choices."""
    if name not in registry:
        choices = registry.names() if isinstance(registry, PluginRegistry) else sorted(registry)
        raise ValueError(f"unknown {kind} {name!r}; choose one of {choices}")
    return registry[name]


class SpecError(ValueError):
    """A bad parameter in the table of a registered thing (a defense, an attack): ``key`` within that table, what is
    wrong with it, and the name the user typed (never the class name)."""

    def __init__(self, kind: str, name: str, key: str, problem: str) -> None:
        self.key, self.problem = key, problem
        super().__init__(f"{kind} {name!r}: {key}: {problem}")


def _fields_at(model: Any, path: tuple) -> list[str]:
    """The field names of the pydantic model reached from ``model`` along ``path`` (empty where it is no model)."""
    for part in path:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return []
        model = fields[part].annotation
    return list(getattr(model, "model_fields", None) or [])


def validation_problems(err: Any, model: Any = None) -> list[tuple[str, str]]:
    """Each error of a pydantic ``ValidationError`` as (dotted key, problem), unknown keys first (a misspelt key
    also makes its correct spelling "missing": the misspelling is the news), with the nearest field of ``model``
    suggested for an unknown key."""
    out = []
    for e in sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden"):
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        problem = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            problem = "unknown key"
            near = difflib.get_close_matches(str(loc[-1]), _fields_at(model, loc[:-1]), n=1)
            if near:
                problem += f" (did you mean {near[0]!r}?)"
        out.append((key, problem))
    return out


def build_from_spec(registry: dict[str, type], spec: dict, kind: str):
    """Construct ``registry[spec["name"]](**rest)`` from a config table; a bad parameter is a one-line
    :class:`SpecError` in the user's words."""
    from pydantic import ValidationError

    spec = dict(spec)
    name = spec.pop("name", None)
    cls = lookup(registry, name, kind)
    try:
        return cls(**spec)
    except ValidationError as err:
        key, problem = validation_problems(err, cls)[0]
        raise SpecError(kind, name, key, problem) from None
