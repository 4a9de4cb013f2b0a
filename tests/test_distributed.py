"""DDP: two CPU processes (gloo) end with the weights of one process on the same global batch, and
a non-finite loss on one rank stops every rank with the same error."""

import os
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "dist_train.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# fp32 on CPU; the runs differ only in how the gradient sums are ordered (measured max |diff|:
# see docs/guide.md, Distributed training). AdamW's first steps amplify rounding a little.
TOLERANCE = 1e-5


def torchrun(port: int, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           SCRIPT, *map(str, args)]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("method", ["control"])
def test_ddp_two_ranks_match_one_process(tmp_path, text_file, method):
    proc = torchrun(29533, text_file, tmp_path / "ddp", method, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, SCRIPT, str(text_file), str(tmp_path / "one"), method, "4"], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1)]
    one = torch.load(tmp_path / "one" / "rank0.pt")
    assert [r["world"] for r in ranks] == [2, 2] and one["world"] == 1
    assert (tmp_path / "ddp" / "final" / "control_model.safetensors").is_file()
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys() == one["state"].keys()
    worst = 0.0
    for name, value in one["state"].items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
        worst = max(worst, float((ranks[0]["state"][name] - value).abs().max()))
    print(f"max |two ranks - one process| = {worst:.3g}")
    assert worst < TOLERANCE, f"two ranks and one process differ by {worst}"
    # Per-layer logs cover every rank's tokens: the mean interpolation weight (a mean over tokens,
    # equal token counts per rank) logged by rank 0 is the one process's, not rank 0's half.
    import json

    def logged(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k.startswith("w/")} for r in rows if any(k.startswith("w/") for k in r)]

    ddp_logs, one_logs = logged("ddp"), logged("one")
    assert len(ddp_logs) == len(one_logs) == 4 and ddp_logs[0].keys() == one_logs[0].keys()
    for a, b in zip(ddp_logs, one_logs):
        for key in a:
            assert abs(a[key] - b[key]) <= 2e-6, (key, a[key], b[key])  # logs keep 6 decimals
    # Training moved the copies: identical weights are not two untouched initialisations.
    from safetensors.torch import load_file

    checkpoint = load_file(tmp_path / "ddp" / "checkpoint-2" / "control_model.safetensors")
    assert max(float((checkpoint[k] - v).abs().max()) for k, v in one["state"].items()) > 1e-4


def test_non_finite_loss_on_one_rank_stops_all_ranks(tmp_path, text_file):
    proc = torchrun(29534, text_file, tmp_path / "run", "control", 2, "nan-on-rank1")
    assert proc.returncode != 0
    errors = [(tmp_path / "run" / f"rank{r}.error") for r in (0, 1)]
    assert all(e.is_file() for e in errors), proc.stderr[-3000:]  # rank 0 raised too, not killed
    messages = [e.read_text() for e in errors]
    assert messages[0] == messages[1]
    assert "non-finite loss" in messages[0] and "on rank 1" in messages[0] and "at step 3" in messages[0]
    assert not (tmp_path / "run" / "final").exists()
