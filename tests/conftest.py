"""Tiny random-weight models of each supported architecture, built from configs (no downloads)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

# Tiny models run fastest on one thread, and CI machines are shared.
torch.set_num_threads(1)

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)

# name -> (config class, model class, extra config kwargs). Sliding windows are shorter than the
# test sequences so the windowed code paths really run.
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 6}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "sliding_window": 6}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "sliding_window": 6}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),
}
CORE_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]


def make_model(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random-weight causal LM of architecture `arch` in fp32 eval mode."""
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    kwargs = {**COMMON, **extra, **overrides}
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = "eager" if arch.startswith("gemma") else "sdpa"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    # Random init leaves some norms at exactly 1 or 0 and biases at 0; jitter everything so no
    # branch is accidentally the identity.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def clone(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)


def perturb_trainable(model, scale: float = 0.05, seed: int = 1) -> None:
    """Move every trainable parameter as training would, so the branches differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def batch(vocab: int = 96, bsz: int = 2, seq: int = 12, left_pad: int = 0, seed: int = 0):
    """input_ids and attention_mask; row 0 left-padded by `left_pad` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (bsz, seq), generator=g)
    mask = torch.ones_like(ids)
    if left_pad:
        mask[0, :left_pad] = 0
        ids[0, :left_pad] = 0
    return ids, mask


@pytest.fixture(params=CORE_ARCHS)
def arch(request):
    return request.param


TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello there, how are you today?",
    "Paris is the capital of France.",
    "I am fine, thank you very much.",
    "What is the capital of Spain? Madrid is.",
    "En el principio creo Dios los cielos y la tierra.",
]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(chat_template: str | None = CHATML):
    """A small byte-level BPE tokenizer trained here (vocab 320), so no download is needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(TOKENIZER_CORPUS * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama + tokenizer folder, loadable with --model."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_tokenizer()
    model = make_model("llama", vocab_size=len(tokenizer), num_hidden_layers=4)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n\n".join(TOKENIZER_CORPUS * 40))
    return path


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory):
    import json

    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    rows = [{"prompt": f"What is {a} plus {b}?", "response": f"{a + b}"} for a in range(8) for b in range(8)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A command run in-process sets torch's thread count for the process (--threads); each test
    starts from the suite's own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
