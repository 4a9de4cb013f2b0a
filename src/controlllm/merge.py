"""Merge-back: fold trained copies into their frozen layers, and measure how faithful that is."""

from __future__ import annotations

import copy
import os

import torch
from torch import nn
from torch.nn import functional as F

from .block import ControlBlock, StackBlock, _Block, make_identity, renumber_layer
from .lowrank import fold_low_rank, is_low_rank
from .surgery import decoder_layers


@torch.no_grad()
def fold_lerp(base_layer: nn.Module, expanded_layer: nn.Module, w: float) -> nn.Module:
    """W_p <- W_p + w (W_e - W_p) for every parameter of `base_layer` (in place); returns it."""
    expanded = dict(expanded_layer.named_parameters())
    for name, p in base_layer.named_parameters():
        e = expanded[name]
        p.copy_(p + torch.as_tensor(w, dtype=p.dtype) * (e.to(p.dtype) - p))
    return base_layer


@torch.no_grad()
def fold_stack_dial(block: StackBlock) -> nn.Module:
    """A dialled stack copy as plain weights: each parameter interpolated from the copy's identity
    initialisation (the frozen layer's weights with the output projections zeroed, or the output
    norms silenced) toward its trained value, W_0 + s (W - W_0). Exact at s = 0 (the identity) and
    s = 1; in between it approximates the unmerged model's s-scaled contribution."""
    start = make_identity(copy.deepcopy(block.base_layer), type(block.base_layer).__name__)
    initial = dict(start.named_parameters())
    for name, p in block.expanded_layer.named_parameters():
        p.copy_(torch.lerp(initial[name].to(p.dtype), p, block.dial))
    return block.expanded_layer


def merge_blocks(model: nn.Module, blocks: dict[int, _Block]) -> nn.Module:
    """Replace every block in `model` by plain layers: concat blocks folded, stack copies inserted."""
    layers = decoder_layers(model)
    new_layers: list[nn.Module] = []
    types = getattr(model.config, "layer_types", None)
    new_types = [] if types is not None else None
    for i, layer in enumerate(layers):
        if isinstance(layer, ControlBlock) and is_low_rank(layer.expanded_layer):
            # W_e = W_p + (alpha / r) B A: the fold W_p + w (W_e - W_p) is W_p + w (alpha / r) B A.
            new_layers.append(fold_low_rank(layer.base_layer, layer.expanded_layer, layer.merge_weight()))
        elif isinstance(layer, ControlBlock):
            new_layers.append(fold_lerp(layer.base_layer, layer.expanded_layer, layer.merge_weight()))
        elif isinstance(layer, StackBlock):
            new_layers.append(layer.base_layer)
            new_layers.append(layer.expanded_layer if layer.dial == 1.0 else fold_stack_dial(layer))
        else:
            new_layers.append(layer)
        if new_types is not None:
            new_types.extend([types[i]] * (2 if isinstance(layer, StackBlock) else 1))
    inserted = len(new_layers) != len(layers)
    if inserted:
        # Inserted layers take their place in the numbering: layer q caches in slot q.
        old_index = {}
        for i, layer in enumerate(layers):
            if isinstance(layer, _Block):
                old_index[id(layer.base_layer)] = i
                old_index[id(layer.expanded_layer)] = layer.slot
            else:
                old_index[id(layer)] = i
        for q, layer in enumerate(new_layers):
            renumber_layer(layer, old_index[id(layer)], q)
        model.config.num_hidden_layers = len(new_layers)
        if new_types is not None:
            model.config.layer_types = new_types
    model.model.layers = nn.ModuleList(new_layers)
    return model


@torch.no_grad()
def merge_fidelity(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   dequantize: bool = False) -> dict:
    """How closely `model.merge_and_unload(dequantize)` reproduces the unmerged ControlModel on these inputs.

    Works on a copy (the model is left as it is). Returns the mean and max over real tokens of
    KL(unmerged || merged) of the next-token distributions (nats), the max absolute logit
    difference and the top-1 agreement.
    """
    was_training = model.training
    model.eval()
    try:
        reference = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        merged = copy.deepcopy(model).merge_and_unload(dequantize=dequantize)
        merged.eval()
        candidate = merged(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    finally:
        model.train(was_training)
    log_p, log_q = F.log_softmax(reference, -1), F.log_softmax(candidate, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    mask = torch.ones_like(kl, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    kl = kl[mask]
    agree = (reference.argmax(-1) == candidate.argmax(-1))[mask].float()
    return {
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "max_abs_logit_diff": float((reference - candidate).abs().max()),
        "top1_agreement": float(agree.mean()),
    }


def calibration_batches(path: str | os.PathLike, tokenizer, task: str = "cpt", seq_len: int = 256,
                        batch_size: int = 8, max_sequences: int | None = 64) -> list[dict]:
    """Batches (input_ids, attention_mask) from a training-format file, for
    `ControlModel.measure_merge_weights`: text (.txt / .jsonl) packed into `seq_len` blocks for
    task 'cpt', chats (.jsonl) for 'sft'; the first `max_sequences` sequences."""
    from .training.data import DataCollator, build_cpt_dataset, build_sft_dataset, read_chat_records, read_text_records

    if task == "sft":
        dataset = build_sft_dataset(read_chat_records(path), tokenizer, seq_len)
    else:
        dataset = build_cpt_dataset(read_text_records(path), tokenizer, seq_len)
    examples = [dataset[i] for i in range(len(dataset) if max_sequences is None else min(len(dataset), max_sequences))]
    collate = DataCollator.from_tokenizer(tokenizer)
    batches = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size])
        batches.append({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    return batches


def fidelity_batches(tokenizer, data: str | os.PathLike | None = None, text: str | None = None, task: str = "cpt",
                     seq_len: int = 256, max_sequences: int = 16, batch_size: int = 4) -> list[dict]:
    """Batches for a fidelity check: the first `max_sequences` sequences of `data` (the run's format,
    `calibration_batches`), or the one `text`."""
    if data is not None:
        return calibration_batches(data, tokenizer, task=task, seq_len=seq_len, batch_size=batch_size,
                                   max_sequences=max_sequences)
    enc = tokenizer(text, return_tensors="pt")
    return [{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}]


@torch.no_grad()
def fidelity(reference_logits: list[torch.Tensor], model: nn.Module, batches: list[dict]) -> dict:
    """How closely `model` reproduces `reference_logits` (one tensor per batch, e.g. the unmerged
    run's) on `batches`: the mean and max over real tokens of KL(reference || model) of the
    next-token distributions (nats, computed in float64; a value below 0 is rounding and reads 0),
    the max absolute logit difference, the top-1 agreement, and the tokens checked."""
    kls, agree, diff = [], [], 0.0
    for reference, batch in zip(reference_logits, batches):
        candidate = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        log_p = F.log_softmax(reference.double(), -1)
        log_q = F.log_softmax(candidate.double(), -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)
        mask = batch.get("attention_mask")
        mask = torch.ones_like(kl, dtype=torch.bool) if mask is None else mask.bool()
        kls.append(kl[mask])
        agree.append((reference.argmax(-1) == candidate.argmax(-1))[mask].float())
        diff = max(diff, float((reference.float() - candidate.float()).abs().max()))
    kl = torch.cat(kls) if kls else torch.zeros(1, dtype=torch.float64)
    top1 = torch.cat(agree) if agree else torch.ones(1)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "max_abs_logit_diff": diff,
            "top1_agreement": float(top1.mean()), "tokens": int(kl.numel())}
