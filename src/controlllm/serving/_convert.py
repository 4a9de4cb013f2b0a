"""Run llama.cpp's pinned converter on a saved model folder (a script, run in its own process).

Usage: python _convert.py REQUEST.json, where REQUEST holds: tools (the folder with
convert_hf_to_gguf.py, conversion/ and gguf-py/), model_dir, outfile, outtype (f32, f16, bf16, q8_0),
name, and kv ({key: string} written into the file's metadata). Prints one JSON line: the
architecture, tensor count and tokenizer facts.

It runs in a process of its own so that the converter's own gguf-py (which it was written against)
is the `gguf` it imports, whatever `gguf` the environment has. Two additions to the converter:

- A byte-level BPE tokenizer whose pre-tokenizer llama.cpp does not know by hash (a tokenizer
  trained anew on the layout of GPT-2, SmolLM2, Llama-3 or Qwen2) is named by its layout instead of
  refused: the hash identifies the tokenizers of released models only.
- The extra metadata (model card, source kind) is written with the model's own parameters.
- Gemma-3: llama.cpp scales attention scores by 1/sqrt(head_dim) (by 1/sqrt(hidden/heads) for the
  62-layer 27B) and has no key for `query_pre_attn_scalar`; transformers scales by
  query_pre_attn_scalar**-0.5. Where the two differ (a config whose query_pre_attn_scalar is not its
  head_dim), the ratio is folded into the query norm's weight, which multiplies every query just
  before the scores. llama.cpp's sliding-window layers are fixed (every 6th layer global): a config
  whose `layer_types` differ is refused, since the file cannot say so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# The pre-tokenizer regexes of Llama-3's and Qwen2's tokenizer.json, llama.cpp's "llama-bpe" and "qwen2".
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer_by_layout(tokenizer_json: Path) -> str | None:
    """llama.cpp's name (tokenizer.ggml.pre) for a byte-level BPE tokenizer's pre-tokenizer, or None."""
    if not tokenizer_json.is_file():
        return None
    state = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    if (state.get("model") or {}).get("type") != "BPE":
        return None
    # Qwen2's tokenizer normalises to NFC (transformers' Qwen2Tokenizer writes it so); llama.cpp's "qwen2" is
    # that tokenizer. Any other normaliser is a layout llama.cpp's pre-tokenizers do not name.
    normalizer = state.get("normalizer")
    if normalizer is not None and normalizer != {"type": "NFC"}:
        return None
    pre = state.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]

    def byte_level(step, use_regex):
        return (step.get("type") == "ByteLevel" and not step.get("add_prefix_space")
                and step.get("use_regex", True) == use_regex)

    if normalizer is None and len(steps) == 1 and byte_level(steps[0], True):
        return "gpt-2"
    if (normalizer is None and kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
            and byte_level(steps[1], True)):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and byte_level(steps[1], False):
        regex = steps[0].get("pattern", {}).get("Regex")
        name = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(regex)
        return name if normalizer is None or name == "qwen2" else None
    return None


def gemma3_llama_cpp_attention_scale(hparams: dict) -> float:
    """The attention score scale llama.cpp (llama-model.cpp, LLM_ARCH_GEMMA3) uses for a Gemma-3 model."""
    hidden, heads = hparams["hidden_size"], hparams["num_attention_heads"]
    if hparams.get("num_hidden_layers") == 62:  # llama.cpp's LLM_TYPE_27B
        return (hidden // heads) ** -0.5
    return hparams.get("head_dim", 256) ** -0.5


def gemma3_query_norm_factor(hparams: dict) -> float:
    """What the query norm's (1 + weight) is multiplied by so that llama.cpp's scores are transformers'."""
    scalar = hparams.get("query_pre_attn_scalar", 256)  # Gemma3TextConfig's default
    return (scalar ** -0.5) / gemma3_llama_cpp_attention_scale(hparams)


def gemma3_unrepresentable(hparams: dict) -> str | None:
    """Why llama.cpp cannot run this Gemma-3 config as transformers does, or None."""
    layer_types = hparams.get("layer_types")
    if hparams.get("sliding_window") and layer_types:
        # llama.cpp: hparams.set_swa_pattern(6), layer il slides when il % 6 < 5.
        expected = ["sliding_attention" if i % 6 < 5 else "full_attention" for i in range(len(layer_types))]
        if list(layer_types) != expected:
            return (f"layer_types {layer_types} cannot be written for llama.cpp's gemma3, whose sliding-window layers "
                    f"are fixed (every 6th layer full attention): {expected}")
    if hparams.get("attn_logit_softcapping") is not None:
        return (f"attn_logit_softcapping {hparams['attn_logit_softcapping']} cannot be written for llama.cpp's gemma3 "
                "(it has none); allowed: null")
    return None


def main(request_file: str) -> None:
    request = json.loads(Path(request_file).read_text(encoding="utf-8"))
    tools = Path(request["tools"])
    sys.path.insert(0, str(tools / "gguf-py"))
    sys.path.insert(0, str(tools))
    import logging

    import gguf
    import torch
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    logging.basicConfig(level=logging.WARNING)
    model_dir = Path(request["model_dir"])
    ftypes = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    hparams = ModelBase.load_hparams(model_dir, False)
    architecture = get_model_architecture(hparams, ModelType.TEXT)
    try:
        base_class = get_model_class(architecture, mmproj=False)
    except NotImplementedError:
        print(json.dumps({"error": "architecture", "architecture": architecture}))
        sys.exit(3)
    facts = {}
    text_hparams = {**hparams, **hparams.get("text_config", {})}
    gemma3 = architecture in ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
    if gemma3 and (why := gemma3_unrepresentable(text_hparams)):
        print(json.dumps({"error": "unrepresentable", "message": why}))
        sys.exit(4)
    query_norm_factor = gemma3_query_norm_factor(text_hparams) if gemma3 else 1.0
    if query_norm_factor != 1.0:
        facts["query_norm_factor"] = query_norm_factor

    class Converter(base_class):
        model_arch = base_class.model_arch

        def get_vocab_base_pre(self, tokenizer):
            try:
                return super().get_vocab_base_pre(tokenizer)
            except NotImplementedError:
                name = pre_tokenizer_by_layout(self.dir_model / "tokenizer.json")
                if name is None:
                    raise
                facts["pre_tokenizer_by_layout"] = name
                return name

        def modify_tensors(self, data_torch, name, bid):
            if query_norm_factor != 1.0 and name.endswith("self_attn.q_norm.weight"):
                # Gemma's norms multiply by (1 + weight); the converter adds the 1 itself.
                data_torch = (data_torch.float() + 1.0) * query_norm_factor - 1.0
            yield from super().modify_tensors(data_torch, name, bid)

        def set_gguf_parameters(self):
            super().set_gguf_parameters()
            for key, value in request.get("kv", {}).items():
                self.gguf_writer.add_string(key, value)

    with torch.inference_mode():
        converter = Converter(model_dir, ftypes[request["outtype"]], Path(request["outfile"]),
                              model_name=request.get("name"))
        converter.write()
    facts.update(architecture=architecture, gguf_architecture=converter.gguf_writer.arch)
    print(json.dumps(facts))


if __name__ == "__main__":
    main(sys.argv[1])
