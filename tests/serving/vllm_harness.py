"""Shared pieces of the serving tests and the serving benchmark: tiny bases of each family vLLM
serves and trained Control runs (concat, stack, hybrid) written to disk as a real run is, the
transformers reference, and vLLM's engine on the CPU.

vLLM's CPU attention supports head sizes that are multiples of 32 only, so the tiny models here
use hidden 64 with 2 heads of 32 (tests/conftest.py's models have heads of 8).
"""

from __future__ import annotations

import json
import os

# Before vLLM is imported: the engine in this process (deterministic, no worker start-up), a small
# KV cache, and no pinning of OpenMP threads to cores on a shared machine.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

import torch  # noqa: E402

from conftest import make_model, make_tokenizer, perturb_trainable  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=256)
EXPANDED = [1, 3]
# Per family (tests/conftest.py's names): what its tiny model needs beyond TINY. Sliding windows are
# shorter than the longer test prompts, so the windowed attention really runs.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
FAMILIES = {
    "llama": {},
    "llama3": {"rope_parameters": LLAMA3_ROPE},  # Llama-3.1+ RoPE scaling
    "mistral": {"sliding_window": 8},
    "qwen2": {},
    "qwen3": {"head_dim": 32},
    "gemma3": {"head_dim": 32, "sliding_window": 8},
    "gemma2": {"head_dim": 32, "sliding_window": 8, "tie_word_embeddings": True},  # vLLM ties Gemma-2 always
    "phi3": {},
    "gemma": {"head_dim": 32},
    "granite": {"residual_multiplier": 0.5, "embedding_multiplier": 2.0, "logits_scaling": 1.5,
                "attention_multiplier": 0.2},
}

ARCHITECTURE_OF = {"llama3": "llama"}  # families that are a conftest architecture with a different config


def write_base(path, seed: int = 0, family: str = "llama", **overrides) -> str:
    """A tiny random model of `family` (a key of FAMILIES) with the test tokenizer, saved as a model folder."""
    tokenizer = make_tokenizer()
    model = make_model(ARCHITECTURE_OF.get(family, family), seed=seed, vocab_size=len(tokenizer),
                       **{**TINY, **FAMILIES[family], **overrides})
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return os.fspath(path)


def write_control_run(path, base_dir: str, interpolation: str, dial: float = 1.0, seed: int = 1,
                      expanded_layers=EXPANDED, expand_type: str = "concat") -> str:
    """A trained tiny Control run as `controlllm train` leaves it: the delta, its config and a
    run_config.json naming the base. Every trainable tensor (copies and, trained here, the
    interpolators) is moved as training would move it, so the branches and the gates differ."""
    from transformers import AutoModelForCausalLM

    from controlllm import ControlConfig, get_control_model

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = ControlConfig(interpolation=interpolation, expanded_layers=list(expanded_layers), train_interpolation=True,
                           interpolation_init=0.4, expand_type=expand_type)
    model = get_control_model(base, config)
    perturb_trainable(model, scale=0.05, seed=seed)
    if interpolation in ("dlerp", "dlerp_in"):
        with torch.no_grad():  # gates that really vary per token
            for block in model.control_blocks.values():
                if not hasattr(block, "interpolator"):
                    continue  # a stack block
                block.interpolator.gate.weight.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(seed))
    model.set_dial(dial)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    with open(os.path.join(path, "run_config.json"), "w") as f:
        json.dump({"model": base_dir, "method": "control"}, f)
    return os.fspath(path)


def prompts(vocab: int, lengths=(3, 9, 17, 30, 5), seed: int = 0) -> list[list[int]]:
    """Token-id prompts of different lengths (the last two share a prefix with the first ones)."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    out.append(out[3][:12] + out[1][:4])  # a prefix shared with another prompt: cached blocks are reused
    return out


@torch.no_grad()
def reference(model, prompt_ids: list[list[int]], max_tokens: int) -> list[dict]:
    """transformers' answers per prompt, without a cache: the log-prob of each prompt token given
    those before it, the greedy continuation and each greedy token's log-prob."""
    results = []
    for ids in prompt_ids:
        x = torch.tensor([ids])
        logp = torch.log_softmax(model(input_ids=x).logits[0].float(), dim=-1)
        prompt_lp = [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]
        tokens, token_lp = [], []
        seq = list(ids)
        for _ in range(max_tokens):
            step = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0, -1].float(), dim=-1)
            top = torch.topk(step, 2)
            token = int(top.indices[0])
            tokens.append(token)
            token_lp.append(float(step[token]))
            seq.append(token)
        results.append({"prompt_logprobs": prompt_lp, "tokens": tokens, "token_logprobs": token_lp})
    return results


def make_llm(folder: str, **kwargs):
    from vllm import LLM

    options = dict(dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=16, seed=0,
                   gpu_memory_utilization=0.9)
    options.update(kwargs)
    return LLM(folder, **options)


def served(llm, prompt_ids: list[list[int]], max_tokens: int) -> list[dict]:
    """vLLM's answers for all prompts in one batch, in the shape of `reference`."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=0, logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    results = []
    for ids, out in zip(prompt_ids, outputs):
        prompt_lp = [float(d[t].logprob) for t, d in zip(ids[1:], out.prompt_logprobs[1:])]
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        token_lp = [float(d[t].logprob) for t, d in zip(tokens, completion.logprobs)]
        results.append({"prompt_logprobs": prompt_lp, "tokens": tokens, "token_logprobs": token_lp})
    return results


def max_logprob_error(expected: list[dict], actual: list[dict]) -> float:
    """The largest |difference| of log-probs over every prompt token and every generated token."""
    worst = 0.0
    for e, a in zip(expected, actual):
        for key in ("prompt_logprobs", "token_logprobs"):
            assert len(e[key]) == len(a[key])
            worst = max([worst] + [abs(x - y) for x, y in zip(e[key], a[key])])
    return worst
