"""The README's walkthrough runs as written, at toy size.

What is run, and how it is marked in README.md:

- `<!-- walkthrough -->` before a ```bash block: every command line of the block (``\\``
  continuations joined, ``#`` comments dropped) is run in order through `controlllm.cli.main` in one
  temporary folder, and must exit 0. Lines that start another program (`EXTERNAL`: llama.cpp, vLLM,
  Ollama) are skipped; any other line fails the test, so nothing is skipped unnoticed.
- `<!-- walkthrough-file: NAME -->` before a block: the block is written to NAME in that folder
  (the YAML recipe), as a reader would save it.
- `<!-- python-example -->` before a ```python block: run after the walkthrough, in the same folder.
- `<!-- readme-data: sft|cpt -->` before a ```jsonl block: every record must read as that task's data.

The substitutions that make it toy-sized, and nothing else:

1. The default model is a tiny random-weight Llama (tests/conftest.py's `tiny_model_dir`):
   `controlllm.assets.default_model_path` is patched, so commands without `--model` use it.
2. The data files the README names are toy files written by `write_toy_data` under those names.
3. `TOY_FLAGS[command]` is appended to each command line of that command: flags given later win in
   argparse (and override the recipe), so `--max-steps 200` becomes 2 steps.
4. In the Python examples `max_steps=N` becomes `max_steps=2`.
5. `chat` reads one question, then end of input.
"""

from __future__ import annotations

import builtins
import json
import re
import shlex
from pathlib import Path

import pytest

from conftest import TOKENIZER_CORPUS

README = Path(__file__).resolve().parent.parent / "README.md"

TOY_FLAGS = {
    "train": ["--max-steps", "2", "--batch-size", "2", "--seq-len", "64", "--save-steps", "2", "--no-progress"],
    "compare": ["--steps", "2", "--batch-size", "2", "--seq-len", "64", "--max-items", "8", "--bootstrap", "20",
                "--dial-values", "0.5,1", "--rates", "full=1e-3", "--rates", "lora=1e-3", "--rates", "control=1e-3",
                "--no-progress"],
    "dial": ["--seq-len", "64", "--limit", "16"],
    "eval": ["--limit", "8"],
    "generate": ["--max-new-tokens", "4"],
    "chat": ["--max-new-tokens", "4"],
}
# Programs the walkthrough names that are not controlllm (serving the files it wrote): not run here.
EXTERNAL = {"llama-cli", "llama-server", "ollama", "vllm"}
# Commands the walkthrough must run (a marker lost in an edit would otherwise pass silently).
REQUIRED = {"train", "compare", "dial", "eval", "generate", "merge", "export", "serve-export"}

_MARKER = re.compile(r"<!--\s*([\w-]+)(?::\s*(\S+))?\s*-->\s*\n```(\w*)\n(.*?)\n```", re.S)


def blocks(kind: str) -> list[tuple[str | None, str]]:
    """(argument, body) of every fenced block in README.md preceded by `<!-- kind[: argument] -->`."""
    text = README.read_text(encoding="utf-8")
    return [(m.group(2), m.group(4)) for m in _MARKER.finditer(text) if m.group(1) == kind]


def command_lines(body: str) -> list[list[str]]:
    """The shell commands of a bash block as argument lists: continuations joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [argv for argv in (shlex.split(line, comments=True) for line in joined.splitlines()) if argv]


def write_toy_data(folder: Path) -> None:
    """The files the walkthrough names, at toy size: FAQ-like chats and general English text."""
    chats = [{"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."}
             for a in range(12) for b in range(12)]
    jsonl = lambda rows: "\n".join(json.dumps(r) for r in rows) + "\n"  # noqa: E731
    (folder / "faq_train.jsonl").write_text(jsonl(chats[:112]))
    (folder / "faq_val.jsonl").write_text(jsonl(chats[112:128]))
    (folder / "faq_test.jsonl").write_text(jsonl(chats[128:]))
    (folder / "general.txt").write_text("\n\n".join(TOKENIZER_CORPUS * 40))
    (folder / "notes.txt").write_text("\n\n".join(TOKENIZER_CORPUS[::-1] * 30))
    (folder / "notes_val.txt").write_text("\n\n".join(TOKENIZER_CORPUS * 2))


def test_readme_marks_a_complete_walkthrough():
    """The markers are there, every line is a controlllm command or a known server, and every step runs."""
    commands = [argv for _, body in blocks("walkthrough") for argv in command_lines(body)]
    unknown = [" ".join(argv) for argv in commands if argv[0] not in EXTERNAL | {"controlllm"}]
    assert not unknown, f"walkthrough lines this test cannot run: {unknown}"
    ran = {argv[1] for argv in commands if argv[0] == "controlllm"}
    assert REQUIRED <= ran, f"walkthrough lacks {sorted(REQUIRED - ran)}"
    assert [name for name, _ in blocks("walkthrough-file")] == ["faq.yaml"]
    assert len(blocks("python-example")) >= 2


@pytest.mark.parametrize("task", ["sft", "cpt"])
def test_readme_data_examples_are_accepted(tmp_path, task):
    """Each record the README shows as a data format reads as that task's data."""
    from controlllm.training.data import read_chat_records, read_text_records

    (body,) = [body for arg, body in blocks("readme-data") if arg == task]
    lines = [line for line in body.splitlines() if line.strip()]
    path = tmp_path / "example.jsonl"
    path.write_text(body + "\n")
    records = read_chat_records(path) if task == "sft" else read_text_records(path)
    assert len(records) == len(lines)
    if task == "sft":  # every form gives a conversation that ends with the assistant's answer
        assert all(chat[-1]["role"] == "assistant" and chat[-1]["content"] for chat in records)


def test_readme_walkthrough_runs(tmp_path, monkeypatch, tiny_model_dir, capsys):
    """Every walkthrough command exits 0 with the substitutions of the module docstring, in order,
    and the Python examples run after it in the same folder."""
    from controlllm import assets
    from controlllm.cli import main

    monkeypatch.setattr(assets, "default_model_path", lambda: Path(tiny_model_dir))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONTROLLLM_CACHE", str(tmp_path / "cache"))
    write_toy_data(tmp_path)
    for name, body in blocks("walkthrough-file"):
        (tmp_path / name).write_text(body + "\n")
    answers = iter(["What is 2 plus 3?"])

    def one_question(prompt=""):
        try:
            return next(answers)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", one_question)

    for _, body in blocks("walkthrough"):
        for argv in command_lines(body):
            if argv[0] in EXTERNAL:
                continue
            args = argv[1:] + TOY_FLAGS.get(argv[1], [])
            with pytest.raises(SystemExit) as exit_:
                main(args)
            err = capsys.readouterr().err
            assert exit_.value.code == 0, f"`{' '.join(argv)}` exited {exit_.value.code}: {err[-2000:]}"

    # What the walkthrough promises exists.
    assert (tmp_path / "runs/faq/final").is_dir() and (tmp_path / "runs/notes/final").is_dir()
    assert (tmp_path / "runs/compare/compare.md").is_file()
    assert (tmp_path / "runs/faq-dialled/dial.md").is_file()
    assert (tmp_path / "merged/faq/config.json").is_file()
    assert (tmp_path / "faq.q8_0.gguf").stat().st_size > 0
    assert "FROM ./faq.q8_0.gguf" in (tmp_path / "faq.q8_0.Modelfile").read_text()
    leftovers = [p.name for p in tmp_path.rglob(".*") if "staging" in p.name or ".tmp" in p.name]
    assert not leftovers, f"staging files left behind: {leftovers}"
    assert (tmp_path / "served/faq/config.json").is_file()

    for _, body in blocks("python-example"):
        code = re.sub(r"max_steps=\d+", "max_steps=2", body)
        exec(compile(code, f"{README.name} python example", "exec"), {"__name__": "readme_example"})
    assert (tmp_path / "runs/faq-py/final").is_dir()
