"""Tensor names: the output's order, the numbered layer a name is in (its stack and relative
position, as mergekit's gradients read it), and a name short enough for a one-line message.
"""

from __future__ import annotations

import re

from .errors import BadInput


def _as_number(digits: str) -> tuple[int, str]:
    """A key that orders digit strings as the numbers they spell, without int() (which refuses
    over 4,300 digits): fewer significant digits first, then digit by digit."""
    significant = digits.lstrip("0")
    return (len(significant), significant)


def tensor_order(names: list[str]) -> list[str]:
    """A stable output order: by layer number where there is one, then by name."""

    def key(name: str) -> tuple:
        match = re.search(r"\.(\d+)\.", name)
        return (True, _as_number(match.group(1)), name) if match else (False, (0, ""), name)

    return sorted(names, key=key)


# a numbered layer in a tensor name (group 1: the number), as mergekit's gradients and TADrop's scopes read it;
# the leftmost wins, so a T5 name (encoder.block.3.layer.1....) is in block 3, not sub-layer 1
LAYER_NUMBER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
MAX_LAYER_DIGITS = 9  # no model has a billion layers; a longer number is damage, or an attack on int()


def shown_name(name: str, limit: int = 80) -> str:
    """A tensor name short enough for a one-line message."""
    return name if len(name) <= limit else f"{name[:limit]}... ({len(name)} characters)"


def layer_number(name: str) -> int | None:
    """The number of the layer a tensor belongs to, or None; BadInput for a number no model has."""
    located = layer_of(name)
    return None if located is None else located[1]


def layer_of(name: str) -> tuple[str, int] | None:
    """(the stack, the layer number) of a tensor in a numbered layer, or None. The stack is the name
    up to the number ("encoder.block.", "vision_tower.vision_model.encoder.layers."): a model's
    separately numbered stacks (T5's encoder and decoder, a VLM's vision tower and language model)
    are told apart by it, as mergekit tells apart its architectures' modules."""
    match = LAYER_NUMBER.search(name)
    if match is None:
        return None
    length = _as_number(match.group(1))[0]
    if length > MAX_LAYER_DIGITS:
        raise BadInput(
            f"tensor {shown_name(name)}: a layer number of {length} digits; tadrop takes at most {MAX_LAYER_DIGITS}"
        )
    return name[: match.start(1)], int(match.group(1))


def layer_positions(names: list[str]) -> dict[str, float | None]:
    """Each tensor's relative layer position in [0, 1] (None outside numbered layers), for
    mergekit's gradient parameters: layer i of a stack of n layers is at i / (n - 1), and at 1
    when n = 1 (mergekit 0.1.5's plan_slice), n counted within the tensor's own stack (mergekit
    numbers each module's layers from 0: a T5 decoder's or a vision tower's as well)."""
    located = {name: layer_of(name) for name in names}
    layers_per_stack: dict[str, int] = {}
    for where in located.values():
        if where is not None:
            stack, number = where
            layers_per_stack[stack] = max(layers_per_stack.get(stack, 0), number + 1)
    return {
        name: None if where is None else _position(where[1], layers_per_stack[where[0]])
        for name, where in located.items()
    }


def _position(layer: int, layers: int) -> float:
    """mergekit's t of layer `layer` of `layers`: layer / (layers - 1), 1 for a single layer."""
    return layer / (layers - 1) if layers > 1 else 1.0
