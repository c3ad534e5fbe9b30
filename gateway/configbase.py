"""What every config model shares, the core's and each driver's.

Drivers keep their own config models in their own module (or in a light
`devices/<name>_config.py` beside it when the driver imports a hardware
library), built from these bases. `gateway.config` assembles the whole file's
model from them, so this module must not import any driver.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ID_PATTERN = r"^[a-z0-9_-]+$"
NAME_PATTERN = r"^[A-Za-z0-9_-]+$"

FieldType = Literal["numeric", "boolean", "integer", "string"]


class Strict(BaseModel):
    """Base for every config model: unknown keys are errors."""

    # TOML has inf and nan; none of them is a usable interval, bound or value.
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False, allow_inf_nan=False)


def finite(v: Any) -> Any:
    """Reject inf and nan before a union type (bool | float | ...) tries its members."""
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"must be a finite number, got {v}")
    return v


class FieldBase(Strict):
    """What every field has, whatever its driver."""

    name: str = Field(pattern=NAME_PATTERN, max_length=64)
    type: FieldType = "numeric"
    unit: str = ""
    decimals: int | None = Field(None, ge=0, le=12)
    writable: bool = False
    min: float | None = None
    max: float | None = None
    description: str = ""

    @model_validator(mode="after")
    def _bounds(self) -> "FieldBase":
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        if (self.min is not None or self.max is not None) and self.type not in (
            "numeric",
            "integer",
        ):
            raise ValueError("min/max only apply to numeric and integer fields")
        return self


def unique_names(fields: list[Any]) -> list[Any]:
    """Raise if two fields of a device share a name (a validator for `fields`)."""
    seen: set[str] = set()
    for f in fields:
        if f.name in seen:
            raise ValueError(f"field name {f.name!r} is used twice")
        seen.add(f.name)
    return fields


class DeviceBase(Strict):
    """What every device has, whatever its driver."""

    # Top-level config sections a driver needs, e.g. ("mqtt",) for the shared broker.
    sections: ClassVar[tuple[str, ...]] = ()

    id: str = Field(pattern=ID_PATTERN, max_length=64)
    name: str | None = None
    # At most 30 days: a larger value would in effect never mark the device stale.
    stale_after: float | None = Field(None, gt=0, le=30 * 86_400)

    @property
    def title(self) -> str:
        """A human name for the device."""
        return self.name or self.id
