"""Shared pieces of the performance benchmark: model shapes, the methods compared, one training step."""

from __future__ import annotations

import os
import platform
import time

import torch

# SmolLM2-135M's shape (random weights: speed and memory do not depend on the values).
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                    max_position_embeddings=2048, rms_norm_eps=1e-5)
# --quick: a small Llama of the same layout, for a smoke run.
QUICK = dict(SMOLLM2_135M, vocab_size=4096, hidden_size=192, intermediate_size=512, num_hidden_layers=8,
             num_attention_heads=6, num_key_value_heads=2)


def llama_config(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**shape, attn_implementation="sdpa")


def build_base(shape: dict, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(shape))
    model.generation_config.pad_token_id = 0
    return model


def random_model(shape: dict, dtype: torch.dtype):
    """A Llama of `shape` with random weights in `dtype`, built without the slow per-layer init:
    on the meta device, then materialised and filled from one random pool (values do not change
    memory or time)."""
    from transformers import LlamaForCausalLM

    config = llama_config(shape)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.to_empty(device="cpu")
    pool = (torch.randn(1 << 22, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            flat = p.view(-1)
            for start in range(0, flat.numel(), pool.numel()):
                n = min(pool.numel(), flat.numel() - start)
                flat[start:start + n].copy_(pool[:n])
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its buffers were left empty
    model.tie_weights()
    model.generation_config.pad_token_id = 0
    return model


def methods_for(num_layers: int) -> list[dict]:
    """The training methods compared, each a dict the builder understands."""
    q, h = max(1, num_layers // 4), max(1, num_layers // 2)
    return [
        dict(label=f"control k={q} lerp+mse", method="control", k=q, interpolation="lerp", alignment_loss="mse"),
        dict(label=f"control k={h} lerp+mse", method="control", k=h, interpolation="lerp", alignment_loss="mse"),
        dict(label=f"control k={q} dlerp+cosine", method="control", k=q, interpolation="dlerp", alignment_loss="cosine"),
        dict(label=f"control k={h} dlerp+cosine", method="control", k=h, interpolation="dlerp", alignment_loss="cosine"),
        dict(label="full fine-tuning", method="full"),
        dict(label="LoRA r16 all-linear", method="lora", r=16),
        dict(label=f"LLaMA-Pro stack k={q}", method="stack", k=q),
    ]


def prepare(base, spec: dict):
    """Make `base` trainable the way `spec` says; returns the model to train."""
    method = spec["method"]
    if method in ("control", "stack"):
        from controlllm import ControlConfig, get_control_model

        config = ControlConfig(expand_type="stack" if method == "stack" else "concat",
                               num_expanded_layers=spec["k"], interpolation=spec.get("interpolation", "lerp"),
                               alignment_loss=spec.get("alignment_loss", "mse"))
        model = get_control_model(base, config)
    elif method == "full":
        for p in base.parameters():
            p.requires_grad_(True)
        model = base
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(base, LoraConfig(r=spec.get("r", 16), lora_alpha=2 * spec.get("r", 16),
                                                lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    else:
        raise ValueError(f"unknown method {method!r}")
    if spec.get("gradient_checkpointing"):
        # Non-reentrant checkpointing needs no input that requires grad, so frozen layers below
        # the lowest trained one stay out of backward.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model):
    # The fused kernel is what the HF Trainer (and so `controlllm train`) uses with torch >= 2.8.
    return torch.optim.AdamW(trainable(model), lr=1e-5, weight_decay=0.0, fused=True)


def optimizer_state_bytes(optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


def batch(vocab: int, batch_size: int, seq_len: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    return ids, torch.ones_like(ids)


def train_step(model, optimizer, ids, mask) -> float:
    """One forward, backward and AdamW step; returns its wall time in seconds."""
    start = time.perf_counter()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark (VmHWM) so later peaks exclude model construction."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return peak_rss_bytes()


def machine_info() -> dict:
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }
