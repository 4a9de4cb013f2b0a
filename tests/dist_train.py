"""Run by test_distributed.py, under torchrun (DDP, gloo) or as one process: train a tiny Control
model and write this rank's final trainable weights (rank{R}.pt), or the error it stopped with
(rank{R}.error).

    dist_train.py DATA OUTPUT METHOD BATCH_SIZE [nan-on-rank1]

`nan-on-rank1` makes rank 1's logits non-finite from its third forward on.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_model, make_tokenizer  # noqa: E402

from controlllm.training.train import TrainConfig, TrainingError, train, trainable_state  # noqa: E402


def main(data: str, output: str, method: str, batch_size: str, fault: str = "none") -> None:
    rank = int(os.environ.get("RANK", 0))
    tokenizer = make_tokenizer()
    model = make_model("llama", vocab_size=len(tokenizer))
    if fault == "nan-on-rank1" and rank == 1:
        calls = []

        def poison(module, args, out):
            calls.append(1)
            return out * float("nan") if len(calls) >= 3 else out

        model.lm_head.register_forward_hook(poison)
    cfg = TrainConfig(data=data, output=output, method=method, max_steps=4, batch_size=int(batch_size), seq_len=32,
                      save_steps=2, logging_steps=1, lr=1e-2, progress=False, interpolation="dlerp",
                      train_interpolation=True, keep_checkpoints=True)
    try:
        result = train(cfg, model=model, tokenizer=tokenizer)
    except TrainingError as err:
        with open(os.path.join(output, f"rank{rank}.error"), "w") as f:
            f.write(str(err))
        raise
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    state = {k: v.detach().cpu().clone() for k, v in trainable_state(result.model).items()}
    torch.save({"world": world, "state": state}, os.path.join(output, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:])
