"""The lm-evaluation-harness model "controlllm" scores a local task (a YAML over a local JSON file,
offline) with a real trained Control delta, and agrees with `controlllm eval`'s scorer item by item."""

import json
import os

import pytest
import torch

from conftest import make_model, make_tokenizer, perturb_trainable
from controlllm import ControlConfig, ControlModel, get_control_model
from controlllm.evaluation import MCItem, loglikelihood, score_multiple_choice

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed")

ITEMS = [
    MCItem("Question: What is the capital of France?\nAnswer:", ["Paris", "Madrid", "the lazy dog"], 0, "q0"),
    MCItem("Question: How are you today?\nAnswer:", ["I am fine, thank you", "Paris", "brown"], 0, "q1"),
    MCItem("Question: What is the capital of Spain?\nAnswer:", ["France", "Madrid", "a fox", "today"], 1, "q2"),
    MCItem("Question: Which animal jumps over the dog?\nAnswer:", ["the lazy dog", "the quick brown fox"], 1, "q3"),
    MCItem("Question: En el principio creo Dios\nAnswer:", ["los cielos y la tierra", "thank you", "Hello"], 0, "q4"),
]
TASK = """task: controlllm_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def base_and_delta(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    tokenizer = make_tokenizer()
    base = make_model("llama", vocab_size=len(tokenizer))
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    model = get_control_model(base, ControlConfig(num_expanded_layers=2, interpolation="dlerp"))
    perturb_trainable(model, scale=0.2)  # a delta that changes the scores, as training would
    model.save_pretrained(root / "delta")
    return root / "base", root / "delta", tokenizer


def test_plugin_scores_a_local_task_like_controlllm_eval(tmp_path, base_and_delta, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base_dir, delta_dir, tokenizer = base_and_delta
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"context": i.context, "choices": i.choices, "gold": i.gold}) + "\n"
                            for i in ITEMS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "controlllm_local_mc.yaml").write_text(TASK.format(data=data))

    import controlllm.integrations.lm_eval  # noqa: F401  (registers the "controlllm" model)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model="controlllm",
                          model_args=f"pretrained={base_dir},control={delta_dir},device=cpu,dtype=float32",
                          tasks=["controlllm_local_mc"], task_manager=TaskManager(include_path=str(tasks)),
                          batch_size=4, log_samples=True)
    theirs = out["results"]["controlllm_local_mc"]
    samples = sorted(out["samples"]["controlllm_local_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(ITEMS)

    from transformers import AutoModelForCausalLM

    model = ControlModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), delta_dir).eval()
    ours = score_multiple_choice(model, tokenizer, ITEMS, progress=False)
    assert theirs["acc,none"] == pytest.approx(ours["acc"]) and theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    # Item by item: every choice's log-likelihood, with the delta and not without it.
    requests = [r for item in ITEMS for r in item.requests()]
    mine = [ll for ll, _ in loglikelihood(model, tokenizer, requests, progress=False)]
    harness = [float(resp[0][0]) for s in samples for resp in s["resps"]]
    assert harness == pytest.approx(mine, abs=1e-4)
    with model.disable_control():
        plain = [ll for ll, _ in loglikelihood(model, tokenizer, requests, progress=False)]
    assert max(abs(a - b) for a, b in zip(harness, plain)) > 1e-2
