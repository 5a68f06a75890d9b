"""Shared behaviour of the project's frozen config dataclasses: validation, copy with changes, and a strict dict
round trip."""

from __future__ import annotations

import dataclasses
from typing import Any


class FrozenConfig:
    """Mixin for frozen dataclasses: `check`, `replace`, `to_dict`, and `from_dict`, which rejects unknown fields."""

    def check(self, checks: list[tuple[bool, str]]) -> None:
        """Raise one ValueError naming the config class and the first failed `(ok, message)` check."""
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{type(self).__name__}: {message}")

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
