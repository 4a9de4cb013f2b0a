"""The run dashboard, drawn from hand-written metrics.jsonl files."""

import json
import math

import pytest

from controlllm.errors import CheckpointError
from controlllm.plots import layer_grid, plot_run, read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, steps=20, layers=(3, 7, 11), budget=False, evaluate=True, per_token=False):
    rows = []
    for step in range(1, steps + 1):
        r = {"step": step, "loss": 3.0 - 0.05 * step, "lm_loss": 2.99 - 0.05 * step,
             "alignment_loss": 1e-4 * step, "grad_norm": 1.0, "learning_rate": 1e-4}
        for k, i in enumerate(layers):
            r[f"w/{i}"] = 0.5 + 0.01 * step * (k + 1) / steps
            r[f"w_std/{i}"] = 0.05 * k if per_token else 0.0
            r[f"drift/{i}"] = 1e-5 * step * (k + 1)
            if budget:
                r[f"multiplier/{i}"] = 1.0 + 0.1 * step
        rows.append(r)
        if evaluate and step % 10 == 0:
            rows.append({"step": step, "eval_loss": 2.5, "eval_perplexity": math.exp(2.5), "eval_runtime": 1.0})
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_layer_grid_is_layers_by_steps(tmp_path):
    records = read_metrics(write_metrics(tmp_path / "run", steps=4))
    steps, layers, grid = layer_grid(records, "drift")
    assert steps == [1, 2, 3, 4] and layers == [3, 7, 11]
    assert grid[1][3] == pytest.approx(1e-5 * 4 * 2)
    assert layer_grid(records, "multiplier") == ([], [], [])


@pytest.mark.parametrize("budget,evaluate,per_token", [(False, True, False), (True, False, True)])
def test_plot_run_writes_a_png(tmp_path, budget, evaluate, per_token):
    run = write_metrics(tmp_path / "run", budget=budget, evaluate=evaluate, per_token=per_token)
    out = plot_run(run)
    assert out == str(run / "dashboard.png")
    data = (run / "dashboard.png").read_bytes()
    assert data.startswith(PNG) and len(data) > 10_000


def test_plot_run_without_per_layer_values(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n" + json.dumps({"step": 2, "loss": 2.0}))
    assert plot_run(run, tmp_path / "x" / "d.png").endswith("d.png")
    assert (tmp_path / "x" / "d.png").read_bytes().startswith(PNG)


def test_plot_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="metrics.jsonl"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\nnot json\n')
    with pytest.raises(ValueError, match=":2 is not a JSON record"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "eval_loss": 1}\n')
    with pytest.raises(ValueError, match="no training record"):
        plot_run(tmp_path)


def test_cli_plot(tmp_path, capsys):
    from controlllm.cli import main

    run = write_metrics(tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(run), "--output", str(tmp_path / "p.png")])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes().startswith(PNG)
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
