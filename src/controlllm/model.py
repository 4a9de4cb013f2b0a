"""`ControlModel`: a transformers causal LM with Control blocks, and `get_control_model` to make one."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import tempfile
import warnings
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .alignment import masked_layer_means
from .block import ControlBlock, StackBlock, _Block
from .config import ControlConfig, read_config_file
from .errors import CheckpointError
from .quantize import QuantizationError
from .surgery import decoder_layers, hidden_size_of, install_blocks, remove_blocks

WEIGHTS_NAME = "control_model.safetensors"
# Training forwards in which a fixed alignment term that dwarfs the LM loss is warned about.
ALIGNMENT_CHECKS = 20
# Buffers of the blocks saved with the delta (the drift budget's state); a delta saved by an earlier
# release lacks them, and loads with them at zero.
STATE_BUFFERS = (".budget_multiplier", ".running_drift")
BASE_SUBFOLDER = "base"
LEGACY_STATISTICS = (".weight_sum", ".weight_count")


@dataclass
class ControlModelOutput(CausalLMOutputWithPast):
    """The base model's output plus the alignment loss.

    `loss` = LM loss + `alignment_term` when labels are given; `lm_loss` is the LM loss alone,
    `alignment_loss` the (unweighted) alignment loss, averaged over expanded layers and over the
    positions the LM loss is computed on (with labels; the real tokens without), so that under
    gradient accumulation both terms are normalised by the same token count. `alignment_term` is
    what the alignment adds to this micro-batch's mean loss: alignment_weight * alignment_loss, or
    under a drift budget mean_l(multiplier_l * alignment_l) / budget (None when nothing is added).
    """

    lm_loss: torch.FloatTensor | None = None
    alignment_loss: torch.FloatTensor | None = None
    alignment_term: torch.FloatTensor | None = None


CONTROL_FIELDS = ("lm_loss", "alignment_loss", "alignment_term")


@functools.lru_cache(maxsize=None)
def _with_control_fields(output_class: type) -> type:
    """`output_class` with ControlModelOutput's extra fields declared (so they are items, not bare attributes)."""
    namespace = {"__module__": __name__, "__qualname__": f"Control{output_class.__name__}",
                 "__annotations__": {name: "torch.FloatTensor | None" for name in CONTROL_FIELDS},
                 **{name: None for name in CONTROL_FIELDS}}
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


def read_delta(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of `directory/control_model.safetensors`, with a clear error when the file is
    missing, unreadable, truncated or not safetensors."""
    from safetensors import SafetensorError

    path = os.path.join(os.fspath(directory), WEIGHTS_NAME)
    try:
        return load_file(path)
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"cannot read the Control delta {path}: {err} (the file is missing, "
                              "unreadable, truncated or corrupt)") from err


def is_trainable_key(name: str) -> bool:
    """Whether a base-model state-dict key belongs to what Control training changes (copies,
    interpolators and the drift budget's state)."""
    return ".expanded_layer." in name or ".interpolator." in name or name.endswith(STATE_BUFFERS)


# Metadata keys of the base model's fingerprint: the whole frozen model, and per part (decoder layer i,
# or "rest": embeddings, final norm, head). Deltas of earlier releases hold LEGACY_FINGERPRINT_KEY
# instead (the expanded layers only) and are checked with that rule.
FINGERPRINT_KEY = "frozen_model_sha256"
FINGERPRINT_PARTS_KEY = "frozen_parts_sha256"
LEGACY_FINGERPRINT_KEY = "frozen_sha256"
OTHER_PART = "rest"


def _hash_tensor(digest, name: str, tensor: torch.Tensor) -> None:
    # A quantised layer's state holds its packed weights and quantisation state (scales, codebooks,
    # a serialised header), some of them 0-dimensional: all are hashed as plain bytes.
    t = torch.Tensor(tensor.detach()).to("cpu").contiguous()
    digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy())


# Per base model, the digests of its parts with what they were computed from (see
# `_frozen_parts_fingerprint`): a training run saves a delta at every checkpoint, and hashing an 8B base
# takes about 12 s each time, though its frozen weights do not change.
_FINGERPRINT_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _tensor_stamp(tensor: torch.Tensor) -> tuple:
    """What identifies a tensor's current contents without reading them: the object (a weak reference,
    alive: a new tensor is never mistaken for a freed one at the same address), its storage address,
    layout and in-place version counter (bumped by every in-place change: optimizer steps,
    `load_state_dict`, `copy_` or `add_` under no_grad; not by writes through `.data`, which hide from
    autograd too)."""
    return (weakref.ref(tensor), tensor.data_ptr(), tensor._version, tuple(tensor.shape), tensor.stride(),
            tensor.storage_offset(), tensor.dtype, tensor.device)


def _stamp_matches(stamp: tuple, tensor: torch.Tensor) -> bool:
    return stamp[0]() is tensor and stamp[1:] == _tensor_stamp(tensor)[1:]


def _frozen_parts_fingerprint(base_model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, str]:
    """{part: sha256} over every frozen tensor of the base model (names as in the model without blocks,
    shapes, dtypes and bytes): one part per decoder layer ("3": layer 3) and "rest" (embeddings, final
    norm, head). What training changes (copies, interpolators, budget state) is left out. `state` is
    the whole state keyed as in the base model, for a sharded model whose own tensors are shards.

    Without `state`, a part's digest is computed once and reused while every tensor of the part is
    the same object with the same storage, layout and version counter (`_tensor_stamp`), so the
    checkpoints of a run hash the base once; a base changed in place or reloaded is hashed again."""
    own = state is None
    state = base_model.state_dict(keep_vars=True) if own else state
    names = {id(module): name for name, module in base_model.named_modules()}
    prefixes = [(names[id(layer)] + ".", str(i)) for i, layer in enumerate(decoder_layers(base_model))]
    grouped: dict[str, list[tuple[str, torch.Tensor]]] = {part: [] for _, part in prefixes}
    grouped[OTHER_PART] = []
    for key in sorted(state):
        if is_trainable_key(key):
            continue
        name = key.replace(".base_layer.", ".")  # the frozen layer inside a block is the original layer
        part = next((p for prefix, p in prefixes if name.startswith(prefix)), OTHER_PART)
        grouped[part].append((name, state[key]))
    cache = _FINGERPRINT_CACHE.setdefault(base_model, {}) if own else {}
    parts = {}
    for part, tensors in grouped.items():
        cached = cache.get(part)
        if cached is not None and [n for n, _ in tensors] == cached[0] and all(
                _stamp_matches(stamp, t) for stamp, (_, t) in zip(cached[1], tensors)):
            parts[part] = cached[2]
            continue
        digest = hashlib.sha256()
        for name, tensor in tensors:
            _hash_tensor(digest, name, tensor)
        parts[part] = digest.hexdigest()
        if own:
            try:
                cache[part] = ([n for n, _ in tensors], [_tensor_stamp(t) for _, t in tensors], parts[part])
            except (TypeError, RuntimeError):  # a tensor without storage or weak references: hash every time
                cache.pop(part, None)
    return parts


def _whole_fingerprint(parts: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{part}:{parts[part]};" for part in sorted(parts)).encode()).hexdigest()


def _legacy_frozen_fingerprint(blocks: dict[int, _Block]) -> str:
    """The rule of earlier releases: sha256 over the frozen weights of the expanded layers only."""
    digest = hashlib.sha256()
    for index in sorted(blocks):
        for name, tensor in sorted(blocks[index].base_layer.state_dict().items()):
            # A quantised layer's state holds its packed weights and quantisation state (scales,
            # codebooks, a serialised header), some of them 0-dimensional: all are hashed as bytes.
            t = torch.Tensor(tensor.detach()).to("cpu").contiguous()
            digest.update(f"{index}.{name}:{tuple(t.shape)}:{t.dtype}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _describe_parts(parts: list[str]) -> str:
    layers = sorted(int(p) for p in parts if p != OTHER_PART)
    words = [f"decoder layers {layers}"] if layers else []
    if OTHER_PART in parts:
        words.append("the embeddings, final norm or head")
    return " and ".join(words)


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

    With `config.quantize_base` ('4bit' / '8bit') the base model's decoder layers are quantised in
    place first (`controlllm.quantize`; a base already quantised to that kind is kept as it is) and
    each copy is built from the dequantised weights: the model starts equal to the quantised base.
    """

    _weight_totals: dict | None = None  # {layer: [sum, count]} while measure_merge_weights runs

    def __init__(self, base_model: nn.Module, config: ControlConfig):
        super().__init__()
        if isinstance(base_model, ControlModel):
            raise ValueError("The model is already a ControlModel; wrap the original model once")
        _prepare_quantization(base_model, config)
        self._requires_grad = {name: p.requires_grad for name, p in base_model.named_parameters()}
        self.base_model = base_model
        self.control_config = config
        self._blocks = install_blocks(base_model, config)
        self._alignment_checks_left = ALIGNMENT_CHECKS

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

    @property
    def dial(self) -> float:
        """The retention dial s in [0, 1] (`ControlConfig.dial`): 1 = the trained model, 0 = the base."""
        return self.control_config.dial

    def set_dial(self, value: float) -> "ControlModel":
        """Use s = `value` of what training added, in every expanded layer (in place; returns self).

        Concat layers use s * w (per-token gates scaled per token); stack layers add s times their
        copy's contribution. s = 0 computes the base model and s = 1 the trained model, both bit
        for bit, and any value can be set again later (nothing is lost: the copies are untouched).
        The value is stored in `control_config.dial`, so `save_pretrained` writes it and a reload
        is dialled the same; `merge_and_unload` folds at s * w (w measured at s = 1 for dynamic
        interpolators, `measure_merge_weights`, kept across dial changes).
        """
        config = dataclasses.replace(self.control_config, dial=value)  # validates: a finite number in [0, 1]
        self.control_config = config
        for block in self._blocks.values():
            if block.dial != config.dial and isinstance(block, ControlBlock):
                block.fold_weight = None  # an absolute weight recorded for another dial
            block.dial = config.dial
        return self

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
        scored = [b for b in blocks if b.alignment is not None]
        align_mask = self._alignment_mask(labels, mask)
        layer_align = masked_layer_means([b.alignment for b in scored], align_mask) if scored else None
        if blocks and self.training and torch.is_grad_enabled():
            self._observe(blocks, scored, layer_align, align_mask)
        if scored:
            result.alignment_loss = layer_align.mean()
            term = self._alignment_term(scored, layer_align)
            result.alignment_term = term
            if out.loss is not None and term is not None:
                if num_items is not None and labels is not None:
                    # The Trainer sums micro-batch losses normalised by the label tokens of the whole
                    # accumulated batch; the alignment is averaged over the same positions, so this
                    # micro-batch's share of them makes the sum the whole batch's alignment.
                    share = align_mask.sum().to(term.device) / torch.as_tensor(num_items).to(term.device)
                    term = term * share
                self._warn_if_alignment_dominates(out.loss, term)
                result.loss = out.loss + term.to(out.loss.dtype)
        for b in blocks:
            b.alignment = b.drift = None  # the blocks keep no graph alive between steps
        return result if return_dict else result.to_tuple()

    def _alignment_term(self, scored: list[ControlBlock], layer_align: torch.Tensor) -> torch.Tensor | None:
        """What the alignment adds to the loss: alignment_weight x the layer mean, or, under a drift
        budget, the mean over layers of multiplier_l x alignment_l / budget."""
        config = self.control_config
        if config.alignment_budget is None:
            return config.alignment_weight * layer_align.mean() if config.alignment_weight else None
        multipliers = torch.stack([b.budget_multiplier for b in scored]).to(layer_align.device, layer_align.dtype)
        return (multipliers * layer_align).mean() / config.alignment_budget

    def _observe(self, blocks, scored, layer_align, mask) -> None:
        """Hand each block this training micro-batch's layer means (for the budget and the logs)."""
        with torch.no_grad():
            drift_blocks = [b for b in blocks if b.drift is not None]
            if not drift_blocks:  # e.g. under disable_control()
                return
            layer_drift = masked_layer_means([b.drift for b in drift_blocks], mask)
            tokens = (mask.sum() if mask is not None else torch.tensor(float(drift_blocks[0].drift.numel()))).float()
            align_of = {id(b): layer_align[j].detach() for j, b in enumerate(scored)} if scored else {}
            for j, b in enumerate(drift_blocks):
                w = b.last_weight.float()
                if w.dim() > 0 and mask is not None and w.shape[:-1] == mask.shape:
                    m = mask.to(w.dtype).unsqueeze(-1)
                    n = m.sum().clamp_min(1.0)
                    w_mean = (w * m).sum() / n
                    w_std = (((w - w_mean) ** 2) * m).sum().div(n).sqrt()
                else:
                    w_mean, w_std = w.mean(), (w.std(correction=0) if w.numel() > 1 else torch.zeros((), device=w.device))
                b.observe(align_of.get(id(b)), layer_drift[j], tokens.to(layer_drift.device), w_mean, w_std)

    def _warn_if_alignment_dominates(self, lm_loss: torch.Tensor, term: torch.Tensor) -> None:
        """Once, within the first training steps: a fixed-weight alignment term 10x the LM loss stops learning.

        (At step 0 the term is exactly zero, so the first ALIGNMENT_CHECKS training forwards are checked.)"""
        if not self.training or self._alignment_checks_left <= 0 or self.control_config.alignment_budget is not None:
            return
        self._alignment_checks_left -= 1
        ratio = float(term.detach()) / max(float(lm_loss.detach()), 1e-12)
        if ratio > 10:
            self._alignment_checks_left = 0
            warnings.warn(
                f"The alignment term ({float(term.detach()):.4g}, alignment_loss={self.control_config.alignment_loss!r} "
                f"x weight {self.control_config.alignment_weight}) is {ratio:.0f}x the LM loss "
                f"({float(lm_loss.detach()):.4g}): the copies will learn little or nothing. "
                + ("Give an alignment_budget (e.g. 0.01) instead of the fixed weight, or a smaller alignment_weight."
                   if self.control_config.alignment_loss in ("nmse", "cosine") else
                   "Use the scale-free alignment_loss='nmse' with an alignment_budget (e.g. 0.01), or a smaller "
                   "alignment_weight."),
                stacklevel=2,
            )

    def layer_statistics(self, reset: bool = True, reduce=None) -> dict[str, float]:
        """Per expanded layer i, averaged over the training micro-batches since the last call:
        `w/{i}` (mean interpolation weight), `w_std/{i}` (its spread over tokens), `drift/{i}`
        (the drift between the branches that a budget constrains, in the budget's unit: the alignment
        loss for 'nmse' and 'cosine', the nmse for 'mse' and 'none'), and `multiplier/{i}` under a
        drift budget (its current value).

        `reduce` sums a float64 tensor over the processes of a distributed run (e.g.
        `lambda t: accelerator.reduce(t, "sum")`), so the averages cover every rank's micro-batches;
        every rank must call it."""
        blocks = sorted(self.control_blocks.items())
        sums = torch.tensor([[float(b.window[k]) for k in ("n", "w", "w_std", "drift")] for _, b in blocks],
                            dtype=torch.float64).reshape(len(blocks), 4)
        if reduce is not None:
            device = next((p.device for p in self.parameters()), torch.device("cpu"))
            sums = reduce(sums.to(device)).cpu()
        stats = {}
        for (i, b), (n, w, w_std, drift) in zip(blocks, sums.tolist()):
            if n:
                stats[f"w/{i}"] = w / n
                stats[f"w_std/{i}"] = w_std / n
                stats[f"drift/{i}"] = drift / n
            if self.control_config.alignment_budget is not None:
                stats[f"multiplier/{i}"] = float(b.budget_multiplier)
            if reset:
                b.reset_observations(step=False, window=True)
        return stats

    @staticmethod
    def _alignment_mask(labels: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The positions the alignment loss is averaged over. With labels: the real tokens the LM
        loss is computed on (whose next token has a label), the count the Trainer normalises by
        under gradient accumulation; without labels: the real tokens."""
        if labels is None or labels.dim() != 2:
            return mask
        predicts = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
        predicts[:, :-1] = labels[:, 1:] != -100
        if mask is not None and mask.shape == predicts.shape:
            predicts &= mask.bool()
        return predicts

    def _update_weight_statistics(self, blocks: list[ControlBlock], mask: torch.Tensor | None) -> None:
        # Only while `measure_merge_weights` runs: any other forward leaves the model as it was.
        totals = self._weight_totals
        if totals is None:
            return
        with torch.no_grad():
            for block in blocks:
                w = block.last_weight
                if w is None or not block.interpolator.dynamic:
                    continue
                w = w.squeeze(-1).double()
                if mask is not None and mask.shape == w.shape:
                    m = mask.bool()
                    total, count = float(w[m].sum()), int(m.sum())
                else:
                    total, count = float(w.sum()), w.numel()
                entry = totals.setdefault(block.layer_index, [0.0, 0])
                entry[0] += total
                entry[1] += count

    @torch.no_grad()
    def measure_merge_weights(self, batches, source: str = "the given batches") -> dict[int, float]:
        """Measure the weight each dynamic interpolator (dlerp, dlerp_in) is folded with by `merge_and_unload`.

        Runs `batches` (mappings with `input_ids` and optionally `attention_mask`) through the model
        in evaluation mode and takes, per layer, the mean per-token weight over the real tokens of
        all of them (sums in float64, counts as integers), at s = 1 whatever the model's dial (a fold
        at dial s uses s times it). The statistics start with this call and
        end with it: a new call replaces the previous result, and no other forward measures
        anything. `source` describes the data in the merged model's metadata. Returns {layer: w}.
        """
        dynamic = {i: b for i, b in self.control_blocks.items() if b.interpolator.dynamic}
        if not dynamic:
            return {}
        was_training = self.training
        self.eval()
        self._weight_totals = {}
        dials = {i: b.dial for i, b in self._blocks.items()}
        try:
            for block in self._blocks.values():
                block.dial = 1.0
            for batch in batches:
                self(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
            totals = self._weight_totals
        finally:
            for i, b in self._blocks.items():
                b.dial = dials[i]
            self._weight_totals = None
            self.train(was_training)
        counts = {i: totals.get(i, [0.0, 0])[1] for i in dynamic}
        if not all(counts.values()):
            raise ValueError(f"measure_merge_weights got no tokens from {source}; pass at least one non-empty batch")
        for i, block in dynamic.items():
            block.measured_weight = totals[i][0] / counts[i]
            block.measured_on = f"{source} ({counts[i]} tokens)"
            block.fold_weight = None
        return {i: block.measured_weight for i, block in dynamic.items()}

    def merge_weights(self) -> dict[int, dict]:
        """{layer: {"interpolation", "weight", "source"}}: the w `merge_and_unload` folds each concat
        layer with, and where it comes from."""
        return {i: {"interpolation": self.control_config.interpolation, "weight": b.merge_weight(),
                    "source": b.merge_weight_source()} for i, b in sorted(self.control_blocks.items())}

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
        """What training changes: the copies, the interpolators and the drift budget's state, keyed by
        the names they have inside the base model."""
        return {name: tensor.detach().contiguous() for name, tensor in self.base_model.state_dict(keep_vars=False).items()
                if is_trainable_key(name)}

    def save_pretrained(self, save_directory: str | os.PathLike, save_base: bool = False,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the trained delta (`control_model.safetensors`) and `control_config.json`.

        Files are written under temporary names and renamed, the config last. With `save_base=True`
        the frozen base model is saved too (in `base/`), so `ControlModel.from_pretrained(path)`
        loads it all in one call. `state_dict` is the model's whole state, keyed as in the base
        model (a leading `base_model.` is dropped), for a sharded model (FSDP) whose own tensors
        are only this rank's shards: gather it on every rank first, e.g. with
        `torch.distributed.checkpoint.state_dict.get_model_state_dict(full_state_dict=True)`.
        """
        save_directory = os.fspath(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        if save_base:
            self.save_base_model(os.path.join(save_directory, BASE_SUBFOLDER))
        full = None
        if state_dict is None:
            state = {k: v.to("cpu").clone() for k, v in self.trainable_state_dict().items()}
        else:
            full = {k.removeprefix("base_model."): v for k, v in state_dict.items()}
            state = {k: v.detach().to("cpu").contiguous().clone() for k, v in full.items() if is_trainable_key(k)}
        _atomic_save_file(state, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})
        meta = _base_description(self.base_model)
        # The whole frozen model, not only the expanded layers: a later stage's delta must refuse a base
        # without the earlier stages folded in, whichever layers they changed.
        parts = _frozen_parts_fingerprint(self.base_model, full)
        meta[FINGERPRINT_KEY], meta[FINGERPRINT_PARTS_KEY] = _whole_fingerprint(parts), parts
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
        Fails with a clear error (`CheckpointError`) when the delta was trained on a different base:
        another architecture or shape, or other frozen weights anywhere in the model (for a later
        stage of a multi-stage run: a base without the earlier stages folded in);
        `check_base_weights=False` skips the latter. Deltas saved by earlier releases fingerprint the
        expanded layers only, and are checked on those.
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
        try:
            saved = read_config_file(model_id)
            config = ControlConfig.from_dict(saved["control_config"])
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as err:  # unreadable or edited by hand
            raise CheckpointError(f"cannot read the Control config in {str(model_id)!r}: {err}") from err
        expected = saved.get("base_model", {})
        actual = _base_description(base_model)
        for key, value in actual.items():
            if key in expected and expected[key] != value:
                raise CheckpointError(
                    f"The Control delta in {str(model_id)!r} was trained on a base model with {key}={expected[key]!r}, "
                    f"but the given base model has {key}={value!r}"
                )
        model = cls(base_model, config)
        if check_base_weights and FINGERPRINT_KEY in expected:
            parts = _frozen_parts_fingerprint(model.base_model)
            found = _whole_fingerprint(parts)
            if found != expected[FINGERPRINT_KEY]:
                saved_parts = expected.get(FINGERPRINT_PARTS_KEY) or {}
                differ = [p for p in parts if saved_parts.get(p) != parts[p]] or list(parts)
                model.unload()
                raise CheckpointError(
                    f"The frozen weights of the base model differ from those the Control delta in {str(model_id)!r} "
                    f"was trained on, in {_describe_parts(differ)} (sha256 {found[:12]} != "
                    f"{expected[FINGERPRINT_KEY][:12]}); load it onto the base it was trained on (for a later stage of "
                    "a multi-stage run: the earlier stages folded in, as loading the run folder does), or pass "
                    "check_base_weights=False"
                )
        elif check_base_weights and LEGACY_FINGERPRINT_KEY in expected:
            found = _legacy_frozen_fingerprint(model._blocks)
            if found != expected[LEGACY_FINGERPRINT_KEY]:
                layers = sorted(model._blocks)
                model.unload()
                raise CheckpointError(
                    f"The frozen weights of the expanded layers {layers} differ from those the Control "
                    f"delta in {str(model_id)!r} was trained on (sha256 {found[:12]} != "
                    f"{expected[LEGACY_FINGERPRINT_KEY][:12]}); load it onto the same base model, or pass "
                    "check_base_weights=False"
                )
        model.load_trainable_state(read_delta(model_id), source=model_id)
        return model

    def load_trainable_state(self, state: dict[str, torch.Tensor], source="state dict") -> None:
        """Copy a trained delta into the blocks, checking names and shapes. The drift budget's buffers
        that a delta of an earlier release lacks are set to zero, as in a new model."""
        # Deltas saved before merge weights were measured on request hold running gate statistics
        # of every evaluation pass; they define no weight, so they are dropped.
        state = {k: v for k, v in state.items() if not k.endswith(LEGACY_STATISTICS)}
        own = self.trainable_state_dict()
        missing = sorted(k for k in set(own) - set(state) if not k.endswith(STATE_BUFFERS))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise CheckpointError(
                f"The Control delta from {str(source)!r} does not match this model: missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        params = dict(self.base_model.named_parameters())
        params.update(dict(self.base_model.named_buffers()))
        with torch.no_grad():
            for name in set(own) - set(state):  # a delta saved before the drift budget: its state starts at zero
                params[name].zero_()
            for name, value in state.items():
                target = params[name]
                if target.shape != value.shape:
                    raise CheckpointError(
                        f"The Control delta from {str(source)!r} has {name} of shape {tuple(value.shape)}, "
                        f"the model expects {tuple(target.shape)}"
                    )
                target.copy_(value.to(device=target.device, dtype=target.dtype))

    # ------------------------------------------------------------- unwrap
    def _restore_requires_grad(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, True))

    def unload(self) -> nn.Module:
        """Remove the blocks without merging; returns the original base model (still quantised
        when `quantize_base` quantised it)."""
        remove_blocks(self.base_model)
        self._blocks = {}
        self._restore_requires_grad(self.base_model)
        return self.base_model

    @property
    def quantization(self) -> str | None:
        """'4bit' / '8bit' when the frozen branch is quantised (`ControlConfig.quantize_base`), else None."""
        return self.control_config.quantize_base

    def dequantize(self) -> "ControlModel":
        """Replace every quantised layer of the frozen branch by a full-precision `nn.Linear` holding
        its dequantised weight (in place; returns self). Exact: the copies were built from, and
        trained against, these very weights. A no-op on a full-precision base."""
        if self.quantization is None:
            return self
        from .quantize import dequantize_model

        dequantize_model(self.base_model)
        self.control_config = dataclasses.replace(self.control_config, quantize_base=None)
        return self

    def merge_and_unload(self, dequantize: bool = False) -> nn.Module:
        """Fold every trained copy into its frozen layer and return a plain model of the base class.

        On a quantised base this is refused unless `dequantize=True`: then every quantised layer
        (frozen or not) is first replaced by a full-precision `nn.Linear` holding its dequantised
        weight, so the merged model is a plain full-precision model of the weights that were
        trained against (exactly the quantised base at dial 0 or before training), not a
        re-quantised one.

        concat: W = W_p + w (W_e - W_p) per tensor, with w from `merge_weights()` (for dlerp and
        dlerp_in: the mean weight measured by `measure_merge_weights`, else sigmoid(b); slerp merges
        linearly with its w). Exact for an untrained model, an approximation after training:
        measure it with `controlllm.merge.merge_fidelity`. stack: the copies become ordinary layers
        inserted after their originals (the merged model is deeper than the base).
        """
        from .merge import merge_blocks

        if self.quantization is not None:
            if not dequantize:
                raise QuantizationError(
                    f"the frozen branch of this model is quantised ({self.quantization}): folding the copies into "
                    "quantised weights would re-quantise what was trained. Merge with dequantize=True (controlllm merge "
                    "--dequantize): a full-precision model of the dequantised base with the copies folded in"
                )
            self.dequantize()
        merged = merge_blocks(self.base_model, self._blocks)
        self._blocks = {}
        self._restore_requires_grad(merged)
        return merged


def _prepare_quantization(base_model: nn.Module, config: ControlConfig) -> None:
    """Quantise `base_model` as `config.quantize_base` asks (in place), or reject a base whose
    quantisation the config does not declare (a delta saved from it would not say how to rebuild it)."""
    from .quantize import quantization_of, quantize_model

    present = quantization_of(base_model)
    if config.quantize_base is None:
        if present is not None:
            raise QuantizationError(
                f"the base model is quantised ({present}) but ControlConfig.quantize_base is None; pass "
                f"ControlConfig(quantize_base={present!r}) so the saved delta records it"
            )
        return
    quantize_model(base_model, config.quantize_base)


def get_control_model(base_model: nn.Module, config: ControlConfig) -> ControlModel:
    """Wrap a transformers causal LM (modified in place) as a Control LLM model.

    At initialisation the returned model computes exactly the base model's outputs (with
    `config.quantize_base`: the quantised base model's, see `ControlModel`); only the copies (and
    trainable interpolators) require gradients.
    """
    if not isinstance(config, ControlConfig):
        raise TypeError(f"config must be a ControlConfig, got {type(config).__name__}")
    return ControlModel(base_model, config)


__all__ = ["ControlModel", "ControlModelOutput", "get_control_model", "StackBlock", "ControlBlock"]
