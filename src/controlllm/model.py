"""`ControlModel`: a transformers causal LM with Control blocks, and `get_control_model` to make one."""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .alignment import masked_mean
from .block import ControlBlock, StackBlock, _Block
from .config import ControlConfig, read_config_file
from .surgery import decoder_layers, hidden_size_of, install_blocks, remove_blocks

WEIGHTS_NAME = "control_model.safetensors"
BASE_SUBFOLDER = "base"


@dataclass
class ControlModelOutput(CausalLMOutputWithPast):
    """The base model's output plus the alignment loss.

    `loss` = LM loss + alignment_weight * alignment_loss when labels are given; `lm_loss` is the LM
    loss alone and `alignment_loss` the (unweighted) alignment loss, averaged over real tokens and
    expanded layers.
    """

    lm_loss: torch.FloatTensor | None = None
    alignment_loss: torch.FloatTensor | None = None


@functools.lru_cache(maxsize=None)
def _with_control_fields(output_class: type) -> type:
    """`output_class` with ControlModelOutput's extra fields declared (so they are items, not bare attributes)."""
    namespace = {"__module__": __name__, "__qualname__": f"Control{output_class.__name__}",
                 "__annotations__": {"lm_loss": "torch.FloatTensor | None", "alignment_loss": "torch.FloatTensor | None"},
                 "lm_loss": None, "alignment_loss": None}
    return dataclass(type(f"Control{output_class.__name__}", (output_class,), namespace))


def _control_output(out):
    """The base model's output with lm_loss and alignment_loss fields: a ControlModelOutput, or for another output
    type (TRL's fused LM head returns per-token log-probabilities) that type extended with the two fields, so they
    survive code that rebuilds an output from its items (accelerate's mixed-precision wrapper does)."""
    if isinstance(out, CausalLMOutputWithPast):
        return ControlModelOutput(**out)
    return _with_control_fields(type(out))(**out)


def _atomic_save_file(tensors: dict, path: str, metadata: dict | None = None) -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _frozen_fingerprint(blocks: dict[int, _Block]) -> str:
    """sha256 over the frozen weights of the expanded layers (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for index in sorted(blocks):
        for name, tensor in sorted(blocks[index].base_layer.state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            digest.update(f"{index}.{name}:{tuple(t.shape)}:{t.dtype}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _base_description(model: nn.Module) -> dict:
    config = model.config
    return {
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "num_hidden_layers": len(decoder_layers(model)),
        "hidden_size": hidden_size_of(model),
        "vocab_size": model.get_output_embeddings().weight.shape[0],
    }


class ControlModel(nn.Module):
    """A causal LM whose chosen decoder layers run a trainable copy beside the frozen original.

    Created with `get_control_model(base_model, config)`; behaves like the base model (forward,
    generate, attributes are forwarded), adds the alignment loss inside `forward`, and saves only
    what was trained.
    """

    def __init__(self, base_model: nn.Module, config: ControlConfig):
        super().__init__()
        if isinstance(base_model, ControlModel):
            raise ValueError("The model is already a ControlModel; wrap the original model once")
        self._requires_grad = {name: p.requires_grad for name, p in base_model.named_parameters()}
        self.base_model = base_model
        self.control_config = config
        self._blocks = install_blocks(base_model, config)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ------------------------------------------------------------------ views
    @property
    def blocks(self) -> dict[int, _Block]:
        """{layer index: Control block} of the expanded layers."""
        return dict(self._blocks)

    @property
    def control_blocks(self) -> dict[int, ControlBlock]:
        return {i: b for i, b in self._blocks.items() if isinstance(b, ControlBlock)}

    def interpolation_weights(self) -> dict[int, float]:
        """The current weight w of the trainable branch per expanded (concat) layer: sigmoid(f) for
        lerp/slerp; for dlerp/dlerp_in the mean over real tokens of the last forward when recorded,
        else sigmoid(b)."""
        weights = {}
        for i, block in self.control_blocks.items():
            last = block.last_weight
            if block.interpolator.dynamic and last is not None:
                weights[i] = float(last.float().mean())
            else:
                weights[i] = block.interpolator.nominal_weight()
        return weights

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters)."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ---------------------------------------------------------------- forward
    @contextmanager
    def disable_control(self):
        """Inside this context the model computes exactly the base model's outputs."""
        with ExitStack() as stack:
            for block in self._blocks.values():
                stack.enter_context(block.disabled())
            yield

    @contextmanager
    def _recording(self):
        blocks = list(self.control_blocks.values())
        for block in blocks:
            block.record, block.alignment, block.last_weight = True, None, None
        try:
            yield blocks
        finally:
            for block in blocks:
                block.record = False

    def forward(self, input_ids=None, attention_mask=None, labels=None, output_hidden_states=None,
                output_attentions=None, **kwargs) -> ControlModelOutput:
        """The base model's forward; `loss` includes alignment_weight * alignment loss.

        Accepts the base model's arguments. `output_hidden_states=True` returns the hidden states
        the decoder actually passes on (the merged ones at expanded layers).
        """
        if output_attentions:
            raise ValueError(
                "output_attentions is not supported by ControlModel: each expanded layer has two attention "
                "maps; run the base model under disable_control() to inspect attention"
            )
        num_items = kwargs.get("num_items_in_batch")
        return_dict = kwargs.pop("return_dict", True)
        with self._recording() as blocks, self._hidden_state_capture(output_hidden_states) as hidden:
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                  return_dict=True, **kwargs)
        result = _control_output(out)
        if hidden is not None:
            result.hidden_states = tuple(hidden)
        result.lm_loss = out.loss
        mask = None
        tokens = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if attention_mask is not None and attention_mask.dim() == 2 and tokens is not None:
            mask = attention_mask[:, -tokens.shape[1]:]  # with a cache, the mask also covers past tokens
        self._update_weight_statistics(blocks, mask)
        per_layer = [b.alignment for b in blocks if b.alignment is not None]
        for b in blocks:
            b.alignment = None  # the block keeps no graph alive between steps
        if per_layer:
            align = masked_mean(per_layer, mask)
            result.alignment_loss = align
            if out.loss is not None and self.control_config.alignment_weight:
                term = self.control_config.alignment_weight * align
                if num_items is not None and labels is not None:
                    # The Trainer sums micro-batch losses normalised by the tokens of the whole
                    # accumulated batch; weight this micro-batch's mean by its share of them.
                    share = (labels[..., 1:] != -100).sum().to(term.device) / torch.as_tensor(num_items).to(term.device)
                    term = term * share
                result.loss = out.loss + term.to(out.loss.dtype)
        return result if return_dict else result.to_tuple()

    def _update_weight_statistics(self, blocks: list[ControlBlock], mask: torch.Tensor | None) -> None:
        if self.training:
            return
        with torch.no_grad():
            for block in blocks:
                w = block.last_weight
                if w is None or not block.interpolator.dynamic:
                    continue
                w = w.squeeze(-1).double()
                if mask is not None and mask.shape == w.shape:
                    m = mask.to(w.dtype)
                    block.weight_sum += (w * m).sum()
                    block.weight_count += m.sum()
                else:
                    block.weight_sum += w.sum()
                    block.weight_count += w.numel()

    @contextmanager
    def _hidden_state_capture(self, wanted):
        if not wanted:
            yield None
            return
        layers = decoder_layers(self.base_model)
        captured: list[torch.Tensor] = []
        handles = [layers[0].register_forward_pre_hook(lambda m, args: captured.append(args[0]))]
        for layer in layers:
            handles.append(layer.register_forward_hook(
                lambda m, args, out: captured.append(out[0] if isinstance(out, tuple) else out)))
        norm = getattr(self.base_model.model, "norm", None)
        if isinstance(norm, nn.Module):
            handles.append(norm.register_forward_hook(lambda m, args, out: captured.__setitem__(-1, out)))
        try:
            yield captured
        finally:
            for h in handles:
                h.remove()

    def generate(self, *args, **kwargs):
        """Generate with the base model's `generate` (same arguments); the blocks take part."""
        return self.base_model.generate(*args, **kwargs)

    # ------------------------------------------------------------- save/load
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What training changes: the copies, the interpolators and their statistics, keyed by the
        names they have inside the base model."""
        state = {}
        for name, tensor in self.base_model.state_dict(keep_vars=False).items():
            if ".expanded_layer." in name or ".interpolator." in name or name.endswith((".weight_sum", ".weight_count")):
                state[name] = tensor.detach().contiguous()
        return state

    def save_pretrained(self, save_directory: str | os.PathLike, save_base: bool = False) -> None:
        """Write the trained delta (`control_model.safetensors`) and `control_config.json`.

        Files are written under temporary names and renamed, the config last. With `save_base=True`
        the frozen base model is saved too (in `base/`), so `ControlModel.from_pretrained(path)`
        loads it all in one call.
        """
        save_directory = os.fspath(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        if save_base:
            self.save_base_model(os.path.join(save_directory, BASE_SUBFOLDER))
        state = {k: v.to("cpu").clone() for k, v in self.trainable_state_dict().items()}
        _atomic_save_file(state, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})
        meta = _base_description(self.base_model)
        meta["frozen_sha256"] = _frozen_fingerprint(self._blocks)
        self.control_config.save_pretrained(save_directory, extra=meta)

    def save_base_model(self, directory: str | os.PathLike) -> None:
        """Save the original model (no blocks) with the base class's own `save_pretrained`."""
        removed = remove_blocks(self.base_model)
        try:
            self.base_model.save_pretrained(directory)
        finally:
            layers = decoder_layers(self.base_model)
            for i, block in removed.items():
                layers[i] = block

    @classmethod
    def from_pretrained(cls, base_model: nn.Module | str | os.PathLike, model_id: str | os.PathLike | None = None,
                        check_base_weights: bool = True, **base_kwargs) -> "ControlModel":
        """Load a saved delta onto `base_model` (a model or a model folder).

        `ControlModel.from_pretrained(path)` alone loads a checkpoint saved with `save_base=True`.
        Fails with a clear error when the delta was trained on a different base: another
        architecture or shape, or other frozen weights in the expanded layers
        (`check_base_weights=False` skips the latter).
        """
        if model_id is None:
            model_id = base_model
            base_model = os.path.join(os.fspath(model_id), BASE_SUBFOLDER)
            if not os.path.isdir(base_model):
                raise FileNotFoundError(
                    f"{str(model_id)!r} holds no base model ({BASE_SUBFOLDER}/); pass the base model as well: "
                    "ControlModel.from_pretrained(base_model, path)"
                )
        if isinstance(base_model, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM

            base_model = AutoModelForCausalLM.from_pretrained(base_model, **base_kwargs)
        saved = read_config_file(model_id)
        config = ControlConfig.from_dict(saved["control_config"])
        expected = saved.get("base_model", {})
        actual = _base_description(base_model)
        for key, value in actual.items():
            if key in expected and expected[key] != value:
                raise ValueError(
                    f"The Control delta in {str(model_id)!r} was trained on a base model with {key}={expected[key]!r}, "
                    f"but the given base model has {key}={value!r}"
                )
        model = cls(base_model, config)
        if check_base_weights and "frozen_sha256" in expected:
            found = _frozen_fingerprint(model._blocks)
            if found != expected["frozen_sha256"]:
                layers = sorted(model._blocks)
                model.unload()
                raise ValueError(
                    f"The frozen weights of the expanded layers {layers} differ from those the Control "
                    f"delta in {str(model_id)!r} was trained on (sha256 {found[:12]} != {expected['frozen_sha256'][:12]}); "
                    "load it onto the same base model, or pass check_base_weights=False"
                )
        model.load_trainable_state(load_file(os.path.join(os.fspath(model_id), WEIGHTS_NAME)), source=model_id)
        return model

    def load_trainable_state(self, state: dict[str, torch.Tensor], source="state dict") -> None:
        """Copy a trained delta into the blocks, checking names and shapes."""
        own = self.trainable_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"The Control delta from {str(source)!r} does not match this model: missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        params = dict(self.base_model.named_parameters())
        params.update(dict(self.base_model.named_buffers()))
        with torch.no_grad():
            for name, value in state.items():
                target = params[name]
                if target.shape != value.shape:
                    raise ValueError(
                        f"The Control delta from {str(source)!r} has {name} of shape {tuple(value.shape)}, "
                        f"the model expects {tuple(target.shape)}"
                    )
                target.copy_(value.to(device=target.device, dtype=target.dtype))

    # ------------------------------------------------------------- unwrap
    def _restore_requires_grad(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, True))

    def unload(self) -> nn.Module:
        """Remove the blocks without merging; returns the original base model."""
        remove_blocks(self.base_model)
        self._blocks = {}
        self._restore_requires_grad(self.base_model)
        return self.base_model

    def merge_and_unload(self) -> nn.Module:
        """Fold every trained copy into its frozen layer and return a plain model of the base class.

        concat: W = W_p + w (W_e - W_p) per tensor, with w = `merge_weight()` of the block (for dlerp
        and dlerp_in: the mean weight measured in evaluation mode, else sigmoid(b); slerp merges
        linearly with its w). Exact for an untrained model, an approximation after training:
        measure it with `controlllm.merge.merge_fidelity`. stack: the copies become ordinary layers
        inserted after their originals (the merged model is deeper than the base).
        """
        from .merge import merge_blocks

        merged = merge_blocks(self.base_model, self._blocks)
        self._blocks = {}
        self._restore_requires_grad(merged)
        return merged


def get_control_model(base_model: nn.Module, config: ControlConfig) -> ControlModel:
    """Wrap a transformers causal LM (modified in place) as a Control LLM model.

    At initialisation the returned model computes exactly the base model's outputs; only the
    copies (and trainable interpolators) require gradients.
    """
    if not isinstance(config, ControlConfig):
        raise TypeError(f"config must be a ControlConfig, got {type(config).__name__}")
    return ControlModel(base_model, config)


__all__ = ["ControlModel", "ControlModelOutput", "get_control_model", "StackBlock", "ControlBlock"]
