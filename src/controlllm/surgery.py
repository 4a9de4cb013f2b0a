"""Surgery: find the decoder layers of a transformers causal LM and install Control blocks in them."""

from __future__ import annotations

from torch import nn

from .layers import decoder_layers  # noqa: F401  (re-exported: where a model's decoder layers are)
from .block import CachePlan, ControlBlock, StackBlock, _Block
from .config import ControlConfig
from .interpolators import build_interpolator


def hidden_size_of(model: nn.Module) -> int:
    config = model.config
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    size = getattr(text_config, "hidden_size", None)
    if size is None:
        size = model.get_input_embeddings().embedding_dim
    return int(size)


def layer_kinds(config: ControlConfig, positions: list[int]) -> list[str]:
    """'concat' or 'stack' for each chosen position; hybrid alternates, starting with stack."""
    if config.expand_type == "hybrid":
        return ["stack" if j % 2 == 0 else "concat" for j in range(len(positions))]
    return [config.expand_type] * len(positions)


def install_blocks(model: nn.Module, config: ControlConfig) -> dict[int, _Block]:
    """Replace each chosen decoder layer of `model` (in place) with a Control block.

    Every original parameter is frozen first; the copies (and trainable interpolators) are the only
    parameters with requires_grad. Returns {layer index: block}.
    """
    layers = decoder_layers(model)
    if any(isinstance(layer, _Block) for layer in layers):
        raise ValueError(f"{type(model).__name__} already has Control blocks installed; wrap the original model once")
    num_layers = len(layers)
    positions = config.resolve_layers(num_layers)
    for p in model.parameters():
        p.requires_grad_(False)
    plan = CachePlan(num_layers, positions)
    hidden = hidden_size_of(model)
    blocks: dict[int, _Block] = {}
    for j, (index, kind) in enumerate(zip(positions, layer_kinds(config, positions))):
        slot = num_layers + j
        if kind == "stack":
            block = StackBlock(layers[index], index, slot, plan)
        else:
            interpolator = build_interpolator(config.interpolation, hidden, config.interpolation_init, config.gate_norm)
            interpolator.requires_grad_(config.train_interpolation)
            if config.copy_rank is None:
                block = ControlBlock(layers[index], index, slot, plan, interpolator,
                                     config.alignment_loss, config.alignment_margin)
            else:
                block = _low_rank_block(layers[index], index, slot, plan, interpolator, config)
            param = next(layers[index].parameters(), None)
            if param is not None:  # interpolator and statistics live where the layer lives
                block.to(param.device)
        block.dial = config.dial
        layers[index] = block
        blocks[index] = block
    return blocks


def _low_rank_block(layer: nn.Module, index: int, slot: int, plan: CachePlan, interpolator, config: ControlConfig):
    """A ControlBlock whose trainable branch is a low-rank copy of `layer` (`controlllm.lowrank`). The
    block is made around a weightless placeholder, so no full copy is ever built (not even briefly:
    on a quantised base it would be a full-precision one), then given the layer and its low-rank copy."""
    from .lowrank import low_rank_copy

    block = ControlBlock(nn.Identity(), index, slot, plan, interpolator, config.alignment_loss, config.alignment_margin)
    block.base_layer = layer
    block.expanded_layer = low_rank_copy(layer, index, slot, config.copy_rank, config.copy_scale_alpha())
    return block


def remove_blocks(model: nn.Module) -> dict[int, _Block]:
    """Put the frozen layers back in place of the blocks; returns the removed blocks by index."""
    layers = decoder_layers(model)
    removed = {}
    for i, layer in enumerate(layers):
        if isinstance(layer, _Block):
            layers[i] = layer.base_layer
            removed[i] = layer
    return removed
