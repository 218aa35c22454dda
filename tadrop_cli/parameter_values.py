"""A recipe's parameter values: their forms (a scalar, a gradient, `{filter, value}` entries) and
what one means for one tensor (mergekit's rules).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt

from .errors import BadInput

Number = StrictInt | StrictFloat


class ConditionalValue(BaseModel):
    """mergekit's filtered parameter value: applies to tensors whose name contains `filter`; the
    value is a scalar or a gradient (a list of numbers, interpolated by layer position)."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # as the recipe's other mappings

    filter: str | None = None
    value: StrictBool | Number | str | list[Number]


ParamValue = StrictBool | Number | str | list[ConditionalValue] | list[Number] | ConditionalValue


def value_for_tensor(value: ParamValue, tensor_name: str, layer_position: float | None) -> Any:
    """Resolve a mergekit parameter value for one tensor.

    Scalars apply everywhere; a list of {filter, value} (or one) takes the first entry whose
    filter is a substring of the name, case-sensitive, or is "*" or absent (mergekit's
    rule: "*" is every tensor, not a glob), and resolves its value in turn; a list of numbers is a
    gradient, interpolated over the tensor's relative layer position (mergekit's rule:
    tensors outside numbered layers take the first value).
    """
    if isinstance(value, ConditionalValue):
        value = [value]
    if not isinstance(value, list):
        return value
    if value and isinstance(value[0], ConditionalValue):
        for cond in value:
            if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
                return value_for_tensor(cond.value, tensor_name, layer_position)
        return None
    if layer_position is None or len(value) == 1:
        return value[0]
    scaled = layer_position * (len(value) - 1)
    low = min(int(scaled), len(value) - 2)
    frac = scaled - low
    return value[low] * (1 - frac) + value[low + 1] * frac


def scalars(where: str, value: ParamValue) -> list[Any]:
    """Every scalar a parameter's value may take: the value, a gradient's points, each filtered
    value's (a filtered value may be a gradient). BadInput for an empty list."""
    if isinstance(value, ConditionalValue):
        return scalars(where, value.value)
    if not isinstance(value, list):
        return [value]
    if not value:
        raise BadInput(f"{where}: an empty list is neither a value nor a gradient; give a number or a non-empty list")
    return [scalar for v in value for scalar in scalars(where, v)]
