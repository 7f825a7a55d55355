"""The base of every section of a recipe (and of its data sources): keys it does not define are refused, and so are
`true`/`false` given to a number, which pydantic would otherwise read as 1/0 (`lr: true` trains at 1.0), and an
infinite or NaN number (YAML's `.inf`, `.nan`), which no setting means (`epochs: .inf` would never end)."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _takes_numbers_not_bools(annotation: Any) -> bool:
    """Whether a field of this type takes an int or a float and no bool."""
    kinds, pending = set(), [annotation]
    while pending:
        kind = pending.pop()
        if typing.get_origin(kind) in (typing.Union, types.UnionType, typing.Annotated):
            pending.extend(typing.get_args(kind))
        else:
            kinds.add(kind)
    return bool(kinds & {int, float}) and bool not in kinds


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name)
        if isinstance(value, bool) and field is not None and _takes_numbers_not_bools(field.annotation):
            raise ValueError(f"takes a number, not {str(value).lower()}")
        return value
