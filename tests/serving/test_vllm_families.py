"""vLLM serves a Control run of each family it has, unmerged and exactly, on vLLM's own decoder layers of
the family: concat (Control LLM), stack (LLaMA-Pro) and hybrid runs, against transformers' unmerged
ControlModel (`controlllm.runs.open_run(run).model()`). Greedy tokens must be identical and log-probs
agree to rounding.

Needs the serving environment (`make test-serving`); skipped where vLLM is not installed.
"""

from __future__ import annotations

import gc
import json

import pytest

pytest.importorskip("vllm")

import vllm_harness as H  # noqa: E402
from controlllm.runs import open_run  # noqa: E402
from controlllm.serving.vllm_export import CONTROL_KEY, export_run_for_vllm, served_architecture  # noqa: E402

MAX_TOKENS = 6
LOGPROB_ATOL = 1e-4
# family -> (transformers architecture, the layer class vLLM must run for it)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaDecoderLayer"),
    "llama3": ("LlamaForCausalLM", "LlamaDecoderLayer"),
    "mistral": ("MistralForCausalLM", "MistralDecoderLayer"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2DecoderLayer"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3DecoderLayer"),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3DecoderLayer"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2DecoderLayer"),
    "phi3": ("Phi3ForCausalLM", "LlamaDecoderLayer"),
    "gemma": ("GemmaForCausalLM", "GemmaDecoderLayer"),
    "granite": ("GraniteForCausalLM", "GraniteDecoderLayer"),
}
# expand_type -> (interpolation, dial): concat with a per-token gate under a dial, stack at s = 1,
# hybrid (layer 1 stack, layer 3 concat) with a dial that scales both kinds.
CASES = {
    "concat": ("dlerp", 0.6),
    "stack": ("lerp", 1.0),
    "hybrid": ("lerp", 0.7),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_base(request, tmp_path_factory):
    return request.param, H.write_base(tmp_path_factory.mktemp(f"base-{request.param}"), family=request.param)


def _layer_classes(model) -> list[tuple[str, str]]:
    """(module name, class MRO names) of each decoder layer of the served model, frozen and copies."""
    out = []
    for name, module in model.named_modules():
        if name.startswith(("model.layers.", "model.expanded_layers.")) and name.count(".") == 2:
            out.append((name, [c.__name__ for c in type(module).__mro__]))
    return out


@pytest.mark.parametrize("expand_type", list(CASES))
def test_family_served_exactly(family_base, expand_type, tmp_path):
    family, base_dir = family_base
    architecture, layer_class = FAMILIES[family]
    interpolation, dial = CASES[expand_type]
    run = H.write_control_run(tmp_path / "run", base_dir, interpolation, dial=dial, expand_type=expand_type)
    model, tokenizer = open_run(run).model()
    prompt_ids = H.prompts(len(tokenizer))
    expected = H.reference(model, prompt_ids, MAX_TOKENS)
    base_model, _ = open_run(base_dir).model()  # the run is trained: served tokens must not be the base's
    assert H.reference(base_model, prompt_ids[:1], 1)[0]["prompt_logprobs"] != expected[0]["prompt_logprobs"]

    info = export_run_for_vllm(run, tmp_path / "served")
    config = json.loads((tmp_path / "served" / "config.json").read_text())
    assert config["architectures"] == [served_architecture(architecture)]
    kinds = {"concat": ["concat", "concat"], "stack": ["stack", "stack"], "hybrid": ["stack", "concat"]}[expand_type]
    assert config[CONTROL_KEY]["expand_types"] == kinds and info[CONTROL_KEY]["expand_types"] == kinds

    llm = H.make_llm(info["output"])
    try:
        (layers,) = llm.apply_model(_layer_classes)
        actual = H.served(llm, prompt_ids, MAX_TOKENS)
    finally:
        del llm
        gc.collect()
    # vLLM's own layer class of the family for every frozen layer and every copy.
    assert [name for name, _ in layers] == [f"model.layers.{i}" for i in range(4)] + \
        [f"model.expanded_layers.{4 + j}" for j in range(len(H.EXPANDED))]
    assert all(layer_class in mro for _, mro in layers), layers
    assert [name for name, mro in layers if mro[0].startswith("ControlSite")] == \
        [f"model.layers.{i}" for i in H.EXPANDED]
    for e, a in zip(expected, actual):
        assert a["tokens"] == e["tokens"]
    error = H.max_logprob_error(expected, actual)
    print(f"{family} {expand_type}: max |log-prob difference| {error:.3g}, greedy tokens equal "
          f"({len(prompt_ids)} prompts x {MAX_TOKENS})")
    assert error <= LOGPROB_ATOL
