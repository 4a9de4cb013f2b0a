"""Self-distillation fine-tuning (SDFT) through TRL, for `controlllm compare`'s SDFT baseline.

SDFT (Shenfeld et al. 2026, "Self-Distillation Enables Continual Learning") learns from
demonstrations without imitating them token by token: the model, shown the demonstration in its
prompt, is its own teacher; the student (the same model without the demonstration) samples its own
answer and is trained to match the teacher's next-token distribution on it. TRL ships it as
`trl.experimental.sdft.SDFTTrainer`; this module turns chats into its records, runs it for a fixed
number of steps and saves a run folder that `controlllm.runs.open_run` reads as a full fine-tuning
run (final/ is a plain model folder with run_config.json naming the base), so the dial (WiSE-FT
between the base and the trained weights), scoring, merge and export treat it as full weights.

    from controlllm.integrations.sdft import train_sdft
    result = train_sdft(model, tokenizer, conversations, "runs/sdft", lr=3e-5, steps=100)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass

from ..errors import UsageError

# The teacher's prompt: the question, then the demonstration, as SDFT's paper frames it.
TEACHER_PROMPT = ("{prompt}\n\nThis is an example for a response to the question:\n{privileged_context}\n\n"
                  "Now answer with a response of your own.")
BASE_STAGING = "base"  # a model given in memory is saved here first: TRL builds the teacher from a path


class SDFTError(UsageError):
    """SDFT cannot train on this data (a conversation whose prompt does not end with a user turn)."""


@dataclass
class SDFTResult:
    """A finished SDFT run: its folder, its final/ (a full model folder), the training time, the
    trainable and total parameter counts and the trained model (in memory, evaluation mode)."""

    output: str
    final_dir: str
    seconds: float
    trainable_parameters: int
    total_parameters: int
    model: object
    base_path: str


def sdft_records(conversations: list[list[dict]]) -> list[dict]:
    """SDFTTrainer's records from chats: `prompt` is the conversation up to its last assistant turn
    (messages: TRL renders it with the chat template and a generation prompt), `privileged_context`
    the demonstration, that assistant turn's text. Raises SDFTError for a conversation whose prompt
    does not end with a user turn (SDFT puts the demonstration into the last user message)."""
    out = []
    for i, messages in enumerate(conversations):
        last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
        if not prompt or prompt[-1]["role"] != "user":
            raise SDFTError(f"conversation {i + 1}: the turn before its last assistant answer is "
                            f"{prompt[-1]['role'] if prompt else 'missing'!r}; SDFT needs a user turn there (the "
                            "teacher sees the demonstration inside it)")
        out.append({"prompt": prompt, "privileged_context": messages[last]["content"]})
    return out


def _source_path(model, tokenizer, output: str) -> str:
    """A folder the teacher can be built from: the model's own folder when it was loaded from one,
    else the model saved under `output/base` (TRL's teacher is `from_pretrained(config's path)`)."""
    path = getattr(model.config, "_name_or_path", "") or ""
    if path and os.path.isfile(os.path.join(path, "config.json")):
        return os.path.abspath(path)
    staging = os.path.abspath(os.path.join(output, BASE_STAGING))
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    model.config._name_or_path = staging
    return staging


def train_sdft(model, tokenizer, conversations: list[list[dict]], output: str, *, lr: float, steps: int,
               batch_size: int = 8, seq_len: int = 256, seed: int = 42, bf16: bool = False,
               threads: int | None = None, progress: bool = True, base: str | None = None,
               data: str | None = None, save_steps: int | None = None) -> SDFTResult:
    """Train the full `model` with SDFT on `conversations` for `steps` optimizer steps of
    `batch_size` prompts (one sampled answer each) at learning rate `lr`, seeded; write
    `output/final` (model, tokenizer, run_config.json with "model" = the base path and
    "method" = "sdft") and `output/run_config.json`. Prompts keep their last `seq_len` tokens; the
    student's answers are at most `seq_len` tokens, and at most 16 tokens longer than the longest
    demonstration. `base`: the base model's path to record (default: the folder the teacher is built
    from). The schedule, warm-up, weight decay and activation checkpointing are `controlllm train`'s
    defaults; TRL's SDFT settings are its own defaults (top-k logit distillation, the initial model as
    teacher). `save_steps`: also write the model's weights (no optimizer state) to
    `output/checkpoint-<step>` every that many steps (default: none)."""
    import datasets
    import torch
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from ..runs import FINAL, RUN_CONFIG, write_text_atomic
    from ..training.data import FALLBACK_CHAT_TEMPLATE
    from ..training.options import TrainConfig

    # The optimisation every other method of `controlllm train` gets (schedule, warm-up, weight decay,
    # no activation checkpointing), so that time and memory compare like with like.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}

    records = sdft_records(conversations)
    if threads:
        torch.set_num_threads(threads)
    os.makedirs(output, exist_ok=True)
    source = _source_path(model, tokenizer, output)
    longest = max(len(tokenizer(r["privileged_context"], add_special_tokens=False)["input_ids"]) for r in records)
    template = {} if getattr(tokenizer, "chat_template", None) else {"chat_template": FALLBACK_CHAT_TEMPLATE}
    args = SDFTConfig(
        output_dir=output, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr, seed=seed,
        num_generations=1, max_prompt_length=seq_len, max_completion_length=max(1, min(seq_len, longest + 16)),
        teacher_prompt_template=TEACHER_PROMPT, chat_template_kwargs=template or None, bf16=bf16,
        lr_scheduler_type="cosine", warmup_steps=int(round(defaults["warmup_ratio"] * steps)),
        weight_decay=defaults["weight_decay"], gradient_checkpointing=defaults["gradient_checkpointing"],
        logging_steps=max(1, steps // 10), report_to="none", disable_tqdm=not progress,
        **(dict(save_strategy="steps", save_steps=save_steps, save_only_model=True) if save_steps
           else dict(save_strategy="no")),
        use_cpu=not torch.cuda.is_available())
    trainer = SDFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(records),
                          processing_class=tokenizer)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    trained = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    trained.eval()
    base_path = base or source
    settings = {"teacher_model_kind": args.teacher_model_kind, "distillation_mode": args.distillation_mode,
                "distillation_topk": args.distillation_topk, "distillation_alpha": args.distillation_alpha,
                "num_generations": args.num_generations, "max_prompt_length": args.max_prompt_length,
                "max_completion_length": args.max_completion_length, "temperature": args.temperature,
                "teacher_prompt_template": TEACHER_PROMPT}
    stage = {"output": os.path.abspath(output), "method": "sdft", "task": "sft", "data": data, "max_steps": steps,
             "lr": lr, "preset": None, "base_fold": None}
    record = {"model": base_path, "method": "sdft", "task": "sft", "data": data, "lr": lr, "max_steps": steps,
              "batch_size": batch_size, "seq_len": seq_len, "seed": seed, "bf16": bf16, "sdft": settings,
              "train_seconds": round(seconds, 2), "lineage": {"base_model": base_path, "stages": [stage]}}
    final_dir = os.path.join(output, FINAL)
    shutil.rmtree(final_dir, ignore_errors=True)
    trained.save_pretrained(final_dir)
    tokenizer.save_pretrained(final_dir)
    text = json.dumps(record, indent=2)
    write_text_atomic(os.path.join(final_dir, RUN_CONFIG), text)
    write_text_atomic(os.path.join(output, RUN_CONFIG), text)
    del trainer
    return SDFTResult(output, final_dir, seconds, sum(p.numel() for p in trained.parameters() if p.requires_grad),
                      sum(p.numel() for p in trained.parameters()), trained, base_path)
