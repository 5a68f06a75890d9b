"""Shared behaviour of the project's frozen config dataclasses: copy with changes, and a strict dict round trip."""

from __future__ import annotations

import dataclasses
from typing import Any


class FrozenConfig:
    """Mixin for frozen dataclasses: `replace`, `to_dict`, and `from_dict`, which rejects unknown fields."""

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {unknown}")
        return cls(**values)
