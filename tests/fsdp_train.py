"""Run by test_fsdp.py: train a tiny Control model for 2 steps, checkpoint, resume in a fresh model
for 2 more, and write the final trainable weights. `fsdp` runs under torchrun with every decoder
layer (each frozen original and each trainable copy) sharded by FSDP2 on CPU (gloo), each rank
taking half of the global batch; `single` runs the same global batch in one process."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_model  # noqa: E402

from controlllm import ControlConfig, get_control_model  # noqa: E402
from controlllm.surgery import decoder_layers  # noqa: E402
from controlllm.training.train import (full_state_dict, interpolation_weights, load_full_trainable_state,  # noqa: E402
                              trainable_state)

GLOBAL_BATCH, SEQ, LR = 4, 16, 0.5


def build(sharded: bool):
    model = get_control_model(make_model("llama"), ControlConfig(num_expanded_layers=2, interpolation="dlerp",
                                                                 train_interpolation=True))
    model.train()
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for i, layer in enumerate(decoder_layers(model.base_model)):
            if i in model.blocks:
                fully_shard(layer.base_layer)
                fully_shard(layer.expanded_layer)
            else:
                fully_shard(layer)
        fully_shard(model)  # the root: embeddings, norm, LM head and the interpolators
    return model


def steps(model, first: int, last: int, rank: int, world: int) -> None:
    # SGD without momentum keeps no optimizer state, so weights alone resume a run exactly.
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    per_rank = GLOBAL_BATCH // world
    for step in range(first, last):
        ids = torch.randint(3, 96, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(step))
        ids = ids[rank * per_rank:(rank + 1) * per_rank]
        model(input_ids=ids, labels=ids).loss.backward()  # FSDP averages gradients over ranks
        optimizer.step()
        optimizer.zero_grad()


def main(mode: str, output: str) -> None:
    sharded = mode == "fsdp"
    if sharded:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if sharded else 0
    world = torch.distributed.get_world_size() if sharded else 1
    checkpoint = os.path.join(output, f"{mode}-checkpoint")

    model = build(sharded)
    steps(model, 0, 2, rank, world)
    state = full_state_dict(model) if sharded else None  # every rank takes part
    if rank == 0:
        model.save_pretrained(checkpoint, state_dict=state)
    if sharded:
        torch.distributed.barrier()

    from safetensors.torch import load_file

    resumed = build(sharded)
    delta = load_file(os.path.join(checkpoint, "control_model.safetensors"))
    if sharded:
        load_full_trainable_state(resumed, delta, source=checkpoint)
    else:
        resumed.load_trainable_state(delta, source=checkpoint)
    steps(resumed, 2, 4, rank, world)
    final = trainable_state(resumed)  # gathers the shards under FSDP
    for block in resumed.control_blocks.values():
        block.last_weight = None  # read the gate's bias (sigmoid(b)), not this rank's last batch
    weights = interpolation_weights(resumed)  # the bias is gathered: rank 1's own shard of it is empty
    if rank == 0:
        torch.save({"weights": weights, "final": {k: v.detach().cpu().clone() for k, v in final.items()},
                    "world": world}, os.path.join(output, f"{mode}.pt"))
    if sharded:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
