"""FSDP: two CPU processes (gloo) shard a Control model with FSDP2, train, checkpoint, resume, and
end with the weights of one process training on the same global batch.

The HF Trainer's FSDP path (accelerate's FSDP plugin, examples/accelerate_fsdp.yaml) cannot run on
CPU: accelerate enables FSDP only for GPU-like devices and trains CPU processes with DDP. So this
test shards with torch's `fully_shard` directly and exercises the functions ControlTrainer uses
under FSDP: gathering the trainable state, saving a delta from it, loading a delta into a sharded
model, and reading the interpolation weights.
"""

import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(__file__)
# fp32 on CPU: the two runs differ only in the order of gradient sums (measured: ~1.5e-8).
TOLERANCE = 1e-6


def _run(cmd, env):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_fsdp_two_ranks_match_one_process(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="needs torch with FSDP2")
    script = os.path.join(HERE, "fsdp_train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
          script, "fsdp", str(tmp_path)], env)
    _run([sys.executable, script, "single", str(tmp_path)], env)
    sharded, single = (torch.load(tmp_path / f"{m}.pt") for m in ("fsdp", "single"))
    assert sharded["world"] == 2 and single["world"] == 1
    assert sorted(sharded["final"]) == sorted(single["final"]) and len(single["final"]) > 0
    for name, value in single["final"].items():
        assert sharded["final"][name].shape == value.shape, name
        assert torch.allclose(sharded["final"][name], value, rtol=0, atol=TOLERANCE), name
    # Training moved the weights, so agreement is not agreement of two untouched initialisations.
    assert any(float(v.abs().max()) > 1e-3 for k, v in single["final"].items() if "gate.bias" in k)
    assert sharded["weights"].keys() == single["weights"].keys()
    for i, w in single["weights"].items():
        assert w != 0.5 and abs(sharded["weights"][i] - w) < TOLERANCE

    # The checkpoint written from the gathered state loads onto the base like any delta (names,
    # shapes and the frozen-weight fingerprint all check out).
    sys.path.insert(0, HERE)
    from conftest import make_model

    from controlllm import ControlModel

    loaded = ControlModel.from_pretrained(make_model("llama"), tmp_path / "fsdp-checkpoint")
    reference = ControlModel.from_pretrained(make_model("llama"), tmp_path / "single-checkpoint")
    for name, value in reference.trainable_state_dict().items():
        assert torch.allclose(loaded.trainable_state_dict()[name], value, rtol=0, atol=TOLERANCE), name
