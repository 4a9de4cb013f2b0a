"""Does the paper-cpt preset's cosine alignment drift more than nmse on a real model?

Cosine is not a function of the branches' gap (see controlllm/block.py): it pushes the layers below an
expanded layer even where the branches respond alike, and it can be lowered by growing the hidden
states. This script trains the paper-cpt preset twice, once with its cosine loss and once with nmse
(everything else equal), and measures on the keep text, for each run:

* the mean per-token norm of the hidden state entering each expanded layer (the output of the layers
  below it), trained over base: growth there is cosine's drift;
* along the dial s in --dials: the gain (held-out LM loss decrease on --eval-data, nats/token) and the
  KL to the base on --keep-data (nats/token), so KL can be compared at equal gain by interpolation.

Usage (writes OUT/cosine.json and prints a table):

    python benchmarks/calibration/cosine.py --model models/SmolLM2-135M-Instruct --data cpt_train.txt \
        --eval-data cpt_val.txt --keep-data keep.txt --out runs/cosine-vs-nmse --max-steps 200

Cost: two training runs of --max-steps steps (at 135M, seq 256, batch 4: about 1.5 s a step on 8 CPU
cores, so about 10 minutes for 200 steps each; a few minutes on one GPU), then len(--dials) x 2
passes over --eval-data and --keep-data per run (--max-texts texts each).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from torch.nn import functional as F


def token_batches(path: str, tokenizer, seq_len: int, max_texts: int):
    from controlllm.training.data import read_text_records

    texts = read_text_records(path)[:max_texts]
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=seq_len)["input_ids"]
        if ids.shape[1] > 1:
            yield ids


@torch.no_grad()
def measure(model, tokenizer, args) -> dict:
    """Gain and KL along the dial, and hidden-state norms below each expanded layer (trained / base)."""
    expanded = sorted(model._blocks)
    rows = []
    for s in args.dials:
        model.set_dial(s)
        loss_sum = base_sum = kl_sum = n_eval = n_keep = 0.0
        for ids in token_batches(args.eval_data, tokenizer, args.seq_len, args.max_texts):
            out = model(input_ids=ids, labels=ids)
            with model.disable_control():
                base = model(input_ids=ids, labels=ids)
            tokens = ids.shape[1] - 1
            loss_sum += float(out.lm_loss if getattr(out, "lm_loss", None) is not None else out.loss) * tokens
            base_sum += float(base.loss) * tokens
            n_eval += tokens
        for ids in token_batches(args.keep_data, tokenizer, args.seq_len, args.max_texts):
            logp = F.log_softmax(model(input_ids=ids).logits.float(), -1)
            with model.disable_control():
                logq = F.log_softmax(model(input_ids=ids).logits.float(), -1)
            kl_sum += float((logq.exp() * (logq - logp)).sum(-1).sum())  # KL(base || model) per token
            n_keep += ids.shape[1]
        rows.append({"dial": s, "gain": (base_sum - loss_sum) / n_eval, "kl": kl_sum / n_keep})
    model.set_dial(1.0)
    norms = {i: [0.0, 0.0] for i in expanded}
    count = 0
    for ids in token_batches(args.keep_data, tokenizer, args.seq_len, args.max_texts):
        trained = model(input_ids=ids, output_hidden_states=True).hidden_states
        with model.disable_control():
            base = model(input_ids=ids, output_hidden_states=True).hidden_states
        for i in expanded:  # hidden_states[i] is the input of decoder layer i
            norms[i][0] += float(trained[i].float().norm(dim=-1).sum())
            norms[i][1] += float(base[i].float().norm(dim=-1).sum())
        count += ids.shape[1]
    return {"dial": rows, "norm_ratio_below": {str(i): t / b for i, (t, b) in norms.items()},
            "norm_below_base": {str(i): b / count for i, (_, b) in norms.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--eval-data", required=True)
    parser.add_argument("--keep-data", required=True)
    parser.add_argument("--out", default="runs/cosine-vs-nmse")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-texts", type=int, default=64)
    parser.add_argument("--dials", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    args = parser.parse_args()

    from controlllm.training.train import TrainConfig, train

    results = {}
    for loss in ("cosine", "nmse"):
        cfg = TrainConfig(model=args.model, data=args.data, output=os.path.join(args.out, loss), preset="paper-cpt",
                          alignment_loss=loss, max_steps=args.max_steps, lr=args.lr, seq_len=args.seq_len,
                          batch_size=args.batch_size, save_steps=args.max_steps, progress=False)
        result = train(cfg)
        from transformers import AutoTokenizer

        model, tokenizer = result.model.eval(), AutoTokenizer.from_pretrained(result.final)
        results[loss] = measure(model, tokenizer, args)
        print(loss, json.dumps(results[loss], indent=1))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cosine.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=2)
    print(f"{'loss':8} {'dial':>5} {'gain':>9} {'KL keep':>9}")
    for loss, r in results.items():
        for row in r["dial"]:
            print(f"{loss:8} {row['dial']:5.2f} {row['gain']:9.4f} {row['kl']:9.5f}")
        print(f"{loss:8} hidden-state norm below each expanded layer, trained / base: "
              + ", ".join(f"{i}: {v:.3f}" for i, v in r["norm_ratio_below"].items()))


if __name__ == "__main__":
    main()
