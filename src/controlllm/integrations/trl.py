"""TRL trainers for Control LLM models: SFT with the alignment loss, DPO against the base model.

    from controlllm.integrations.trl import ControlSFTTrainer, ControlDPOTrainer

    model = get_control_model(base, ControlConfig(num_expanded_layers=8))
    ControlSFTTrainer(model=model, args=SFTConfig(...), train_dataset=..., processing_class=tokenizer).train()
    ControlDPOTrainer(model=model, args=DPOConfig(...), train_dataset=..., processing_class=tokenizer).train()

What the subclasses change, and why (tested with TRL 1.16):
- TRL's trainers give the model a fused LM head (`model(..., fused_lm_head=True)` returns per-token
  log-probabilities) that runs `model.base_model` as the transformer backbone. A ControlModel's
  `base_model` is the whole causal LM, so the head is moved to that causal LM, as TRL does for PEFT
  models: `ControlModel.forward` runs on every call and its output carries `alignment_loss`.
- TRL computes the loss itself from those log-probabilities, so the alignment term of
  `ControlModel.forward` would be dropped: these trainers add `alignment_weight * alignment_loss`,
  normalised like the LM loss under gradient accumulation, and log `alignment_loss` and `w/{i}`.
- The DPO reference is the base model: `BaseModelReference` runs the same ControlModel under
  `disable_control()` and in eval mode (no dropout, whatever the policy's mode, which is restored
  after each call), so no second copy of the model is loaded or kept in memory
  (`precompute_ref_log_probs=True` works too).
- Checkpoints and `save_model` write the Control delta (`ControlModel.save_pretrained`, with the
  gathered state dict under FSDP), not a full state dict; each checkpoint is staged and renamed into
  place when complete, and resuming reads the delta back with validation: the same code as
  `controlllm train` (`controlllm.training.train.DeltaCheckpoints`).
- `load_best_model_at_end` reloads the best checkpoint's delta: the Trainer records the best checkpoint
  under the staging folder it was written in and looks for a full `model.safetensors`, so the path is
  set to the checkpoint's final place (in the trainer state and in the checkpoint's
  `trainer_state.json`, which a resumed run reads) and the delta is read back as on resume.
- Rotation (`save_total_limit`) keeps the newest checkpoints and, whatever its age, the best one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager

import torch
from torch import nn
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer import TRAINING_ARGS_NAME  # noqa: F401 (importable from here, as before)
from trl import DPOTrainer, SFTTrainer
from trl.trainer.utils import add_fused_lm_head

from ..budget import DriftBudgetCallback
from ..model import WEIGHTS_NAME, ControlModel
from ..training.train import DeltaCheckpoints


class BaseModelReference(nn.Module):
    """The base model of a ControlModel as a model of its own: each call runs the ControlModel under
    `disable_control()` and in eval mode, which computes exactly the base model's outputs in eval
    mode (deterministic: no dropout), with the same weights. The mode of every module of the
    ControlModel is restored after the call, so the policy keeps training as it was.

    Like a transformers model it exposes `base_model` (the backbone, here run with control disabled)
    and `get_output_embeddings()`, which TRL's fused LM head uses, and a `state_dict()` of the frozen
    weights, which TRL hashes to key its cache of reference log-probabilities.
    """

    def __init__(self, control_model: ControlModel):
        super().__init__()
        if not isinstance(control_model, ControlModel):
            raise TypeError(f"BaseModelReference needs a ControlModel, got {type(control_model).__name__}")
        # Not a submodule: moving the reference or switching it to eval mode must leave the policy alone.
        object.__setattr__(self, "control_model", control_model)
        self.config = control_model.config

    @contextmanager
    def _as_base(self):
        """The ControlModel as its base model in eval mode; each module's mode is put back afterwards.

        The reference is not a submodule of anything TRL switches to eval (nor is the policy a submodule
        of the reference), so its mode is set here, on every call."""
        control = self.control_model
        modes = [(module, module.training) for module in control.modules()]
        control.eval()
        try:
            with control.disable_control():
                yield control
        finally:
            for module, training in modes:
                module.training = training

    def forward(self, *args, **kwargs):
        with self._as_base() as control:
            return control(*args, **kwargs)

    @property
    def base_model(self):
        backbone = self.control_model.base_model.base_model  # transformers' name for the decoder stack without the head

        def run_backbone(*args, **kwargs):
            with self._as_base():
                return backbone(*args, **kwargs)

        return run_backbone

    def get_output_embeddings(self):
        return self.control_model.get_output_embeddings()

    def state_dict(self, *args, **kwargs):
        trained = self.control_model.trainable_state_dict()
        return {k: v for k, v in self.control_model.base_model.state_dict(*args, **kwargs).items() if k not in trained}


def _unwrap(model):
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


class ControlTrainerMixin(DeltaCheckpoints):
    """What a TRL trainer needs to train a ControlModel (see the module docstring); checkpoints are
    staged, saved and loaded as `controlllm train` does them (`controlllm.training.train.DeltaCheckpoints`)."""

    fused_outputs: tuple[str, ...] = ("log_probs",)

    def checkpoint_limit(self) -> None:
        """None: `DeltaCheckpoints` rotates nothing; `_save_checkpoint` rotates here, keeping the best."""
        return None

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)  # staged, then renamed into the run folder
        run_dir = self.args.output_dir
        step = self.state.best_global_step
        best = os.path.join(run_dir, f"checkpoint-{step}") if step else None
        if best is not None and os.path.isdir(best):
            self.state.best_model_checkpoint = best  # the Trainer recorded it under the staging folder
        if not self.args.should_save:
            return
        latest = os.path.join(run_dir, f"checkpoint-{self.state.global_step}")
        state_file = os.path.join(latest, TRAINER_STATE_NAME)
        if os.path.isfile(state_file):  # what a resumed run reads
            with open(state_file) as f:
                saved = json.load(f)
            if saved.get("best_model_checkpoint") != self.state.best_model_checkpoint:
                saved["best_model_checkpoint"] = self.state.best_model_checkpoint
                tmp = state_file + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(saved, f, indent=2, sort_keys=True)
                os.replace(tmp, state_file)
        self._rotate_keeping_best(run_dir)

    def _rotate_keeping_best(self, run_dir: str) -> None:
        """Delete all but the newest `args.save_total_limit` checkpoints, never the best one."""
        keep = self.args.save_total_limit
        if not keep:
            return
        found = sorted((int(m.group(1)), name) for name in os.listdir(run_dir)
                       if (m := re.fullmatch(r"checkpoint-(\d+)", name)) and os.path.isdir(os.path.join(run_dir, name)))
        best = self.state.best_model_checkpoint
        best = os.path.abspath(best) if best else None
        for _, name in found[:-keep]:
            path = os.path.join(run_dir, name)
            if os.path.abspath(path) != best:
                shutil.rmtree(path, ignore_errors=True)

    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        if isinstance(_unwrap(self.model), ControlModel) and best and os.path.isfile(os.path.join(best, WEIGHTS_NAME)):
            self._load_from_checkpoint(best)  # the delta, read and checked as on resume
            return
        super()._load_best_model()

    @property
    def control_model(self) -> ControlModel:
        model = _unwrap(self.model)
        if not isinstance(model, ControlModel):
            raise TypeError(f"{type(self).__name__} trains a ControlModel (get_control_model), got {type(model).__name__}")
        return model

    def _move_fused_head(self, wrapper: nn.Module) -> None:
        vars(_unwrap(wrapper)).pop("forward", None)  # TRL's fused head, which expects a backbone there
        inner = self.control_model.base_model
        vars(inner).pop("forward", None)  # a head from an earlier trainer on the same model
        add_fused_lm_head(inner, outputs=self.fused_outputs)

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        # The Trainer's own rule (Trainer.training_step): otherwise it divides the loss by the accumulation steps.
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)

    def _alignment_scale(self, inputs, num_items_in_batch):
        if not self._loss_is_scaled_for_ga(num_items_in_batch):
            return 1.0
        labels = inputs.get("labels")
        if num_items_in_batch is None or labels is None:
            return 1.0 / self.current_gradient_accumulation_steps
        # The LM loss is summed over this micro-batch's tokens and divided by those of the whole accumulated
        # batch (of every rank, then multiplied by the ranks): weight this micro-batch's mean by its share.
        share = (labels[..., 1:] != -100).sum() / torch.as_tensor(num_items_in_batch, device=labels.device)
        if self.args.average_tokens_across_devices:
            share = share * self.accelerator.num_processes
        return share

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        seen = []

        def keep_alignment(module, args, output):
            align = getattr(output, "alignment_loss", None)
            if align is not None:
                seen.append((align, getattr(output, "alignment_term", None)))

        handle = self.control_model.register_forward_hook(keep_alignment)
        try:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        finally:
            handle.remove()
        if not seen:
            return result
        align, term = seen[0]  # the first forward is the one the loss came from (later ones feed metrics)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["alignment_loss"].append(self.accelerator.gather_for_metrics(align.detach()).mean().item())
        if term is None or not self.model.training:
            return result  # evaluation reports the preference / LM loss alone
        loss, outputs = result if return_outputs else (result, None)
        # the fixed-weight term, or the drift budget's (multipliers from DriftBudgetCallback)
        term = term * self._alignment_scale(inputs, num_items_in_batch)
        loss = loss + term.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, start_time=None):
        if "loss" in logs:
            for i, w in self.control_model.interpolation_weights().items():
                logs[f"w/{i}"] = round(w, 4)
        super().log(logs, start_time)


class ControlSFTTrainer(ControlTrainerMixin, SFTTrainer):
    """TRL's SFTTrainer for a ControlModel: the loss it optimises includes the alignment term."""

    fused_outputs = ("log_probs", "entropy", "is_top1")  # what SFTTrainer's loss and metrics read

    def __init__(self, model: ControlModel, *args, **kwargs):
        if not isinstance(_unwrap(model), ControlModel):
            raise TypeError(f"ControlSFTTrainer trains a ControlModel (get_control_model), got {type(model).__name__}")
        super().__init__(model, *args, **kwargs)
        self._move_fused_head(self.model)
        self.add_callback(DriftBudgetCallback())  # running drifts and, under a budget, its multipliers


class ControlDPOTrainer(ControlTrainerMixin, DPOTrainer):
    """TRL's DPOTrainer for a ControlModel; the reference defaults to its base model (`BaseModelReference`),
    so no second copy is loaded. The alignment term is added to the preference loss."""

    def __init__(self, model: ControlModel, ref_model: nn.Module | None = None, *args, **kwargs):
        if not isinstance(_unwrap(model), ControlModel):
            raise TypeError(f"ControlDPOTrainer trains a ControlModel (get_control_model), got {type(model).__name__}")
        if ref_model is None:
            ref_model = BaseModelReference(_unwrap(model))
        super().__init__(model, ref_model, *args, **kwargs)
        self.add_callback(DriftBudgetCallback())  # running drifts and, under a budget, its multipliers
        # What DPOTrainer's loss and metrics read (its own choice, made in its __init__).
        self.fused_outputs = ("log_probs", "entropy", "mean_logits", "is_top1") + (
            ("log_sum_sq_probs",) if self.use_weighting else ())
        self._move_fused_head(self.model)


__all__ = ["BaseModelReference", "ControlDPOTrainer", "ControlSFTTrainer", "ControlTrainerMixin"]
