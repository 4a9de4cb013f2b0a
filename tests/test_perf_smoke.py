"""Smoke test of the performance benchmark's pieces on a tiny Llama (the benchmark itself is `make bench-perf`)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "perf"))
common = pytest.importorskip("common")
report = pytest.importorskip("report")

TINY = dict(common.SMOLLM2_135M, vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("spec", common.methods_for(4), ids=lambda s: s["label"])
def test_every_method_trains_one_step(spec):
    model = common.prepare(common.build_base(TINY), spec)
    opt = common.make_optimizer(model)
    ids, mask = common.batch(TINY["vocab_size"], 2, 16)
    before = [p.detach().clone() for p in common.trainable(model)]
    assert common.train_step(model, opt, ids, mask) > 0
    assert common.optimizer_state_bytes(opt) > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, common.trainable(model)))


def test_flop_model_orders_methods():
    shape, tokens = common.SMOLLM2_135M, 1024
    flops = {name: report.linear_flops(shape, spec, tokens) for name, spec in
             {"full": dict(method="full"), "lora": dict(method="lora"), "k1": dict(method="control", k=1),
              "k7": dict(method="control", k=7), "k30": dict(method="control", k=30)}.items()}
    assert flops["k1"] < flops["lora"] < flops["k7"] < flops["full"] < flops["k30"]
    assert flops["k7"] / flops["full"] == pytest.approx(0.81, abs=0.01)


def test_peak_memory_readings():
    assert common.rss_bytes() > 0
    assert common.vm_hwm_bytes() >= common.rss_bytes() or not common.reset_peak_rss()


def test_memory_report_renders_without_a_full_fine_tuning_row(tmp_path):
    import importlib.util
    import json

    root = os.path.join(os.path.dirname(__file__), "..")
    spec = importlib.util.spec_from_file_location("memory_run", os.path.join(root, "benchmarks", "memory", "run.py"))
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    with open(os.path.join(root, "benchmarks", "results", "memory.json")) as f:
        data = json.load(f)
    data["results"] = [r for r in data["results"] if r["method"] != "full"]  # e.g. --quick --methods lora,qlora
    memory.render(data, str(tmp_path))
    text = (tmp_path / "memory.md").read_text()
    lora = next(line for line in text.splitlines() if line.startswith("| LoRA"))
    assert "| - |" in lora  # no ratio to a row that was not measured
