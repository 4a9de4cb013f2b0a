"""GGUF export: a plain (merged) transformers model and its tokenizer as one file llama.cpp and Ollama serve.

The file is written by llama.cpp's own converter (`convert_hf_to_gguf.py` with the `gguf-py` it was
written against, pinned: see `controlllm.serving.llama_cpp`), so every family llama.cpp's converter
knows is written as llama.cpp itself would write it: Llama (plain, linear and llama3 RoPE scaling),
Qwen2, Qwen3, Mistral, Gemma-3, Phi-3, OLMo2 and more; byte-level BPE and SentencePiece tokenizers.

- The model and tokenizer are saved (`save_pretrained`) into a temporary folder and the converter
  runs on it in a process of its own; the file is written under a temporary name and renamed into
  place, so a failed export leaves nothing behind.
- f32, f16, bf16 and q8_0 are the converter's own output types; Q4_K_M is llama.cpp's quantiser
  (`llama_model_quantize`, from the libllama that node-llama-cpp ships prebuilt) run on the f32 file.
- The run's model card (README.md) goes into `general.description` (its first paragraph) and, whole,
  into the custom key `controlllm.model_card`; the kind of run it came from into `controlllm.source_kind`.
- An Ollama Modelfile is written beside the file (`<name>.Modelfile`): FROM the file and PARAMETER
  stop for the tokenizer's end-of-turn tokens. It has no TEMPLATE: Go templates are not written from
  Jinja; Ollama takes the chat template the GGUF file carries (`tokenizer.chat_template`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import UserError
from . import llama_cpp

#: Tensor types a file can be written in. f32 is exact; f16 / bf16 / q8_0 are the converter's
#: (vectors such as norms stay float32); q4_k_m is llama.cpp's quantiser (needs its library).
DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m")
#: transformers model classes whose export is checked by the tests, with llama.cpp's architecture
#: for each. Other classes llama.cpp's converter knows are written too (unchecked).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3", "Gemma3ForCausalLM": "gemma3", "Phi3ForCausalLM": "phi3",
    "Olmo2ForCausalLM": "olmo2",
}
#: Key of the whole model card in the file's metadata.
MODEL_CARD_KEY = "controlllm.model_card"
#: Key of the kind of source the file was written from (model, control, lora, full, ...).
SOURCE_KIND_KEY = "controlllm.source_kind"
#: Tokens that end a turn in the chat templates of the families above (Ollama stop parameters).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>", "<|endoftext|>",
                      "</s>", "<eos>", "<|eom_id|>")


class ExportError(UserError, ValueError):
    """A model, tokenizer or option the GGUF export cannot write: what it was and what is supported."""


def _check_options(output_file: str | os.PathLike, dtype: str) -> Path:
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    # No suffix is required here: a caller may write into a staging name and rename it (the CLI
    # requires .gguf of its --output). The Modelfile is written only beside a file named *.gguf.
    output = Path(output_file)
    if output.is_dir():
        raise ExportError(f"output file {os.fspath(output_file)!r} is a folder; give a file name ending in .gguf")
    return output


def _check_model(model) -> None:
    name = type(model).__name__
    if hasattr(model, "merge_and_unload"):  # a ControlModel or PeftModel
        raise ExportError(f"the model is a {name}: call merge_and_unload() first, or pass the run folder")
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise ExportError(f"the model is a {name}; expected a transformers PreTrainedModel (a causal LM)")


# --------------------------------------------------------------------------- the model folder


def _save_model_folder(model, tokenizer, folder: Path, sentencepiece_model: str | os.PathLike | None = None) -> None:
    """save_pretrained model and tokenizer into `folder`, as the converter reads them."""
    quantizer = getattr(model, "hf_quantizer", None)
    quantization_config = getattr(model.config, "quantization_config", None)
    try:
        # A model loaded from a GGUF file holds dequantised float weights; transformers refuses to save it
        # while it still names the GGUF quantizer.
        if quantizer is not None:
            model.hf_quantizer = None
        if quantization_config is not None:
            del model.config.quantization_config
        model.save_pretrained(folder)
    finally:
        if quantizer is not None:
            model.hf_quantizer = quantizer
        if quantization_config is not None:
            model.config.quantization_config = quantization_config
    tokenizer.save_pretrained(folder)
    # transformers 5 saves a SentencePiece tokenizer as tokenizer.json only; llama.cpp's converter reads
    # the SentencePiece model itself (scores, token types) where the family has one.
    vocab_file = (sentencepiece_model or getattr(tokenizer, "vocab_file", None)
                  or tokenizer.init_kwargs.get("vocab_file"))
    if (vocab_file and str(vocab_file).endswith(".model") and os.path.isfile(vocab_file)
            and not (folder / "tokenizer.model").exists()):
        shutil.copyfile(vocab_file, folder / "tokenizer.model")


def _convert(folder: Path, output: Path, outtype: str, name: str, kv: dict, model) -> dict:
    """Run the pinned converter on `folder`, writing `output`; returns its facts."""
    script = llama_cpp.converter_script()
    with tempfile.TemporaryDirectory(prefix="controlllm-convert-") as tmp:
        request = Path(tmp) / "request.json"
        request.write_text(json.dumps({"tools": os.fspath(script.parent), "model_dir": os.fspath(folder),
                                       "outfile": os.fspath(output), "outtype": outtype, "name": name, "kv": kv}))
        env = {**os.environ, "NO_LOCAL_GGUF": "", "TQDM_DISABLE": "1"}
        result = subprocess.run([sys.executable, os.fspath(Path(__file__).with_name("_convert.py")), os.fspath(request)],
                                capture_output=True, text=True, env=env)
    lines = result.stdout.strip().splitlines()
    facts = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    if result.returncode == 0:
        return facts
    cls = type(model).__name__
    if facts.get("error") == "architecture":
        raise ExportError(f"cannot export a {cls} (model_type {getattr(model.config, 'model_type', None)!r}) to GGUF: "
                          f"llama.cpp's converter (llama-cpp-python {llama_cpp.LLAMA_CPP_PYTHON_VERSION}) does not "
                          f"know it; checked: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if facts.get("error") == "unrepresentable":
        raise ExportError(f"cannot export this {cls} to GGUF: {facts['message']}")
    errors = [line for line in result.stderr.strip().splitlines() if line.strip() and not line.startswith(" ")]
    last = errors[-1] if errors else f"exit status {result.returncode}"
    raise ExportError(f"llama.cpp's converter failed on the {cls}: {last}")


def _facts(path: Path) -> dict:
    """Architecture, tensor count and tokenizer facts of a written GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = reader.fields

    def get(key, default=None):
        return fields[key].contents() if key in fields else default

    return {"architecture": get("general.architecture"), "tensors": len(reader.tensors),
            "tokenizer": get("tokenizer.ggml.model"), "pre_tokenizer": get("tokenizer.ggml.pre"),
            "tokens": len(fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in fields else 0,
            "merges": len(fields["tokenizer.ggml.merges"].data) if "tokenizer.ggml.merges" in fields else 0,
            "chat_template": "tokenizer.chat_template" in fields,
            "add_bos": bool(get("tokenizer.ggml.add_bos_token", False)),
            "add_eos": bool(get("tokenizer.ggml.add_eos_token", False))}


def modelfile_text(gguf_name: str, tokenizer) -> str:
    """An Ollama Modelfile for `gguf_name` (beside it): FROM and the end-of-turn stop tokens."""
    vocab = tokenizer.get_vocab()
    stops = [t for t in END_OF_TURN_TOKENS if t in vocab]
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.insert(0, eos)
    lines = [f"FROM ./{gguf_name}",
             "# No TEMPLATE: Ollama uses the chat template carried in the GGUF file (tokenizer.chat_template)."]
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    return "\n".join(lines) + "\n"


def write_gguf(model, tokenizer, output_file: str | os.PathLike, dtype: str = "f32", card: str | None = None,
               source_kind: str = "model", name: str | None = None, modelfile: bool = True,
               sentencepiece_model: str | os.PathLike | None = None) -> dict:
    """Write a plain transformers causal LM and its tokenizer as one GGUF file (the writing side of export_gguf).

    Args:
        model: a plain transformers model (no Control or PEFT wrapper).
        tokenizer: its tokenizer (fast; SentencePiece families keep their `tokenizer.model`).
        output_file: the `.gguf` file (written under a temporary name, then renamed; folders are created).
        dtype: one of DTYPES.
        card: the model card (markdown) for the metadata, or None.
        source_kind: what the model came from (model, control, lora, full, ...), kept in the metadata.
        name: `general.name` (default: the output file's stem).
        modelfile: also write an Ollama Modelfile `<stem>.Modelfile` beside the file (when it is named
            *.gguf; a caller writing a staging name writes `modelfile_text(final_name, tokenizer)` itself).
        sentencepiece_model: the tokenizer's SentencePiece model (`tokenizer.model`) where the tokenizer no
            longer names it (transformers 5 saves tokenizer.json only); the converter reads its scores.

    Returns a summary: output, architecture, dtype, source kind, tensor count, bytes, tokenizer facts.
    Raises ExportError for what cannot be written; llama_cpp.ToolsMissing when the converter (or, for
    q4_k_m, the quantiser) is not installed.
    """
    output = _check_options(output_file, dtype)
    _check_model(model)
    if tokenizer is None:
        raise ExportError("a GGUF file carries the tokenizer: pass tokenizer= with an in-memory model")
    llama_cpp.converter_script()  # fail before any work when the converter is missing
    if dtype == "q4_k_m":
        llama_cpp.require_quantiser(dtype)
    kv = {SOURCE_KIND_KEY: source_kind}
    if card:
        description = _description(card)
        if description:
            kv["general.description"] = description
        kv[MODEL_CARD_KEY] = card
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        with tempfile.TemporaryDirectory(prefix="controlllm-export-") as folder:
            _save_model_folder(model, tokenizer, Path(folder), sentencepiece_model)
            if dtype == "q4_k_m":
                full = output.with_name(f".{output.name}.f32-{os.getpid()}")
                try:
                    facts = _convert(Path(folder), full, "f32", name or output.stem, kv, model)
                    llama_cpp.quantize(full, tmp, dtype)
                finally:
                    full.unlink(missing_ok=True)
            else:
                facts = _convert(Path(folder), tmp, dtype, name or output.stem, kv, model)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    summary = {"output": os.fspath(output), "dtype": dtype, "source_kind": source_kind,
               "bytes": output.stat().st_size, "model_card": bool(card), **_facts(output)}
    if "pre_tokenizer_by_layout" in facts:
        summary["pre_tokenizer_by_layout"] = True
    final = Path(modelfile) if isinstance(modelfile, (str, os.PathLike)) else output if modelfile else None
    if final is not None and final.suffix.lower() == ".gguf":
        path = final.with_name(final.stem + ".Modelfile")
        path.write_text(modelfile_text(final.name, tokenizer), encoding="utf-8")
        summary["modelfile"] = os.fspath(path)
    return summary



# --------------------------------------------------------------------------- path sources


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



def _same_vocabulary(sentencepiece_model: Path, tokenizer) -> bool:
    try:
        from sentencepiece import SentencePieceProcessor

        processor = SentencePieceProcessor(model_file=os.fspath(sentencepiece_model))
    except (ImportError, OSError, RuntimeError):
        return False
    vocab = tokenizer.get_vocab()
    return all(vocab.get(processor.id_to_piece(i)) == i for i in range(processor.get_piece_size()))


def find_sentencepiece_model(path: str | os.PathLike, tokenizer, card: str | None = None) -> Path | None:
    """The SentencePiece model (`tokenizer.model`) of the tokenizer of a run, dialled, merged or model folder.

    transformers 5 saves a SentencePiece tokenizer as tokenizer.json only, so a run's or merged folder's
    tokenizer has lost the file llama.cpp's converter reads (scores; Phi-3's converter refuses without it).
    Looked for in the folder, its final/, the base model the run records and the model card's
    `base_model:`; taken only where its pieces are the tokenizer's vocabulary, id for id. None otherwise.
    """
    import re

    from ..runs import open_run

    folder = Path(path)
    candidates = [folder, folder / "final"]
    try:
        base = open_run(folder).base_path
    except Exception:  # noqa: BLE001 - an unreadable record only means one candidate fewer
        base = None
    if base:
        candidates.append(Path(base))
    if card and card.startswith("---"):
        header = card[3:card.find("\n---", 3)]
        match = re.search(r'^base_model:\s*"?([^"\n]+?)"?\s*$', header, re.MULTILINE)
        if match:
            candidates.append(Path(match.group(1)))
    for candidate in candidates:
        model_file = candidate / "tokenizer.model"
        if model_file.is_file() and _same_vocabulary(model_file, tokenizer):
            return model_file
    return None


def _lost_sentencepiece_model(tokenizer) -> bool:
    """A SentencePiece-style tokenizer (byte fallback, '▁' for spaces) that names no tokenizer.model file."""
    vocab_file = getattr(tokenizer, "vocab_file", None) or tokenizer.init_kwargs.get("vocab_file")
    if vocab_file and os.path.isfile(vocab_file):
        return False
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    state = json.loads(backend.to_str())
    return (state.get("model") or {}).get("byte_fallback") is True


def _card_of(run) -> tuple[str | None, str]:
    """(model card, source kind) of an opened run for the file's metadata: a run's card rewritten for
    the folded model; a folder `controlllm merge` wrote keeps its own card (kind 'merged')."""
    from ..model_card import CARD_NAME, merged_card_text

    if run.kind != "base":
        return merged_card_text(run, holds="gguf"), run.kind
    card_path = Path(run.path) / CARD_NAME if run.path and os.path.isdir(run.path) else None
    card = card_path.read_text(encoding="utf-8") if card_path is not None and card_path.is_file() else None
    return card, "merged" if card and "library_name: controlllm" in card else "base"


def export_run(run, output_file: str | os.PathLike, dtype: str = "f32", name: str | None = None,
               modelfile: bool | str | os.PathLike = True) -> dict:
    """Write an opened run (`controlllm.runs.open_run`: any kind, dialled or not) as one GGUF file: the
    run folded by `Run.merged()` (the one fold rule; a quantised base dequantised), its card and kind
    in the metadata, the SentencePiece model recovered where the tokenizer lost it. `modelfile`: write
    the Ollama Modelfile beside the output (True), beside another final path (a caller writing a
    staging file), or not (False). Returns `write_gguf`'s summary."""
    model, tokenizer = run.merged()
    card, kind = _card_of(run)
    sentencepiece_model = None
    if run.path is not None and _lost_sentencepiece_model(tokenizer):
        sentencepiece_model = find_sentencepiece_model(run.path, tokenizer, card)
    name = name or (os.path.basename(os.path.normpath(run.path)) if run.path else None)
    return write_gguf(model, tokenizer, output_file, dtype=dtype, card=card, source_kind=kind, name=name,
                      sentencepiece_model=sentencepiece_model, modelfile=modelfile)


def export_gguf(model_or_path, output_file: str | os.PathLike, dtype: str = "f32", tokenizer=None,
                card: str | None = None, base: str | None = None, name: str | None = None) -> dict:
    """Write a model and its tokenizer as one GGUF file that llama.cpp (and Ollama) load, with a Modelfile.

    Args:
        model_or_path: a plain transformers model (a merged Control model, a LoRA model after
            `merge_and_unload`, a base model), or a path: a run folder of any kind (a Control delta is
            folded with `merge_and_unload`, a LoRA adapter merged, full weights taken as they are), a
            merged folder or a model folder.
        output_file: the `.gguf` file to write (replaced atomically; parent folders are created).
        dtype: 'f32' (exact), 'f16', 'bf16', 'q8_0' or 'q4_k_m' (llama.cpp's quantiser).
        tokenizer: the model's tokenizer; read with the model when a path is given.
        card: the model card (markdown) for the metadata; read from the folder's README.md when a path
            is given and `card` is None.
        base: the base model of a delta or adapter (default: from the run's run_config.json).
        name: `general.name` (default: the folder's or the output file's name).

    Returns a summary: output, architecture, dtype, tensor count, file size, tokenizer facts, Modelfile.

    Raises ExportError (a UserError) for a model, tokenizer or option the export does not support,
    with what is supported; loading errors of a path are the loaders' UserErrors.
    """
    output = _check_options(output_file, dtype)
    if isinstance(model_or_path, (str, os.PathLike)):
        from ..runs import open_run

        return export_run(open_run(model_or_path, base=base), output, dtype=dtype, name=name)
    return write_gguf(model_or_path, tokenizer, output, dtype=dtype, card=card, source_kind="model", name=name)


__all__ = ["DTYPES", "MODEL_CARD_KEY", "SOURCE_KIND_KEY", "SUPPORTED_ARCHITECTURES", "ExportError", "export_gguf", "export_run",
           "modelfile_text", "write_gguf"]
