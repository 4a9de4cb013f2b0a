"""Continued pre-training / continued SFT with Control LLM or the baselines, on the HF Trainer.

`train(TrainConfig(...))` is what `controlllm train` runs. Every method (control, full, lora,
stack, freeze) sees the same data order, seed and schedule; only what is trainable differs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import get_last_checkpoint

from ..budget import DriftBudgetCallback
from ..config import ControlConfig
from ..errors import CheckpointError, UsageError, UserError
from ..model import WEIGHTS_NAME, ControlModel, get_control_model, is_trainable_key, read_delta
from ..model_card import write_model_card
from .monitor import use_compact_console
from .options import CONTROL_FIELDS, METHODS, TASKS, TrainConfig  # noqa: F401  (TrainConfig is imported from here)
from ..runs import FINAL, RUN_CONFIG, Output, open_run, read_run_config, replace_dir, write_text_atomic
from ..surgery import decoder_layers

METRICS = "metrics.jsonl"
DIALLED = "dialled"
LOGS = "logs"
STAGING = ".staging"


class TrainingError(UserError, RuntimeError):
    """Training cannot continue (e.g. a non-finite loss); the message names the step."""


# ----------------------------------------------------------------------------- models
def prepare_model(base: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Make `base` trainable the way `cfg.method` says; returns the model to train."""
    num_layers = len(decoder_layers(base))
    if cfg.method in ("control", "stack", "freeze"):
        try:  # the flags are checked alone in TrainConfig; here against this model's depth
            cfg.control_config(num_layers).resolve_layers(num_layers)
        except ValueError as err:
            raise UsageError(str(err)) from err
    if cfg.method in ("control", "stack"):
        return get_control_model(base, cfg.control_config(num_layers))
    if cfg.method == "full":
        for p in base.parameters():
            p.requires_grad_(True)
        return base
    if cfg.method == "freeze":
        chosen = cfg.control_config(num_layers).resolve_layers(num_layers)
        for p in base.parameters():
            p.requires_grad_(False)
        layers = decoder_layers(base)
        for i in chosen:
            for p in layers[i].parameters():
                p.requires_grad_(True)
        return base
    from peft import LoraConfig, get_peft_model

    if cfg.quantize_base is not None:  # QLoRA: LoRA on the quantised base
        from ..quantize import quantize_model

        quantize_model(base, cfg.quantize_base)
        for p in base.parameters():
            p.requires_grad_(False)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    return get_peft_model(base, lora)


def _fsdp_requested() -> bool:
    """Whether this process was launched to train with FSDP (accelerate's launcher or config)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def _unwrap(model):
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a run trains, by name (for comparisons across runs and ranks). Under FSDP this gathers
    the shards (call it on every rank); rank 0 gets the whole tensors, the other ranks {}."""
    if is_sharded(model):
        full = full_state_dict(model)
        if isinstance(_unwrap(model), ControlModel):
            return {k: v for k, v in full.items() if is_trainable_key(k)}
        trained = {n.removeprefix("_orig_mod.") for n, p in _unwrap(model).named_parameters() if p.requires_grad}
        return {k: v for k, v in full.items() if k in trained}
    model = _unwrap(model)
    if isinstance(model, ControlModel):
        return model.trainable_state_dict()
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------ sharded (FSDP)
# FSDP leaves each rank only a shard of every parameter, so reading weights, saving and loading
# go through torch's distributed state-dict API, which gathers (or scatters) on every rank.
def is_sharded(model: nn.Module) -> bool:
    """Whether `model` (or a module inside it) is sharded by FSDP (FSDP1 wrapper or FSDP2 DTensors)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FullyShardedDataParallel, FSDPModule)) for m in model.modules())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state of a sharded model as CPU tensors on rank 0 ({} on the others), keyed as in
    the base model of a ControlModel. A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not isinstance(_unwrap(model), ControlModel):
        return state
    return {k.removeprefix("base_model."): v for k, v in state.items()}


def load_full_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a whole (unsharded) Control delta into a ControlModel that FSDP shards. Every rank
    passes the same `state`; each keeps its own shard. Names and shapes are checked first."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    control = _unwrap(model)
    own = {k: v.shape for k, v in control.trainable_state_dict().items()}  # DTensor shapes are global
    wrong = sorted(set(own) ^ set(state)) or [k for k in sorted(own) if tuple(own[k]) != tuple(state[k].shape)]
    if wrong:
        raise CheckpointError(f"The Control delta from {source!r} does not match this model: {wrong[:5]}")
    result = set_model_state_dict(model, {"base_model." + k: v for k, v in state.items()},
                                  options=StateDictOptions(full_state_dict=True, strict=False))
    if result.unexpected_keys:
        raise CheckpointError(f"The Control delta from {source!r} has keys this model lacks: {result.unexpected_keys[:5]}")


def interpolation_weights(model: nn.Module) -> dict[int, float]:
    """`ControlModel.interpolation_weights()` of a possibly sharded model. Under FSDP the
    parameters are gathered first, so every rank must call it."""
    control = _unwrap(model)
    if not is_sharded(model):
        return control.interpolation_weights()
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    groups = {name: m for name, m in model.named_modules() if isinstance(m, FSDPModule)}
    if groups:  # FSDP2: gather only the groups that hold interpolators (their nearest FSDP ancestor)
        owners = {}
        for name, m in model.named_modules():
            if name.endswith(".interpolator"):
                owner = max((g for g in groups if g == "" or name.startswith(g + ".")), key=len)
                owners[owner] = groups[owner]
        for m in owners.values():
            m.unshard()
        try:
            return control.interpolation_weights()
        finally:
            for m in owners.values():
                m.reshard()
    with FullyShardedDataParallel.summon_full_params(model, writeback=False):
        return control.interpolation_weights()


# ---------------------------------------------------------------------------- trainer
class DeltaCheckpoints:
    """What a transformers Trainer (the HF Trainer or TRL's) needs to checkpoint a ControlModel, shared
    by `ControlTrainer` and the TRL trainers (`controlllm.integrations.trl`); put it before the Trainer
    class in the bases.

    - Each checkpoint is written under `.staging/` and renamed into place once complete, so a kill
      mid-write never leaves a checkpoint that looks finished; then old ones are rotated
      (`checkpoint_limit()`, by default `args.save_total_limit`).
    - A ControlModel is saved as its Control delta (`ControlModel.save_pretrained`), with the gathered
      state dict the Trainer passes under FSDP (the model's own tensors are shards there).
    - Resuming reads the delta with `read_delta` (a missing or corrupt file is a `CheckpointError`) and
      checks names and shapes.
    Any other model is saved and loaded by the Trainer's own code.
    """

    def checkpoint_limit(self) -> int | None:
        """How many checkpoints are kept (None: all)."""
        return self.args.save_total_limit

    def _save(self, output_dir=None, state_dict=None):
        model = _unwrap(self.model)
        if not isinstance(model, ControlModel):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            model.save_pretrained(output_dir, state_dict=state_dict)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = _unwrap(model if model is not None else self.model)
        wrapped = model if model is not None else self.model_wrapped
        has_delta = os.path.isfile(os.path.join(resume_from_checkpoint, WEIGHTS_NAME))
        if not isinstance(target, ControlModel) or (is_sharded(wrapped) and not has_delta):
            # A full model, or FSDP's own sharded checkpoint files: the Trainer's loader applies.
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        state = read_delta(resume_from_checkpoint)  # a clear error when it is missing or corrupt
        if is_sharded(wrapped):
            load_full_trainable_state(wrapped, state, source=resume_from_checkpoint)
        else:
            target.load_trainable_state(state, source=resume_from_checkpoint)

    def _save_checkpoint(self, model, trial):
        run_dir = self.args.output_dir
        name = f"checkpoint-{self.state.global_step}"
        staging = os.path.join(run_dir, STAGING)
        self.args.output_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = run_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            replace_dir(os.path.join(staging, name), os.path.join(run_dir, name))
            for extra in os.listdir(staging):  # files a trainer writes beside its checkpoint (TRL's model card)
                if os.path.isfile(os.path.join(staging, extra)):
                    os.replace(os.path.join(staging, extra), os.path.join(run_dir, extra))
            shutil.rmtree(staging, ignore_errors=True)
            _rotate_checkpoints(run_dir, self.checkpoint_limit())
        self.accelerator.wait_for_everyone()


class ControlTrainer(DeltaCheckpoints, Trainer):
    """The HF Trainer with: the alignment loss and interpolation weights in the logs, a stop on
    non-finite losses, checkpoints written under a temporary name and renamed, and Control deltas
    saved/loaded as deltas."""

    def __init__(self, *args, save_total_limit_atomic: int = 2, interpolation_lr: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._sums = {"lm_loss": 0.0, "alignment_loss": 0.0, "n": 0, "tokens": 0}
        self._keep = save_total_limit_atomic
        self._interpolation_lr = interpolation_lr

    def checkpoint_limit(self) -> int:
        """How many checkpoints are kept: `save_total_limit_atomic`."""
        return self._keep

    def create_optimizer(self, model=None):
        """The Trainer's optimizer; with `interpolation_lr`, the interpolators' parameters form their
        own group with that learning rate and no weight decay (the schedule scales every group alike).
        The other parameters keep the Trainer's weight-decay rule (`get_decay_parameter_names`: no
        decay on biases and norm weights)."""
        if self._interpolation_lr is None or self.optimizer is not None:
            return super().create_optimizer()
        model = _unwrap(self.model)
        decay = set(self.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        gates = [p for n, p in named if ".interpolator." in n]
        rest = [(n, p) for n, p in named if ".interpolator." not in n]
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
        groups = [{"params": [p for n, p in rest if n in decay], "weight_decay": self.args.weight_decay},
                  {"params": [p for n, p in rest if n not in decay], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if gates:
            groups.append({"params": gates, "weight_decay": 0.0, "lr": self._interpolation_lr})
        self.optimizer = optimizer_cls(groups, **kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        tokens = int((labels[..., 1:] != -100).sum()) if labels is not None else 0
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        self._stop_on_non_finite(loss)
        lm_loss = getattr(outputs, "lm_loss", None) if not isinstance(outputs, dict) else outputs.get("lm_loss")
        align = getattr(outputs, "alignment_loss", None) if not isinstance(outputs, dict) else outputs.get("alignment_loss")
        if model.training:
            # Sums over label tokens, so the logged losses are per-token means whatever the
            # accumulation and the number of ranks: the model divides its LM loss by the Trainer's
            # token count of the whole accumulated (and gathered) batch when it gets one, and
            # averages the alignment over this micro-batch's label positions.
            if lm_loss is None:  # a plain model: its own loss, before the Trainer scales it for the ranks
                lm_loss = outputs.get("loss") if isinstance(outputs, dict) else outputs[0]
            lm = float(lm_loss.detach())
            self._sums["lm_loss"] += lm * (float(num_items_in_batch) if num_items_in_batch is not None else tokens)
            self._sums["alignment_loss"] += float(align.detach()) * tokens if align is not None else 0.0
            self._sums["n"] += 1
            self._sums["tokens"] += tokens
        elif lm_loss is not None:
            # Evaluation reports the LM loss alone, so perplexity means perplexity, scaled as the
            # Trainer scales the loss it replaces.
            if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                lm_loss = lm_loss * self.accelerator.num_processes
            loss = lm_loss
        return (loss, outputs) if return_outputs else loss

    def _stop_on_non_finite(self, loss: torch.Tensor) -> None:
        # Every rank learns whether any rank's loss is non-finite, so all stop together with the same
        # error instead of the healthy ranks waiting forever in the next collective.
        bad = torch.zeros(self.args.world_size, device=loss.device)
        bad[self.args.process_index] = float(not torch.isfinite(loss.detach()).all())
        if self.args.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad)
        if bad.any():
            where = f" on rank {', '.join(str(r) for r in bad.nonzero().flatten().tolist())}" if self.args.world_size > 1 else ""
            raise TrainingError(f"non-finite loss (nan or inf) at step {self.state.global_step + 1}{where}; stopping. "
                                "Lower --lr or check the data.")

    def log(self, logs, start_time=None):
        if "loss" in logs and self._sums["n"]:
            n = self._sums["n"]
            lm_sum, align_sum, tokens = self.accelerator.reduce(torch.tensor(
                [self._sums["lm_loss"], self._sums["alignment_loss"], self._sums["tokens"]], dtype=torch.float64,
                device=self.args.device), reduction="sum").tolist()  # every rank's tokens
            tokens = max(tokens, 1.0)
            logs["lm_loss"] = round(lm_sum / tokens, 4)
            model = _unwrap(self.model)
            if isinstance(model, ControlModel) and model.control_blocks:
                logs["alignment_loss"] = round(align_sum / tokens, 6)
                weights = interpolation_weights(self.model)
                logs["w_mean"] = round(sum(weights.values()) / len(weights), 4)
                reduce = lambda t: self.accelerator.reduce(t, reduction="sum")  # noqa: E731
                logs.update({k: round(v, 6) for k, v in model.layer_statistics(reset=True, reduce=reduce).items()})
            self._sums = {"lm_loss": 0.0, "alignment_loss": 0.0, "n": 0, "tokens": 0}
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        super().log(logs, start_time)


def _checkpoints(run_dir: str) -> list[str]:
    found = []
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        if name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit():
            found.append(os.path.join(run_dir, name))
    return sorted(found, key=lambda p: int(p.rsplit("-", 1)[1]))


def _rotate_checkpoints(run_dir: str, keep: int | None) -> None:
    for path in _checkpoints(run_dir)[:-keep] if keep else []:
        shutil.rmtree(path, ignore_errors=True)


class MetricsFile(TrainerCallback):
    """Appends every log record (with its step) to run_dir/metrics.jsonl."""

    def __init__(self, path: str, resume_step: int = 0):
        self.path = path
        if resume_step and os.path.isfile(path):
            # Drop records past the checkpoint we resume from: they will be logged again.
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            write_text_atomic(path, "".join(kept))  # never truncated in place: a crash keeps the old records

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


# ------------------------------------------------------------------------------- run
@dataclass
class TrainResult:
    output: str
    final: str
    metrics: dict
    seconds: float
    trainable_parameters: int
    total_parameters: int
    model: nn.Module | None = None  # the trained model (ControlModel, PeftModel or the base model)
    dial: dict | None = None  # with --keep-data: the dial's record (dial.json of OUTPUT/dialled)


def _tensorboard(run_dir: str) -> list:
    """TensorBoard's callback writing under RUN/logs (transformers' default is RUN/runs/<date>_<host>)."""
    if not _tensorboard_available():
        return []
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = os.path.join(run_dir, LOGS)
    return [callback]


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
        return True
    except ImportError:
        return False


def train(cfg: TrainConfig, model: nn.Module | None = None, tokenizer=None) -> TrainResult:
    """Run training as configured; returns where the result is and what was logged.

    The final weights go to `output/final` (a Control delta for control/stack, a LoRA adapter for
    lora, a full model folder for full/freeze), written under a temporary name and renamed at the
    very end, so a run that failed never looks finished. `model`/`tokenizer` may be passed
    instead of `cfg.model` (tests, notebooks).
    """
    from .data import (DataCollator, DataError, build_cpt_dataset, build_sft_dataset, read_chat_records, read_mix_records,
                       read_text_records)

    if cfg.data is None:
        raise DataError("--data is required: a .txt/.jsonl file of training text (cpt) or chats (sft)")
    for path, flag in ((cfg.data, "--data"), (cfg.eval_data, "--eval-data"), (cfg.mix_data, "--mix-data"),
                       (cfg.keep_data, "--keep-data")):
        if path is not None and not os.path.isfile(path):
            raise DataError(f"{flag} {path!r} does not exist or is not a file")
    # Read (and so validate) the data before the model loads: bad input fails in a second.
    read, build = (read_text_records, build_cpt_dataset) if cfg.task == "cpt" else (read_chat_records, build_sft_dataset)
    train_records = read(cfg.data)
    eval_records = read(cfg.eval_data) if cfg.eval_data else None
    mix_records = read_mix_records(cfg.mix_data, cfg.task) if cfg.mix_data else None  # sft: text or chats
    if cfg.quantize_base is not None:
        from ..quantize import require_bitsandbytes

        if _fsdp_requested():
            raise UsageError(f"--quantize-base {cfg.quantize_base} does not work with FSDP: sharding splits the packed "
                             "quantised weights and their scales apart; train on one process, or without --quantize-base")
        require_bitsandbytes(f"--quantize-base {cfg.quantize_base}")
    final_dir = os.path.join(cfg.output, FINAL)
    if not os.path.isdir(final_dir) and os.path.isdir(final_dir + ".old"):
        os.replace(final_dir + ".old", final_dir)  # killed while its final/ was being replaced: the old one stands
    if os.path.isdir(final_dir) and not cfg.resume:
        raise UsageError(f"{final_dir!r} already exists: this run has finished; choose another --output")
    if os.path.isdir(final_dir) and cfg.resume and get_last_checkpoint(cfg.output) is None:
        raise UsageError(f"--resume: the run in {cfg.output!r} has finished and its checkpoints were removed (pass "
                         "--keep-checkpoints to keep them); to train on, start a new stage with --model "
                         f"{cfg.output!r} and another --output")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    base_fold = None
    if model is None:
        # A model folder, a .gguf, or a finished run (multi-stage: its result, folded by the run's
        # recorded fold, as `controlllm merge` folds, is the new base; the fold is recorded here).
        source = open_run(cfg.model)
        model, tokenizer = source.merged()
        base_fold = source.last_fold
    train_set = build(train_records, tokenizer, cfg.seq_len)
    if mix_records is not None:
        from .data import MixedDataset, build_mix_dataset

        # The mix's share of the trained tokens is --mix-ratio; the training data keeps its order.
        mix_set = build_mix_dataset(mix_records, tokenizer, cfg.task, cfg.seq_len)
        train_set = MixedDataset(train_set, mix_set, cfg.mix_ratio, seed=cfg.seed)
    eval_set = build(eval_records, tokenizer, cfg.seq_len) if eval_records is not None else None
    if eval_set is not None and cfg.max_eval_samples and len(eval_set) > cfg.max_eval_samples:
        eval_set = torch.utils.data.Subset(eval_set, range(cfg.max_eval_samples))
    model = prepare_model(model, cfg)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so the frozen layers below
        # the lowest trained one keep running forward only.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    os.makedirs(cfg.output, exist_ok=True)
    shutil.rmtree(os.path.join(cfg.output, STAGING), ignore_errors=True)
    resume_from = get_last_checkpoint(cfg.output) if cfg.resume else None
    earlier = read_run_config(cfg.output) if resume_from else {}
    record = run_record(cfg, base_fold)  # computed first: if it fails, the run's existing record stays as it was
    if earlier.get("base_metrics"):
        record["base_metrics"] = earlier["base_metrics"]
    write_text_atomic(os.path.join(cfg.output, RUN_CONFIG), json.dumps(record, indent=2))

    args = TrainingArguments(
        output_dir=cfg.output,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type="cosine",
        warmup_steps=int(round(cfg.warmup_ratio * cfg.max_steps)),
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        eval_strategy="steps" if (eval_set is not None and cfg.eval_steps) else "no",
        eval_steps=cfg.eval_steps or None,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.bf16,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],  # TensorBoard through the callback below, logging under the run's logs/
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not cfg.progress,
        ddp_find_unused_parameters=False,
    )
    resume_step = int(resume_from.rsplit("-", 1)[1]) if resume_from else 0
    trainer = ControlTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=DataCollator.from_tokenizer(tokenizer),
        processing_class=tokenizer,
        callbacks=[MetricsFile(os.path.join(cfg.output, METRICS), resume_step), DriftBudgetCallback(),
                   *_tensorboard(cfg.output)],
        save_total_limit_atomic=cfg.save_total_limit,
        interpolation_lr=cfg.interpolation_lr,
    )
    use_compact_console(trainer, cfg.progress)  # quiet without progress: metrics.jsonl still has every record
    start = time.time()
    # Resuming a finished run leaves it as it is: the Trainer would take one step past max_steps and
    # rewrite final/. The model is the last checkpoint's (what final/ holds).
    finished = resume_step >= cfg.max_steps and os.path.isdir(final_dir)
    base_metrics = record.get("base_metrics") or {}
    if eval_set is not None and not base_metrics and not resume_from:
        # At initialisation every method computes its base (with --quantize-base: the quantised base), so
        # this is the base's eval loss, measured once and recorded beside the trained run's.
        base_metrics = {k: v for k, v in trainer.evaluate().items() if k in ("eval_loss", "eval_perplexity")}
        record["base_metrics"] = base_metrics
        write_text_atomic(os.path.join(cfg.output, RUN_CONFIG), json.dumps(record, indent=2))
    if finished:
        trainer._load_from_checkpoint(resume_from)
    else:
        trainer.train(resume_from_checkpoint=resume_from)
    metrics = {}
    if eval_set is not None:
        metrics = trainer.evaluate()
        if "eval_loss" in base_metrics:
            metrics["base_eval_loss"] = base_metrics["eval_loss"]
            metrics["eval_loss_change"] = metrics["eval_loss"] - base_metrics["eval_loss"]
    seconds = time.time() - start
    full_state = full_state_dict(trainer.model) if is_sharded(trainer.model) else None  # gathers on every rank
    fold = None
    if not finished and full_state is None:
        fold = decide_fold(_unwrap(trainer.model), eval_set, tokenizer, cfg)
    if trainer.args.should_save and not finished:
        _write_final(trainer, tokenizer, cfg, final_dir, metrics, full_state, base_fold, fold, base_metrics)
    trainer.accelerator.wait_for_everyone()
    # Mixed precision wraps the model's forward in autocast; the returned model computes as it was
    # given (float32 stays float32), like the saved weights.
    unwrapped = _unwrap(trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False))
    trainable = sum(p.numel() for p in unwrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in unwrapped.parameters())
    dial = None
    if cfg.keep_data is not None and trainer.args.should_save:
        from ..dial import run_dial

        # The saved run is dialled as `controlllm dial` would: the model trained here stays as it is.
        dial = run_dial(cfg.output, os.path.join(cfg.output, DIALLED), learn_data=cfg.eval_data,
                        keep_data=cfg.keep_data, max_kl=cfg.max_kl, max_keep_increase=cfg.max_keep_increase,
                        seq_len=cfg.seq_len, progress=cfg.progress, overwrite=True)
    if trainer.args.should_save and not cfg.keep_checkpoints and os.path.isdir(final_dir):
        for path in _checkpoints(cfg.output):  # final/ holds the result: the optimizer state is not needed
            shutil.rmtree(path, ignore_errors=True)
    return TrainResult(cfg.output, final_dir, metrics, seconds, trainable, total, unwrapped, dial)


def run_record(cfg: TrainConfig, base_fold: dict | None = None) -> dict:
    """What run_config.json holds: the run's settings and its lineage (the original base model and
    every stage in order, this one last). `base_fold` is how this stage's base was folded when it is
    an earlier stage's Control delta (`controlllm.runs.fold_record`: the weight of each layer
    and where it comes from); it is recorded in this stage's lineage entry, so the stage is always
    rebuilt onto the base it was trained on."""
    lineage = open_run(cfg.model).lineage if cfg.model is not None else {"base_model": None, "stages": []}
    base_model, stages = lineage["base_model"], lineage["stages"]
    saved = dataclasses.asdict(cfg)
    for key in PATH_FIELDS:  # absolute: the run reads the same files from any working folder
        if saved.get(key) is not None and (key == "output" or os.path.exists(saved[key])):
            saved[key] = os.path.abspath(saved[key])
    if base_model is not None and os.path.exists(base_model):
        base_model = os.path.abspath(base_model)
    this = {k: saved[k] for k in ("output", "method", "task", "data", "max_steps", "lr", "preset")}
    this["base_fold"] = base_fold
    return {**saved, "lineage": {"base_model": base_model, "stages": [*stages, this]}}


# TrainConfig fields that name files or folders, recorded as absolute paths.
PATH_FIELDS = ("model", "output", "data", "eval_data", "mix_data", "keep_data")


def decide_fold(model: nn.Module, eval_set, tokenizer, cfg: TrainConfig) -> dict | None:
    """The fold of a finished Control run, decided once and recorded in final/run_config.json
    ("fold", `controlllm.runs`): each dlerp/dlerp_in layer's mean per-token weight at s = 1 on the
    run's eval data (the sequences evaluation used), else sigmoid(b); None for other models."""
    from ..runs import fold_record

    if not isinstance(model, ControlModel):
        return None
    calibration = None
    if eval_set is not None and any(b.interpolator.dynamic for b in model.control_blocks.values()):
        from .data import DataCollator

        collate = DataCollator.from_tokenizer(tokenizer)
        examples = [eval_set[i] for i in range(len(eval_set))]
        device = next(model.parameters()).device
        batches = []
        for start in range(0, len(examples), cfg.batch_size):
            batch = collate(examples[start:start + cfg.batch_size])
            batches.append({k: batch[k].to(device) for k in ("input_ids", "attention_mask")})
        model.measure_merge_weights(batches, source=cfg.eval_data)
        calibration = cfg.eval_data
    return fold_record(model, calibration)


def _write_final(trainer: ControlTrainer, tokenizer, cfg: TrainConfig, final_dir: str, metrics: dict,
                 full_state: dict | None = None, base_fold: dict | None = None, fold: dict | None = None,
                 base_metrics: dict | None = None) -> None:
    model = _unwrap(trainer.model)
    with Output(final_dir, overwrite=True, flag="final/").staging() as tmp:  # replaced, never missing
        if full_state is not None:
            model.save_pretrained(tmp, state_dict=full_state)
        else:
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {**run_record(cfg, base_fold), "final_metrics": metrics}
        if base_metrics:
            record["base_metrics"] = base_metrics
        if fold is not None:
            record["fold"] = fold
        write_text_atomic(os.path.join(tmp, RUN_CONFIG), json.dumps(record, indent=2))
        write_model_card(tmp, record, metrics)  # README.md: what this folder is, from what, with what result
