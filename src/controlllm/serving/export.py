"""GGUF export: a merged (plain transformers) model and its tokenizer as one file llama.cpp can serve.

The file is written with the `gguf` package's `GGUFWriter`, its tensor name maps and its Q8_0
quantiser, laid out as llama.cpp's own `convert_hf_to_gguf.py` lays out the same architecture:

- Llama (SmolLM2 is a Llama): the rows of q_proj and k_proj are reordered per head, because
  transformers rotates the two halves of each head (`rotate_half`) and llama.cpp rotates adjacent
  pairs; transformers' GGUF loader undoes exactly this on load. A tied LM head is not written
  (llama.cpp then reuses the token embedding).
- The tokenizer travels as metadata: byte-level BPE vocabulary, merges, token types, special
  token ids, whether BOS/EOS are added, the chat template.
- The run's model card (README.md) goes into `general.description` (its first paragraph) and,
  whole, into the custom key `controlllm.model_card`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

#: Tensor types a file can be written in: all float32, float16 matrices (vectors stay float32) or
#: Q8_0 matrices (blocks of 32 int8 with one float16 scale; vectors stay float32).
DTYPES = ("f32", "f16", "q8_0")
#: transformers model classes the export writes, with the llama.cpp architecture each becomes.
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama"}
#: Key of the whole model card in the file's metadata.
MODEL_CARD_KEY = "controlllm.model_card"

# The pre-tokenizer regex of Llama-3's tokenizer.json, which llama.cpp calls "llama-bpe".
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class ExportError(UserError, ValueError):
    """A model, tokenizer or option the GGUF export cannot write: what it was and what is supported."""


def _check_options(output_file: str | os.PathLike, dtype: str) -> Path:
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    output = Path(output_file)
    if output.suffix.lower() != ".gguf":
        raise ExportError(f"output file {os.fspath(output_file)!r} must end in .gguf")
    if output.is_dir():
        raise ExportError(f"output file {os.fspath(output_file)!r} is a folder; give a file name ending in .gguf")
    return output


# --------------------------------------------------------------------------- hyperparameters


def _architecture(model) -> str:
    name = type(model).__name__
    if hasattr(model, "merge_and_unload"):  # a ControlModel or PeftModel
        raise ExportError(f"the model is a {name}: call merge_and_unload() first, or pass the run folder")
    if name not in SUPPORTED_ARCHITECTURES:
        allowed = ", ".join(f"{k} (llama.cpp '{v}')" for k, v in SUPPORTED_ARCHITECTURES.items())
        raise ExportError(f"cannot export a {name} (model_type {getattr(model.config, 'model_type', None)!r}) to GGUF; "
                          f"supported: {allowed}; SmolLM2 is a LlamaForCausalLM")
    return SUPPORTED_ARCHITECTURES[name]


def _rope(config) -> tuple[float, dict]:
    """(rope theta, rope parameters) from a transformers 5 config (rope_parameters) or an older one."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ExportError(f"the model config has no rope_theta (rope_parameters: {params})")
    return float(theta), params


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _write_llama_hparams(writer, config) -> None:
    import gguf

    if getattr(config, "hidden_act", "silu") != "silu":
        raise ExportError(f"hidden_act {config.hidden_act!r} is not supported; llama.cpp's llama uses silu")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ExportError(f"{flag}=True is not supported by this export (llama.cpp's Llama has no such biases)")
    theta, rope = _rope(config)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ExportError(f"rope_type {rope_type!r} is not supported; allowed: default, linear")
    head_dim = _head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


# --------------------------------------------------------------------------- tensors


def _pair_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from halves (x0..x_{d/2-1}, y0..y_{d/2-1}) to pairs (x0, y0, x1, y1, ...).

    transformers' Llama rotates the two halves of a head; llama.cpp's rotates adjacent pairs. This is
    the permutation llama.cpp's converter applies to q_proj (n_heads) and k_proj (n_kv_heads).
    """
    head_dim = weight.shape[0] // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _encode(data: np.ndarray, dtype: str):
    """(array to write, its GGML type or None for a plain numpy dtype) for one float32 tensor."""
    import gguf

    if dtype == "f32" or data.ndim < 2:  # norms and other vectors stay float32, as llama.cpp writes them
        return data, None
    if dtype == "q8_0":
        try:
            return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        except gguf.QuantError:  # a row not a multiple of the block size: float16, as llama.cpp falls back
            pass
    return data.astype(np.float16), None


def _tensors(model, arch: str, dtype: str):
    """Yield (GGUF name, array, GGML type or None) for every weight of `model`."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp uses token_embd.weight when output.weight is absent
        if name.endswith("rotary_emb.inv_freq"):
            continue
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ExportError(f"tensor {name!r} of the {type(model).__name__} has no GGUF name for llama.cpp's "
                              f"{arch!r}; the model does not have the plain Llama layout")
        data = tensor.detach().to("cpu", torch.float32)
        if name.endswith("self_attn.q_proj.weight"):
            data = _pair_rope_rows(data, n_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            data = _pair_rope_rows(data, n_kv)
        array, raw_dtype = _encode(data.contiguous().numpy(), dtype)
        yield new_name, array, raw_dtype


# --------------------------------------------------------------------------- tokenizer


def _pre_tokenizer_name(state: dict) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) of the way this byte-level BPE tokenizer splits text."""
    pre = state.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]

    def byte_level(step, use_regex):
        return step.get("type") == "ByteLevel" and not step.get("add_prefix_space") and step.get("use_regex", True) == use_regex

    if len(steps) == 1 and byte_level(steps[0], True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level(steps[1], True):
        return "smollm"
    if (kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT
            and byte_level(steps[1], False)):
        return "llama-bpe"
    raise ExportError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not one this export "
                      "can name for llama.cpp; supported: ByteLevel without prefix space (GPT-2, 'gpt-2'), Digits + "
                      "ByteLevel (SmolLM2, 'smollm'), Llama-3's Split + ByteLevel ('llama-bpe')")


def _adds(tokenizer, token_id) -> tuple[bool, bool]:
    """Whether encoding adds `token_id` in front and at the end of a text."""
    if token_id is None:
        return False, False
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    extra = len(with_special) - len(plain)
    first = extra > 0 and with_special[0] == token_id
    last = extra > 0 and with_special[-1] == token_id and not (extra == 1 and first)
    return first, last


def _write_tokenizer(writer, tokenizer, vocab_size: int) -> dict:
    """Write the vocabulary, merges, token types, special ids and chat template; returns a summary."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"the tokenizer ({type(tokenizer).__name__}) has no tokenizers backend (tokenizer.json); "
                          "supported: a fast tokenizer with a byte-level BPE model")
    state = json.loads(backend.to_str())
    bpe = state.get("model") or {}
    if bpe.get("type") != "BPE" or bpe.get("byte_fallback") or state.get("normalizer") is not None:
        kind = f"{bpe.get('type')} model" + (", byte fallback" if bpe.get("byte_fallback") else "") + (
            f", normalizer {state['normalizer'].get('type')}" if state.get("normalizer") else "")
        raise ExportError(f"the tokenizer ({kind}) is not supported; supported: byte-level BPE (GPT-2 style, as "
                          "SmolLM2 and Llama-3 use) without a normalizer")
    pre = _pre_tokenizer_name(state)
    tokens: list[str | None] = [None] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    entries = [(i, t, gguf.TokenType.NORMAL) for t, i in bpe["vocab"].items()]
    entries += [(a["id"], a["content"], gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
                for a in state.get("added_tokens", [])]
    for i, text, kind in entries:
        if i >= vocab_size:
            raise ExportError(f"token {text!r} has id {i}, past the model's vocab_size {vocab_size} (embedding rows)")
        tokens[i], types[i] = text, kind
    # Embedding rows no token uses (vocab padded to a round size) get placeholder names, as in llama.cpp.
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    add_bos, _ = _adds(tokenizer, tokenizer.bos_token_id)
    _, add_eos = _adds(tokenizer, tokenizer.eos_token_id)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    writer.add_add_space_prefix(False)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates
        template = [{"name": k, "template": v} for k, v in template.items()]
    if template:
        writer.add_chat_template(template)
    return {"tokenizer": "gpt2", "pre_tokenizer": pre, "tokens": len(tokenizer), "merges": len(merges),
            "chat_template": bool(template), "add_bos": add_bos, "add_eos": add_eos}


# --------------------------------------------------------------------------- the file


def _description(card: str) -> str:
    """The card's first paragraph of prose (no YAML header, headings or code)."""
    text = card
    if text.startswith("---"):
        end = text.find("\n---", 3)
        text = text[end + 4:] if end >= 0 else text
    for paragraph in text.split("\n\n"):
        paragraph = paragraph.strip()
        if paragraph and not paragraph.startswith(("#", "```", "|", "-")):
            return " ".join(paragraph.split())
    return ""


def _load(path: str | os.PathLike, base: str | None):
    """(plain model, tokenizer, kind, model card or None) for a run folder, merged folder or model folder."""
    from ..checkpoints import load_model, resolve_run_folder
    from ..model_card import CARD_NAME

    model, tokenizer, kind = load_model(path, base=base)
    if kind == "control":
        if any(b.interpolator.dynamic for b in model.control_blocks.values()):
            import sys

            print("controlllm: note: dlerp/dlerp_in layers are folded with sigmoid(b); for weights measured on data "
                  "run `controlllm merge --calibration-data ...` first and export the merged folder", file=sys.stderr)
        model = model.merge_and_unload()
    elif kind == "lora":
        model = model.merge_and_unload()
    card_path = Path(resolve_run_folder(path)) / CARD_NAME if os.path.isdir(path) else None
    card = card_path.read_text(encoding="utf-8") if card_path is not None and card_path.is_file() else None
    return model, tokenizer, kind, card


def export_gguf(model_or_path, output_file: str | os.PathLike, dtype: str = "f32", tokenizer=None,
                card: str | None = None, base: str | None = None, name: str | None = None) -> dict:
    """Write a model and its tokenizer as one GGUF file that llama.cpp (and Ollama) load.

    Args:
        model_or_path: a plain transformers model (a merged Control model, a LoRA model after
            `merge_and_unload`, a base model), or a path: a run folder of any kind (a Control delta is
            folded with `merge_and_unload`, a LoRA adapter merged, full weights taken as they are), a
            merged folder or a model folder.
        output_file: the `.gguf` file to write (replaced atomically; parent folders are created).
        dtype: 'f32' (exact), 'f16' or 'q8_0' for the matrices; vectors (norms) stay float32.
        tokenizer: the model's fast tokenizer (byte-level BPE); read with the model when a path is given.
        card: the model card (markdown) for the metadata; read from the folder's README.md when a path
            is given and `card` is None.
        base: the base model of a delta or adapter (default: from the run's run_config.json).
        name: `general.name` (default: the folder's or the output file's name).

    Returns a summary: output, architecture, dtype, tensor count, file size, tokenizer facts.

    Raises ExportError (a UserError) for an architecture, tokenizer or option the export does not
    support, with what is supported; loading errors of a path are the loaders' UserErrors.
    """
    import gguf

    output = _check_options(output_file, dtype)
    kind = "model"
    if isinstance(model_or_path, (str, os.PathLike)):
        source = os.fspath(model_or_path)
        model, loaded_tokenizer, kind, folder_card = _load(model_or_path, base)
        tokenizer = tokenizer or loaded_tokenizer
        card = card if card is not None else folder_card
        name = name or os.path.basename(os.path.normpath(source))
    else:
        model = model_or_path
    if tokenizer is None:
        raise ExportError("a GGUF file carries the tokenizer: pass tokenizer= with an in-memory model")
    arch = _architecture(model)
    config = model.config
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or output.stem)
        if card:
            description = _description(card)
            if description:
                writer.add_description(description)
            writer.add_string(MODEL_CARD_KEY, card)
        writer.add_string("controlllm.source_kind", kind)
        _write_llama_hparams(writer, config)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab = _write_tokenizer(writer, tokenizer, config.vocab_size)
        count = 0
        for tensor_name, array, raw_dtype in _tensors(model, arch, dtype):
            writer.add_tensor(tensor_name, array, raw_dtype=raw_dtype)
            count += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, output)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"output": os.fspath(output), "architecture": arch, "dtype": dtype, "source_kind": kind, "tensors": count,
            "bytes": output.stat().st_size, "model_card": bool(card), **vocab}


__all__ = ["DTYPES", "MODEL_CARD_KEY", "SUPPORTED_ARCHITECTURES", "ExportError", "export_gguf"]
