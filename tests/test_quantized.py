"""A quantised frozen branch (controlllm.quantize): Control LLM and QLoRA on a bitsandbytes 4-/8-bit base."""

import json
import os
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")

from controlllm import ControlConfig, ControlModel, get_control_model  # noqa: E402
from controlllm.cli import main as cli_main  # noqa: E402
from controlllm.errors import CheckpointError, UsageError, UserError  # noqa: E402
from controlllm.merge import merge_fidelity  # noqa: E402
from controlllm.model import FINGERPRINT_KEY, _frozen_parts_fingerprint, _whole_fingerprint, is_trainable_key  # noqa: E402


def _frozen_fingerprint(model):
    return _whole_fingerprint(_frozen_parts_fingerprint(model.base_model))
from controlllm.quantize import (QuantizationError, dequantized_copy, is_quantized_linear,  # noqa: E402
                                 quantization_of, quantize_model)
from controlllm.training.train import TrainConfig, prepare_model, train  # noqa: E402

from conftest import batch, clone, make_model, make_tokenizer, perturb_trainable  # noqa: E402

MODES = ["4bit", "8bit"]
FAST = dict(max_steps=4, batch_size=2, seq_len=32, save_steps=2, logging_steps=1, progress=False, lr=1e-3)


def logits(model, ids, mask, grad=False):
    with torch.set_grad_enabled(grad):
        return model(input_ids=ids, attention_mask=mask).logits.detach()


def frozen_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the frozen model (quantised bytes and their quantisation state included),
    keyed as in the base model without blocks."""
    state = {}
    for name, tensor in model.state_dict().items():
        if is_trainable_key(name):  # the copies, interpolators and the blocks' budget state
            continue
        state[name.replace(".base_layer.", ".")] = torch.Tensor(tensor.detach()).clone()
    return state


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: biases on q, k, v
def test_expanded_model_at_init_is_exactly_the_quantized_base(arch, mode):
    full = make_model(arch)
    reference = quantize_model(clone(full), mode)
    model = get_control_model(clone(full), ControlConfig(num_expanded_layers=2, interpolation="dlerp",
                                                         train_interpolation=True, quantize_base=mode))
    ids, mask = batch(left_pad=3)
    for training in (False, True):
        model.train(training)
        reference.train(training)
        assert torch.equal(logits(model, ids, mask, grad=training), logits(reference, ids, mask, grad=training))
    # ... the quantised base, not the full-precision model it came from
    assert not torch.equal(logits(model.eval(), ids, mask), logits(full, ids, mask))
    for block in model.blocks.values():
        frozen = [m for m in block.base_layer.modules() if is_quantized_linear(m)]
        copies = [m for m in block.expanded_layer.modules() if isinstance(m, nn.Linear)]
        assert len(frozen) == 7 and len(copies) == 7 and not any(is_quantized_linear(m) for m in copies)
        assert all(m.weight.requires_grad and m.weight.dtype == torch.float32 for m in copies)
    # embeddings and LM head stay full precision
    assert type(model.base_model.lm_head) is nn.Linear and quantization_of(model.base_model) == mode


def test_bf16_copies_are_built_in_the_training_dtype():
    full = make_model("llama").to(torch.bfloat16)
    reference = quantize_model(clone(full), "4bit")
    model = get_control_model(clone(full), ControlConfig(num_expanded_layers=1, quantize_base="4bit"))
    copy = next(iter(model.blocks.values())).expanded_layer
    assert copy.mlp.down_proj.weight.dtype == torch.bfloat16
    ids, mask = batch()
    assert torch.equal(logits(model, ids, mask), logits(reference, ids, mask))


@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_copies_below_frozen_quantized_layers(mode):
    model = get_control_model(make_model("llama"), ControlConfig(expanded_layers=[0, 3], quantize_base=mode))
    model.train()
    ids, mask = batch()
    perturb_trainable(model)
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    lower = model.blocks[0].expanded_layer.self_attn.q_proj.weight.grad
    assert lower is not None and lower.abs().sum() > 0  # through the quantised layers 1, 2 and 3


@pytest.mark.parametrize("mode", MODES)
def test_training_keeps_the_quantized_weights_bit_identical(tmp_path, tiny_model_dir, text_file, mode):
    from controlllm.assets import load_pretrained

    result = train(TrainConfig(model=str(tiny_model_dir), data=str(text_file), output=str(tmp_path / "run"),
                               quantize_base=mode, **FAST))
    trained = result.model
    assert isinstance(trained, ControlModel) and trained.quantization == mode
    expected = frozen_state(quantize_model(load_pretrained(str(tiny_model_dir))[0], mode))
    after = frozen_state(trained.base_model)
    assert after.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(after[name], value), name
    block = trained.blocks[3]
    start = dequantized_copy(block.base_layer).state_dict()
    moved = [k for k, v in block.expanded_layer.state_dict().items() if not torch.equal(v, start[k])]
    assert moved  # the copies trained
    saved = json.load(open(os.path.join(result.final, "control_config.json")))
    assert saved["control_config"]["quantize_base"] == mode
    assert saved["base_model"][FINGERPRINT_KEY] == _frozen_fingerprint(trained)

    # merge: into the dequantised base, the weights the copies were trained against (a plain full-precision
    # model; --dequantize is accepted and changes nothing)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["merge", "--model", str(tmp_path / "run"), "--output", str(tmp_path / "merged")])
    assert exit_info.value.code == 0
    merged, _ = load_pretrained(str(tmp_path / "merged"))
    assert not any(is_quantized_linear(m) for m in merged.modules())
    assert len(merged.model.layers) == 4


@pytest.mark.parametrize("mode", MODES)
def test_delta_reloaded_onto_the_same_quantized_base_reproduces_the_logits(tmp_path, mode):
    model = get_control_model(make_model("llama"), ControlConfig(num_expanded_layers=2, interpolation="dlerp",
                                                                 train_interpolation=True, quantize_base=mode))
    perturb_trainable(model)
    model.save_pretrained(tmp_path / "delta")
    ids, mask = batch(left_pad=2)
    expected = logits(model.eval(), ids, mask)
    # from the full-precision base (quantised again on load) and from a base already quantised
    for base in (make_model("llama"), quantize_model(make_model("llama"), mode)):
        loaded = ControlModel.from_pretrained(base, tmp_path / "delta").eval()
        assert loaded.quantization == mode
        assert torch.equal(logits(loaded, ids, mask), expected)
    # another base: the fingerprint of the quantised frozen layers differs
    with pytest.raises(CheckpointError, match="frozen weights"):
        ControlModel.from_pretrained(make_model("llama", seed=5), tmp_path / "delta")


def test_fingerprint_covers_the_quantized_bytes_and_state():
    model = get_control_model(make_model("llama"), ControlConfig(num_expanded_layers=1, quantize_base="4bit"))
    first = _frozen_fingerprint(model)
    assert first == _frozen_fingerprint(model)
    layer = next(iter(model.blocks.values())).base_layer.mlp.up_proj
    with torch.no_grad():
        layer.weight.quant_state.absmax[0] += 1  # a scale, not the packed weight itself
    assert _frozen_fingerprint(model) != first


@pytest.mark.parametrize("mode", MODES)
def test_merge_is_refused_unless_dequantized_explicitly(mode):
    full = make_model("llama")
    reference = quantize_model(clone(full), mode)
    model = get_control_model(clone(full), ControlConfig(num_expanded_layers=2, quantize_base=mode))
    with pytest.raises(QuantizationError, match=r"quantised \(" + mode + r"\).*dequantize=True"):
        model.merge_and_unload()
    ids, mask = batch()
    merged = clone(model).merge_and_unload(dequantize=True)
    assert not any(is_quantized_linear(m) for m in merged.modules())
    assert torch.equal(logits(merged, ids, mask), logits(reference, ids, mask))  # untrained: the quantised base
    perturb_trainable(model, scale=0.01)
    report = merge_fidelity(model, ids, mask, dequantize=True)
    assert report["kl_mean"] < 1e-2 and report["top1_agreement"] > 0.9


def test_dial_in_weights_mode_starts_from_the_dequantized_copy():
    from controlllm.dial import Dial

    full = make_model("llama")
    reference = quantize_model(clone(full), "8bit")
    model = get_control_model(full, ControlConfig(num_expanded_layers=2, quantize_base="8bit"))
    perturb_trainable(model)
    ids, mask = batch()
    Dial(model, mode="weights").set(0.0)
    assert torch.equal(logits(model, ids, mask), logits(reference, ids, mask))


def test_resume_reaches_the_same_weights_on_a_quantized_base(tmp_path, text_file):
    from safetensors.torch import load_file

    tokenizer = make_tokenizer()
    cfg = dict(data=str(text_file), quantize_base="4bit", interpolation="dlerp", train_interpolation=True, **FAST)
    train(TrainConfig(output=str(tmp_path / "straight"), **cfg), model=make_model("llama", vocab_size=len(tokenizer)),
          tokenizer=tokenizer)

    doomed = make_model("llama", vocab_size=len(tokenizer))
    forwards = []

    def die_in_step_four(module, args, kwargs):
        forwards.append(1)
        if len(forwards) == 4:  # checkpoint-2 is on disk, step 3 is lost
            raise RuntimeError("killed")

    doomed.register_forward_pre_hook(die_in_step_four, with_kwargs=True)
    with pytest.raises(RuntimeError, match="killed"):
        train(TrainConfig(output=str(tmp_path / "killed"), **cfg), model=doomed, tokenizer=tokenizer)
    assert (tmp_path / "killed" / "checkpoint-2").is_dir() and not (tmp_path / "killed" / "final").exists()
    train(TrainConfig(output=str(tmp_path / "killed"), resume=True, **cfg),
          model=make_model("llama", vocab_size=len(tokenizer)), tokenizer=tokenizer)
    a = load_file(tmp_path / "straight" / "final" / "control_model.safetensors")
    b = load_file(tmp_path / "killed" / "final" / "control_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("mode", MODES)
def test_qlora_trains_lora_on_the_quantized_base(tmp_path, tiny_model_dir, text_file, mode):
    from controlllm.assets import load_pretrained
    from controlllm.runs import load_model

    base, tokenizer = load_pretrained(str(tiny_model_dir))
    reference = quantize_model(clone(base), mode)
    cfg = TrainConfig(model=str(tiny_model_dir), data=str(text_file), output=str(tmp_path / "run"), method="lora",
                      quantize_base=mode, **FAST)
    ids, mask = batch(vocab=len(tokenizer))
    lora = prepare_model(clone(base), cfg)
    assert torch.equal(logits(lora, ids, mask), logits(reference, ids, mask))  # LoRA's B = 0: the quantised base
    result = train(cfg)
    peft_model = result.model
    layer = peft_model.base_model.model.model.layers[1].self_attn.q_proj
    assert is_quantized_linear(layer.base_layer) and "bnb" in type(layer).__module__
    expected = frozen_state(reference)
    after = {k.replace("base_model.model.", "", 1).replace(".base_layer.", "."): torch.Tensor(v.detach())
             for k, v in peft_model.state_dict().items() if "lora_" not in k}
    for name, value in expected.items():
        assert torch.equal(after[name], value), name
    loaded, _, kind = load_model(str(tmp_path / "run"))  # the adapter goes back onto the quantised base
    assert kind == "lora" and quantization_of(loaded) == mode
    assert torch.equal(logits(loaded.eval(), ids, mask), logits(peft_model.eval(), ids, mask))


def test_bad_values_and_combinations_get_one_clear_error(tmp_path, text_file, monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"quantize_base='3bit' is not supported; allowed: None, '4bit', '8bit'"):
        ControlConfig(quantize_base="3bit")
    with pytest.raises(ValueError, match="expand_type='concat'.*not 'stack'"):
        ControlConfig(expand_type="stack", quantize_base="4bit")
    with pytest.raises(ValueError, match="not 'hybrid'"):
        ControlConfig(expand_type="hybrid", quantize_base="8bit")
    with pytest.raises(ValueError, match="not 'stack'"):
        TrainConfig(data="x", method="stack", quantize_base="4bit")
    for method in ("full", "freeze"):
        with pytest.raises(ValueError, match=f"method '{method}' trains the base's own weights"):
            TrainConfig(data="x", method=method, quantize_base="4bit")
    # the flag derives from the dataclass field; a bad value is a one-line usage error
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--data", str(text_file), "--quantize-base", "2bit"])
    assert exit_info.value.code == 2
    assert "controlllm: error: ControlConfig.quantize_base='2bit' is not supported" in capsys.readouterr().err
    # a quantised model handed over without saying so
    with pytest.raises(QuantizationError, match="quantize_base='4bit'"):
        get_control_model(quantize_model(make_model("llama"), "4bit"), ControlConfig())
    with pytest.raises(QuantizationError, match="already quantised to 4bit"):
        get_control_model(quantize_model(make_model("llama"), "4bit"), ControlConfig(quantize_base="8bit"))
    tokenizer = make_tokenizer()
    run = dict(data=str(text_file), output=str(tmp_path / "run"), quantize_base="4bit", **FAST)
    # FSDP
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UsageError, match="does not work with FSDP"):
        train(TrainConfig(**run), model=make_model("llama", vocab_size=len(tokenizer)), tokenizer=tokenizer)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    # a platform without bitsandbytes
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(UserError, match=r"needs bitsandbytes \(bitsandbytes>=0.50,<0.51.*pip install"):
        train(TrainConfig(**run), model=make_model("llama", vocab_size=len(tokenizer)), tokenizer=tokenizer)
    with pytest.raises(QuantizationError, match="needs bitsandbytes"):
        get_control_model(make_model("llama"), ControlConfig(quantize_base="8bit"))
    assert not (tmp_path / "run").exists()



def test_a_command_starts_quietly_with_bitsandbytes_loaded():
    """bitsandbytes (imported by peft) logs 'Failed to load CPU gemm_4bit_forward from kernels-community' on
    AVX512-BF16 CPUs; that message is dropped at its logger, so `controlllm --help` and a command that loads
    peft (a LoRA model is prepared) print nothing on stderr. The record is emitted through the same logger
    after peft loaded bitsandbytes, as it is on such a CPU."""
    import subprocess

    script = (
        "import logging, sys, transformers\n"
        "import controlllm.cli as cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit as err:\n    assert err.code in (0, None), err.code\n"
        "from controlllm.training.train import TrainConfig, prepare_model\n"
        "config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,"
        " num_attention_heads=2, num_key_value_heads=1)\n"
        "prepare_model(transformers.LlamaForCausalLM(config), TrainConfig(model='m', data='d', method='lora', "
        "output='o'))\n"
        "assert 'bitsandbytes' in sys.modules\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('Failed to load CPU gemm_4bit_forward from "
        "kernels-community: %s. Please make sure you already `pip install kernels`', \"No module named 'kernels'\")\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    print(done.stderr)
    assert done.returncode == 0
    assert "usage" in done.stdout
    assert done.stderr == ""


def test_quiet_start_drops_only_the_optional_kernel_message():
    import logging

    from controlllm.quiet import BITSANDBYTES_CPU_LOGGER, SilenceOptionalKernel

    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    assert any(isinstance(f, SilenceOptionalKernel) for f in logger.filters)

    def record(msg):
        return logging.LogRecord(BITSANDBYTES_CPU_LOGGER, logging.WARNING, __file__, 1, msg, ("x",), None)

    assert not logger.filter(record("Failed to load CPU gemm_4bit_forward from kernels-community: %s."))
    assert logger.filter(record("Some other bitsandbytes warning: %s"))
