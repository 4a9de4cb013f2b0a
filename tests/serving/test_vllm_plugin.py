"""vLLM serves a Control run unmerged, exactly: its engine (CPU backend, paged KV caches, batched
prompts of different lengths) against transformers' unmerged ControlModel.

Needs the serving environment (`make test-serving`); skipped where vLLM is not installed.
"""

from __future__ import annotations

import gc

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

import vllm_harness as H  # noqa: E402
from controlllm.runs import load_model  # noqa: E402
from controlllm.serving.vllm_export import ARCHITECTURE, export_run_for_vllm  # noqa: E402

MAX_TOKENS = 8
# fp32 on both sides; the kernels differ (vLLM's CPU attention and fused norms against PyTorch's),
# so log-probs agree to rounding, measured at ~1e-6. Greedy tokens must be identical.
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return H.write_base(tmp_path_factory.mktemp("base"))


def _attention_layers(model) -> list[tuple[str, int]]:
    """(module name, address of its KV cache) of each attention layer of the served model."""
    from vllm.model_executor.layers.attention import Attention

    caches = []
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            cache = module.kv_cache[0] if isinstance(module.kv_cache, (list, tuple)) else module.kv_cache
            caches.append((name, cache.data_ptr()))  # views of one allocation: distinct starts
    return caches


def _engine_answers(folder: str, prompt_ids):
    llm = H.make_llm(folder)
    try:
        (layers,) = llm.apply_model(_attention_layers)
        return H.served(llm, prompt_ids, MAX_TOKENS), layers
    finally:
        del llm
        gc.collect()


def test_entry_point_registers_the_model():
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what every vLLM process does at start: reads the vllm.general_plugins entry points
    assert ARCHITECTURE in ModelRegistry.get_supported_archs()


CASES = {
    "base": None,                      # the plain base model, served by the plugin with no expanded layer
    "lerp": ("lerp", 1.0),
    "dlerp": ("dlerp", 1.0),
    "dlerp_in-dial0.6": ("dlerp_in", 0.6),
    "slerp-dial0.5": ("slerp", 0.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_vllm_equals_transformers(case, base_dir, tmp_path):
    spec = CASES[case]
    source = base_dir if spec is None else H.write_control_run(tmp_path / "run", base_dir, *spec)
    model, tokenizer, kind = load_model(source)
    assert kind == ("base" if spec is None else "control")
    model.eval()
    prompt_ids = H.prompts(len(tokenizer))
    expected = H.reference(model, prompt_ids, MAX_TOKENS)
    if spec is not None:  # the delta is trained: the served model must differ from the base
        base_model, _, _ = load_model(base_dir)
        assert H.reference(base_model.eval(), prompt_ids[:1], 1)[0]["prompt_logprobs"] != expected[0]["prompt_logprobs"]
    info = export_run_for_vllm(source, tmp_path / "served")
    assert info["architecture"] == ARCHITECTURE
    actual, attention = _engine_answers(info["output"], prompt_ids)
    # One attention layer, hence one paged KV cache, per frozen layer and per copy, each its own.
    copies = [] if spec is None else [f"model.expanded_layers.{4 + j}.self_attn.attn" for j in range(len(H.EXPANDED))]
    assert [name for name, _ in attention] == [f"model.layers.{i}.self_attn.attn" for i in range(4)] + copies
    assert len({ptr for _, ptr in attention}) == len(attention)
    for e, a in zip(expected, actual):
        assert a["tokens"] == e["tokens"]
    error = H.max_logprob_error(expected, actual)
    print(f"{case}: max |log-prob difference| {error:.3g} over {sum(len(p) for p in prompt_ids)} prompt tokens "
          f"and {len(prompt_ids) * MAX_TOKENS} generated")
    assert error <= LOGPROB_ATOL
