"""Run by test_distributed.py under torchrun: train a tiny Control model, write each rank's weight hash."""

import hashlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_model, make_tokenizer  # noqa: E402

from controlllm.train import TrainConfig, train, trainable_state  # noqa: E402


def main(data: str, output: str, method: str) -> None:
    tokenizer = make_tokenizer()
    model = make_model("llama", vocab_size=len(tokenizer))
    result = train(TrainConfig(data=data, output=output, method=method, max_steps=4, batch_size=2, seq_len=32,
                               save_steps=2, logging_steps=1, lr=1e-2, progress=False, interpolation="dlerp"),
                   model=model, tokenizer=tokenizer)
    digest = hashlib.sha256()
    for name, tensor in sorted(trainable_state(result.model).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    rank = int(os.environ.get("RANK", 0))
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    with open(os.path.join(output, f"rank{rank}.sha256"), "w") as f:
        f.write(f"{world} {digest.hexdigest()}\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
