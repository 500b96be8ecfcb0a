"""Base of parameter models (defenses, attacks) that register themselves by name."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class Registered(BaseModel):
    """Base of parameter models that register themselves by ``name`` (defenses, attacks): a config table
    ``{name = ..., **params}`` validates by constructing the registered class, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: ClassVar[str]
    registry: ClassVar[dict[str, type]]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            cls.registry[cls.name] = cls
