"""A quantised frozen branch: the base model's decoder layers kept in bitsandbytes 4-bit or 8-bit.

`quantize_model(model, "4bit" | "8bit")` replaces, in place, every `nn.Linear` inside the decoder
layers by a bitsandbytes layer: `Linear4bit` (nf4, blocks of 64, double-quantised scales) or
`QuantizedLinear8bit` (a `Linear8bitLt` holding int8 weights with one scale per output row). The
embeddings, the final norm, the layer norms and the LM head stay as they are, in full precision,
as QLoRA leaves them (transformers' bitsandbytes integration skips the LM head too): an error there
lands directly on every logit, and a tied LM head is the embedding matrix itself.

Both layers compute `F.linear(x, dequantised W, b)` in the input's dtype, in training and in
evaluation alike, on every device: the quantised model is one function, and a trainable copy built
from the dequantised weights (`dequantized_copy`) computes exactly what the frozen layer computes.
So a Control model on a quantised base equals the QUANTISED base at initialisation, bit for bit,
not the full-precision model it was quantised from. (bitsandbytes' own 8-bit layer multiplies int8
activations in evaluation, and its 4-bit layer switches CPUs with AVX512-BF16 to a repacked kernel
in evaluation; both are turned off here so the frozen branch does not change with the mode.)

bitsandbytes is imported here only when a model is quantised: `require_bitsandbytes` says clearly
when it cannot be. peft imports it at its own import time whenever it is installed, though, so every
command that touches peft loads it; on CPUs with AVX512-BF16 its import then logs "Failed to load CPU
gemm_4bit_forward from kernels-community ..." (an optional fused kernel from the Hub; bitsandbytes
falls back to its own). `controlllm.quiet` drops that one message at its logger; it is installed on
import of this module (which `controlllm.model` imports), so a command's stderr carries only what
concerns the user.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn
from torch.nn import functional as F

from . import quiet  # noqa: F401  (installs the filter of bitsandbytes' optional-kernel warning)
from .config import QUANTIZATIONS
from .errors import UserError

BITSANDBYTES_REQUIREMENT = "bitsandbytes>=0.50,<0.51"



class QuantizationError(UserError, RuntimeError):
    """A quantised base cannot be built here (bitsandbytes missing) or used this way."""


def require_bitsandbytes(what: str = "a quantised base"):
    """The bitsandbytes module, or a `QuantizationError` saying why it cannot be used here."""
    try:
        import bitsandbytes
    except Exception as err:  # ImportError, or a native library that fails to load on this platform
        raise QuantizationError(
            f"{what} needs bitsandbytes ({BITSANDBYTES_REQUIREMENT}: x86-64 CPUs with AVX2, or CUDA GPUs), which "
            f"cannot be imported here: {type(err).__name__}: {err}. Install it with `pip install "
            f"'{BITSANDBYTES_REQUIREMENT}'`, or train without --quantize-base"
        ) from err
    return bitsandbytes


def check_quantization(value) -> None:
    """Raise a ValueError unless `value` is None, '4bit' or '8bit'."""
    if value is not None and value not in QUANTIZATIONS:
        raise ValueError(f"quantize_base={value!r} is not supported; allowed: None, "
                         f"{', '.join(map(repr, QUANTIZATIONS))}")


# ----------------------------------------------------------------------------- 8-bit layer
class _DequantizedLinear(torch.autograd.Function):
    """y = x W^T + b with W = int8 rows x scales, dequantised in forward and again in backward, so
    the graph keeps the int8 weights, never a full-precision copy of them."""

    @staticmethod
    def forward(ctx, x, int8_weight, row_scale, bias):
        weight = _dequantize_rows(int8_weight, row_scale, x.dtype)
        ctx.save_for_backward(int8_weight, row_scale)
        ctx.x_dtype = x.dtype
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_output):
        int8_weight, row_scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = _dequantize_rows(int8_weight, row_scale, grad_output.dtype)
            grad_x = (grad_output @ weight).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias


def _dequantize_rows(int8_weight: torch.Tensor, row_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # In float32, then cast: the same numbers whatever the compute dtype asks for.
    return (int8_weight.float() * (row_scale.float().unsqueeze(1) / 127.0)).to(dtype)


def _linear8bit_class():
    bnb = require_bitsandbytes()

    class QuantizedLinear8bit(bnb.nn.Linear8bitLt):
        """A frozen `Linear8bitLt` (int8 weights, one absmax scale per output row, bitsandbytes' state
        dict) computing with its dequantised weights in the input's dtype, in training and evaluation."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _DequantizedLinear.apply(x, self.weight.data, self.weight.SCB, self.bias)

    return QuantizedLinear8bit


# ------------------------------------------------------------------------------- quantise
def _quantized_linear(linear: nn.Linear, mode: str) -> nn.Module:
    """A bitsandbytes layer holding `linear`'s weights quantised (the bias stays as it is)."""
    bnb = require_bitsandbytes()
    weight = linear.weight.detach()
    has_bias = linear.bias is not None
    if mode == "4bit":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=weight.dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight.contiguous(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, module=layer).to(weight.device)
        # The CPU-packed inference kernel computes other numbers and repacks the weight in place.
        layer.support_avx512bf16_for_cpu = False
    else:
        layer = _linear8bit_class()(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                    threshold=0.0, device="meta")
        params = bnb.nn.Int8Params(weight.contiguous(), requires_grad=False, has_fp16_weights=False).to(weight.device)
        params.CB = None  # the int8 rows are params.data itself; a second reference would be copied by deepcopy
        layer.weight = params
        layer.compute_dtype = weight.dtype
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    layer.train(linear.training)
    return layer


def _bnb_types() -> tuple[type, ...]:
    # A bitsandbytes layer exists only once bitsandbytes is imported: no import for plain models.
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None or not hasattr(bnb, "nn"):
        return ()
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def is_quantized_linear(module: nn.Module) -> bool:
    types = _bnb_types()
    return bool(types) and isinstance(module, types)


def quantization_of(model: nn.Module) -> str | None:
    """'4bit' or '8bit' when `model` holds bitsandbytes linear layers of that kind, else None."""
    types = _bnb_types()
    if not types:
        return None
    kinds = set()
    for module in model.modules():
        if isinstance(module, types[0]):
            kinds.add("4bit")
        elif isinstance(module, types[1]):
            kinds.add("8bit")
    if len(kinds) > 1:
        raise QuantizationError(f"{type(model).__name__} mixes 4-bit and 8-bit layers; one kind is supported")
    return kinds.pop() if kinds else None


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Quantise every `nn.Linear` in the decoder layers of `model` to `mode` ('4bit': nf4, '8bit':
    int8 rows), in place; returns `model`. Embeddings, norms and the LM head stay in full precision.

    A model already quantised to `mode` is returned as it is (quantisation is deterministic, so the
    same full-precision weights always give the same quantised ones); another kind is an error.
    Weights are quantised on the device they are on; the layers compute in the dtype they had.
    """
    from .layers import decoder_layers

    check_quantization(mode)
    if mode is None:
        return model
    require_bitsandbytes(f"quantize_base={mode!r}")
    present = quantization_of(model)
    if present == mode:
        return model
    if present is not None:
        raise QuantizationError(f"the model is already quantised to {present}; cannot quantise it to {mode}")
    for layer in decoder_layers(model):
        targets = [(name, m) for name, m in layer.named_modules() if type(m) is nn.Linear]
        for name, linear in targets:
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, child, _quantized_linear(linear, mode))
    # The mark transformers' own bitsandbytes loader leaves: PEFT then wraps these layers with its
    # bitsandbytes LoRA layers (QLoRA), whose merge dequantises rather than adding to packed bytes.
    setattr(model, f"is_loaded_in_{mode}", True)
    return model


# ----------------------------------------------------------------------------- dequantise
def dequantized_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The full-precision weight a bitsandbytes layer computes with (in its compute dtype by default)."""
    bnb = require_bitsandbytes()
    if isinstance(module, bnb.nn.Linear4bit):
        state = module.weight.quant_state
        weight = bnb.functional.dequantize_4bit(module.weight.data, state)  # in the dtype it was quantised from
        return weight if dtype is None else weight.to(dtype)
    if isinstance(module, bnb.nn.Linear8bitLt):
        dtype = dtype or getattr(module, "compute_dtype", torch.float32)
        scale = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
        return _dequantize_rows(module.weight.data, scale, dtype)
    raise TypeError(f"{type(module).__name__} is not a bitsandbytes linear layer")


def dequantized_linear(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain `nn.Linear` with the dequantised weight (and the bias) of a bitsandbytes layer."""
    weight = dequantized_weight(module, dtype)
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                       device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().clone().to(weight.dtype), requires_grad=module.bias.requires_grad)
    linear.train(module.training)
    return linear


def dequantized_copy(layer: nn.Module) -> nn.Module:
    """A deep copy of `layer` whose bitsandbytes layers are plain `nn.Linear`s with the dequantised
    weights, in the dtype the layer computes in (the quantised weights are not copied)."""
    memo = {id(m): dequantized_linear(m) for m in layer.modules() if is_quantized_linear(m)}
    return copy.deepcopy(layer, memo)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every bitsandbytes linear layer in `model` by an `nn.Linear` with its dequantised
    weight, in place; returns `model` (a plain full-precision model computing what it computed)."""
    targets = [(name, m) for name, m in model.named_modules() if is_quantized_linear(m)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, dequantized_linear(module))
    for mode in QUANTIZATIONS:
        if getattr(model, f"is_loaded_in_{mode}", False):
            setattr(model, f"is_loaded_in_{mode}", False)
    return model
