"""DDP: two CPU processes (gloo) train a few steps and end with identical weights."""

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("method", ["control"])
def test_ddp_two_ranks_end_identical(tmp_path, text_file, method):
    script = os.path.join(os.path.dirname(__file__), "dist_train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           script, str(text_file), str(tmp_path / "run"), method]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hashes = [(tmp_path / "run" / f"rank{r}.sha256").read_text().split() for r in (0, 1)]
    assert hashes[0][0] == hashes[1][0] == "2"  # both ranks saw a world of two
    assert hashes[0][1] == hashes[1][1]
    assert (tmp_path / "run" / "final" / "control_model.safetensors").is_file()
