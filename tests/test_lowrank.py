"""Low-rank copies (`ControlConfig.copy_rank`): the frozen layer shared, plus a trainable (alpha / r) B A."""

import copy
import json

import pytest
import torch
from torch import nn

from conftest import batch, make_model, perturb_trainable
from controlllm import ControlConfig, ControlModel
from controlllm.dial import Dial
from controlllm.lowrank import LowRankLinear, SharedModule, is_low_rank
from controlllm.merge import merge_fidelity
from controlllm.model import get_control_model, read_delta

INTERPOLATIONS = ["lerp", "dlerp", "dlerp_in", "slerp"]
RANK, ALPHA = 4, 8.0


def low_rank(arch="llama", quantize=None, **fields):
    fields = {"num_expanded_layers": 2, "copy_rank": RANK, "copy_alpha": ALPHA, **fields}
    return get_control_model(make_model(arch), ControlConfig(quantize_base=quantize, **fields))


@torch.no_grad()
def logits(model, ids, mask=None):
    model.eval()
    return model(input_ids=ids, attention_mask=mask).logits


def quantized_base(arch="llama", mode="4bit"):
    from controlllm.quantize import quantize_model

    return quantize_model(make_model(arch), mode)


def factor_count(model):
    """r (in + out) over every linear of every copy, computed from the frozen layers' shapes."""
    total = 0
    for block in model.control_blocks.values():
        for module in block.base_layer.modules():
            if hasattr(module, "in_features") and hasattr(module, "out_features"):
                total += RANK * (module.in_features + module.out_features)
    return total


# ------------------------------------------------------------------------------------ initialisation
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3"])
def test_low_rank_model_is_the_base_bit_for_bit_at_init(arch, interpolation):
    ids, mask = batch(left_pad=3)
    reference = logits(make_model(arch), ids, mask)
    model = low_rank(arch, interpolation=interpolation, train_interpolation=True)
    assert torch.equal(logits(model, ids, mask), reference)
    for block in model.control_blocks.values():
        assert is_low_rank(block.expanded_layer)
        branch = block.expanded_layer
        # The copy holds no weight of its own: its norms and linears are the frozen layer's modules.
        for module in branch.modules():
            if isinstance(module, (LowRankLinear, SharedModule)):
                assert module.frozen is block.base_layer.get_submodule(module.frozen_name)


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_low_rank_on_a_quantised_base_is_the_quantised_base_and_copies_no_weight(mode, interpolation):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    ids, mask = batch(left_pad=2)
    reference = logits(quantized_base(mode=mode), ids, mask)
    model = low_rank(quantize=mode, interpolation=interpolation)
    assert torch.equal(logits(model, ids, mask), reference)
    kind = bnb.nn.Linear4bit if mode == "4bit" else bnb.nn.Linear8bitLt
    for block in model.control_blocks.values():
        linears = [m for m in block.expanded_layer.modules() if isinstance(m, LowRankLinear)]
        assert len(linears) == 7
        assert all(isinstance(m.frozen, kind) for m in linears)  # the quantised layer itself
        assert not [m for m in block.expanded_layer.modules() if type(m) is nn.Linear]
        assert {n.rsplit(".", 1)[-1] for n, _ in block.expanded_layer.named_parameters()} == {"lora_A", "lora_B"}


# ------------------------------------------------------------------------------------- trainables
@pytest.mark.parametrize("quantize", [None, "4bit"])
def test_only_the_factors_train_and_only_they_get_optimizer_state(quantize):
    if quantize:
        pytest.importorskip("bitsandbytes")
    base_params = sum(p.numel() for p in (quantized_base() if quantize else make_model()).parameters())
    model = low_rank(quantize=quantize, interpolation="dlerp", train_interpolation=True)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    gates = {n: p for n, p in trainable.items() if ".interpolator." in n}
    factors = {n: p for n, p in trainable.items() if ".interpolator." not in n}
    assert factors and all(n.endswith((".lora_A", ".lora_B")) for n in factors)
    assert sum(p.numel() for p in factors.values()) == factor_count(model)
    # Every parameter of the model is the base's (once) or a factor or a gate: no copy's weights.
    total = sum(p.numel() for p in model.parameters())
    assert total == base_params + sum(p.numel() for p in trainable.values())
    # One optimizer step: states exist for the factors and gates alone.
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    ids, mask = batch()
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    optimizer.step()
    states = sum(t.numel() for s in optimizer.state.values() for k, t in s.items() if k != "step")
    assert states == 2 * sum(p.numel() for p in trainable.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    # The B factors moved: the model now differs from the base.
    assert any(float(p.detach().abs().max()) > 0 for n, p in factors.items() if n.endswith("lora_B"))


def test_copy_rank_is_validated():
    from controlllm.training.options import TrainConfig

    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="copy_rank"):
            ControlConfig(copy_rank=bad)
    with pytest.raises(ValueError, match="concat"):
        ControlConfig(copy_rank=4, expand_type="stack")
    with pytest.raises(ValueError, match="copy_rank too"):
        ControlConfig(copy_alpha=8.0)
    with pytest.raises(ValueError, match="copy_alpha"):
        ControlConfig(copy_rank=4, copy_alpha=0.0)
    assert ControlConfig(copy_rank=4).copy_scale_alpha() == 8.0 and ControlConfig().copy_scale_alpha() is None
    with pytest.raises(ValueError, match="--method control"):
        TrainConfig(data="x", method="lora", copy_rank=4)
    assert TrainConfig(data="x", copy_rank=4, copy_alpha=4.0).control_config(4).copy_alpha == 4.0


# ---------------------------------------------------------------------------------- save and load
@pytest.mark.parametrize("quantize", [None, "4bit"])
def test_save_load_round_trip_holds_only_factors_and_gates(tmp_path, quantize):
    if quantize:
        pytest.importorskip("bitsandbytes")
    model = low_rank(quantize=quantize, interpolation="dlerp", train_interpolation=True)
    perturb_trainable(model)
    ids, mask = batch(left_pad=2)
    trained = logits(model, ids, mask)
    model.save_pretrained(tmp_path)
    delta = read_delta(tmp_path)
    assert delta and all(k.endswith((".lora_A", ".lora_B", ".budget_multiplier", ".running_drift"))
                         or ".interpolator." in k for k in delta)
    assert sum(t.numel() for k, t in delta.items() if "lora_" in k) == factor_count(model)
    saved = json.loads((tmp_path / "control_config.json").read_text())["control_config"]
    assert saved["copy_rank"] == RANK and saved["copy_alpha"] == ALPHA
    loaded = ControlModel.from_pretrained(make_model(), tmp_path)
    assert torch.equal(logits(loaded, ids, mask), trained)


def test_generate_with_cache_equals_without(arch="llama"):
    model = low_rank(interpolation="dlerp")
    perturb_trainable(model, scale=0.2)
    ids, mask = batch(left_pad=3)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        plain = model.generate(ids, use_cache=False, **kwargs)
        base_out = low_rank(interpolation="dlerp").generate(ids, use_cache=True, **kwargs)
    assert torch.equal(cached, plain)
    assert not torch.equal(cached, base_out)  # the update takes part in generation


# ---------------------------------------------------------------------------------------- dial
@pytest.mark.parametrize("mode", ["output", "weights"])
@pytest.mark.parametrize("quantize", [None, "4bit"])
def test_dial_ends_are_the_base_and_the_trained_model(mode, quantize):
    if quantize:
        pytest.importorskip("bitsandbytes")
    ids, mask = batch(left_pad=2)
    base = logits(quantized_base() if quantize else make_model(), ids, mask)
    model = low_rank(quantize=quantize, interpolation="dlerp", train_interpolation=True)
    perturb_trainable(model)
    trained = logits(model, ids, mask)
    assert not torch.equal(trained, base)
    dial = Dial(model, mode=mode)
    dial.set(0.0)
    assert torch.equal(logits(model, ids, mask), base)
    half = logits(dial.set(0.5), ids, mask)
    assert not torch.equal(half, base) and not torch.equal(half, trained)
    dial.set(1.0)
    assert torch.equal(logits(model, ids, mask), trained)
    if mode == "weights":  # only the B factors move: s B A
        assert len(dial._params) == 7 * len(model.control_blocks) and all(k.endswith("lora_B") for k in dial._params)


# ---------------------------------------------------------------------------------------- merge
def dense_twin(model):
    """A full-copies ControlModel whose copies hold W_p + (alpha / r) B A: what the low-rank copies stand for."""
    config = copy.deepcopy(model.control_config)
    config.copy_rank = config.copy_alpha = None
    twin = get_control_model(make_model(), config)
    with torch.no_grad():
        for i, block in model.control_blocks.items():
            other = twin.control_blocks[i]
            other.interpolator.load_state_dict(block.interpolator.state_dict())
            for module in block.expanded_layer.modules():
                if isinstance(module, LowRankLinear):
                    target = other.expanded_layer.get_submodule(module.frozen_name)
                    target.weight.add_(module.delta_weight())
    return twin


def test_merge_is_exact_at_init_and_folds_like_the_equivalent_full_copies():
    ids, mask = batch(left_pad=2)
    base = logits(make_model(), ids, mask)
    assert torch.equal(logits(low_rank(interpolation="dlerp").merge_and_unload(), ids, mask), base)

    model = low_rank(interpolation="lerp", interpolation_init=0.4)
    perturb_trainable(model, scale=0.1)
    twin = dense_twin(model)
    # The low-rank copy computes what a full copy with W_e = W_p + (alpha / r) B A computes ...
    assert torch.allclose(logits(model, ids, mask), logits(twin, ids, mask), atol=1e-5, rtol=0)
    low, full = merge_fidelity(model, ids, mask), merge_fidelity(twin, ids, mask)
    # ... and folds to the same weights: the merge is the same approximation as full copies'.
    merged_low = model.merge_and_unload()
    merged_full = twin.merge_and_unload()
    for (n, a), (m, b) in zip(merged_low.state_dict().items(), merged_full.state_dict().items()):
        assert n == m and torch.allclose(a, b, atol=1e-6, rtol=0), n
    assert abs(low["kl_mean"] - full["kl_mean"]) <= 1e-6 + 1e-3 * full["kl_mean"]
    assert low["kl_mean"] > 0  # a real approximation after training, measured, not assumed exact
    print(f"merge fidelity after perturbation: low-rank {low}, full copies {full}")


def test_dense_state_is_the_equivalent_full_copy():
    from controlllm.lowrank import dense_state_dict

    model = low_rank()
    perturb_trainable(model, scale=0.1)
    twin = dense_twin(model)
    for i, block in model.control_blocks.items():
        dense = dense_state_dict(block.expanded_layer)
        full = twin.control_blocks[i].expanded_layer.state_dict()
        assert sorted(dense) == sorted(full)
        for key in full:
            assert torch.allclose(dense[key], full[key], atol=1e-6, rtol=0), key


def test_merge_on_a_4bit_base_dequantises_and_is_exact_at_init():
    pytest.importorskip("bitsandbytes")
    ids, mask = batch()
    base = logits(quantized_base(), ids, mask)
    model = low_rank(quantize="4bit")
    merged = model.merge_and_unload(dequantize=True)
    assert not any(type(m).__name__.startswith("Linear4bit") for m in merged.modules())
    assert torch.allclose(logits(merged, ids, mask), base, atol=1e-5, rtol=0)
    # After training: each folded weight is the dequantised weight plus w (alpha / r) B A.
    from controlllm.quantize import dequantized_weight

    model = low_rank(quantize="4bit", interpolation_init=0.4)
    perturb_trainable(model, scale=0.1)
    expected = {}
    for i, block in model.control_blocks.items():
        w = block.merge_weight()
        for m in block.expanded_layer.modules():
            if isinstance(m, LowRankLinear):
                expected[f"model.layers.{i}.{m.frozen_name}.weight"] = dequantized_weight(m.frozen).float() \
                    + w * m.delta_weight()
    merged = model.merge_and_unload(dequantize=True).state_dict()
    assert len(expected) == 14
    for name, weight in expected.items():
        assert torch.equal(merged[name], weight), name


def test_dequantize_keeps_the_copy_computing_the_same():
    pytest.importorskip("bitsandbytes")
    ids, mask = batch()
    model = low_rank(quantize="4bit")
    perturb_trainable(model)
    before = logits(model, ids, mask)
    model.dequantize()
    for block in model.control_blocks.values():  # the copy follows the frozen layer's new modules
        assert all(type(m.frozen) is nn.Linear for m in block.expanded_layer.modules() if isinstance(m, LowRankLinear))
    assert torch.allclose(logits(model, ids, mask), before, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------- training, stages, export
FAST = dict(max_steps=3, batch_size=2, seq_len=32, save_steps=3, logging_steps=1, progress=False, threads=1)


def test_train_a_second_stage_on_the_merged_result_and_export(tmp_path, tiny_model_dir, text_file, capsys):
    from controlllm.runs import load_as_base, load_model
    from controlllm.training.train import TrainConfig, train

    stage_a = tmp_path / "a"
    result = train(TrainConfig(data=str(text_file), output=str(stage_a), model=str(tiny_model_dir), method="control",
                               copy_rank=4, lr=1e-2, **FAST))
    model = result.model
    assert is_low_rank(next(iter(model.control_blocks.values())).expanded_layer)
    delta = read_delta(stage_a / "final")
    assert all("lora_" in k or ".interpolator." in k or k.endswith((".budget_multiplier", ".running_drift"))
               for k in delta)
    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    trained = logits(model, ids)
    loaded, _, kind = load_model(str(stage_a))
    assert kind == "control" and torch.equal(logits(loaded, ids), trained)
    folded = logits(copy.deepcopy(model).merge_and_unload(), ids)

    base_b, _, _ = load_as_base(str(stage_a))
    assert torch.equal(logits(base_b, ids), folded)
    stage_b = tmp_path / "b"
    result_b = train(TrainConfig(data=str(text_file), output=str(stage_b), model=str(stage_a), method="control",
                                 copy_rank=4, lr=1e-2, **FAST))
    with result_b.model.disable_control():
        assert torch.equal(logits(result_b.model, ids), folded)
    assert not torch.equal(logits(result_b.model, ids), folded)

    from controlllm.serving import llama_cpp

    if not (llama_cpp.tools_dir() / "convert_hf_to_gguf.py").is_file():
        pytest.skip("llama.cpp's converter is not installed")
    from controlllm.cli import main

    output = tmp_path / "out" / "run.gguf"
    with pytest.raises(SystemExit) as code:
        main(["export", "--model", str(stage_b), "--output", str(output)])
    assert code.value.code in (0, None), capsys.readouterr().err
    assert output.is_file() and output.stat().st_size > 0
