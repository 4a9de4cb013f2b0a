"""Property-based tests (Hypothesis, derandomized): random ControlConfig values, layer lists and
tiny architectures either build a model whose initial logits equal the base's, or fail with a
ValueError/TypeError naming the field; malformed training files fail with one line naming the file
and line."""

import dataclasses
import json
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import batch, make_model, make_tokenizer  # noqa: E402
from controlllm import ControlConfig, get_control_model  # noqa: E402
from controlllm.training.data import DataError, build_sft_dataset, read_chat_records, read_text_records  # noqa: E402

FIELDS = [f.name for f in dataclasses.fields(ControlConfig)]
# No shrinking: a failure is reported as found, so a failing run stays as fast as a passing one.
SETTINGS = settings(derandomize=True, max_examples=60, deadline=None, database=None,
                    phases=[Phase.explicit, Phase.generate], suppress_health_check=[HealthCheck.too_slow])

anything = st.one_of(st.none(), st.booleans(), st.integers(-3, 12), st.floats(allow_nan=True, allow_infinity=True),
                     st.text(max_size=6), st.lists(st.integers(-2, 8), max_size=5))
VALID = {
    "expand_type": st.sampled_from(["concat", "stack"]),
    "interpolation": st.sampled_from(["lerp", "dlerp", "dlerp_in", "slerp"]),
    "interpolation_init": st.floats(-6, 6),
    "train_interpolation": st.booleans(),
    "alignment_loss": st.sampled_from(["mse", "nmse", "cosine", "none"]),
    "alignment_weight": st.floats(0, 5),
    "alignment_margin": st.floats(0, 1.9),
    "layer_placement": st.sampled_from(["even", "group_end"]),
    "gate_norm": st.booleans(),
    "alignment_budget": st.one_of(st.none(), st.floats(1e-4, 1.0)),  # with 'mse'/'none' it must be refused
    "alignment_budget_lr": st.floats(0.01, 5),
}


# A share of the random configs that must build (and be checked); the rest must be refused by name.
# Without it the test would pass if every config were refused.
MIN_BUILT_SHARE = 0.15
RANDOM_CONFIGS = 150


def test_random_configs_build_exact_models_or_name_the_field():
    outcomes = []
    check_random_config(outcomes)
    built = outcomes.count("built")
    print(f"{built} of {len(outcomes)} random configs built and checked, {outcomes.count('refused')} refused by name")
    assert len(outcomes) >= RANDOM_CONFIGS
    assert built >= MIN_BUILT_SHARE * len(outcomes), (built, len(outcomes))


def check_random_config(outcomes: list) -> None:
    """Run the property over RANDOM_CONFIGS draws, appending "built" or "refused" to `outcomes` for each."""

    @settings(SETTINGS, max_examples=RANDOM_CONFIGS)
    @given(arch=st.sampled_from(["llama", "qwen2", "gemma2"]), layers=st.integers(1, 5), data=st.data())
    def check(arch, layers, data):
        outcomes.append(random_config_outcome(arch, layers, data))

    check()


def random_config_outcome(arch, layers, data) -> str:
    values = {name: data.draw(strategy, label=name) for name, strategy in VALID.items()}
    choice = data.draw(st.sampled_from(["count", "list", "default"]), label="layers given as")
    if choice == "count":  # one past the model's depth is out of range
        values["num_expanded_layers"] = data.draw(st.integers(0, layers + 1), label="num_expanded_layers")
    elif choice == "list":
        values["num_expanded_layers"] = None  # a count and a list together are refused
        values["expanded_layers"] = data.draw(st.one_of(st.lists(st.integers(0, layers - 1), min_size=1, max_size=4,
                                                                 unique=True),
                                                        st.lists(st.integers(-1, layers), max_size=4)),
                                              label="expanded_layers")
    else:  # the default count (N // 4) or an explicit 1
        values["num_expanded_layers"] = data.draw(st.sampled_from([None, 1]), label="num_expanded_layers")
    for name in data.draw(st.lists(st.sampled_from(FIELDS), max_size=2, unique=True), label="corrupted"):
        values[name] = data.draw(anything, label=name)
    base = make_model(arch, num_hidden_layers=layers)
    ids, mask = batch(seq=8)
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask).logits
    try:
        model = get_control_model(base, ControlConfig(**values))
    except (ValueError, TypeError) as err:
        message = str(err)
        assert any(name in message for name in FIELDS), f"{message!r} names no ControlConfig field"
        return "refused"
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(logits, expected, rtol=0, atol=1e-5), (values, float((logits - expected).abs().max()))
    return "built"


# --------------------------------------------------------------------------- training files
GOOD_TEXT = {"text": "Paris is the capital of France."}
GOOD_CHAT = {"prompt": "Hi", "response": "Hello!"}
BAD_LINES = {
    "invalid JSON": st.sampled_from([b"{", b'{"text": broken}', b"nul\x00l", b"[" * 5000]),
    "not an object": st.sampled_from([b"[1, 2]", b'"text"', b"3", b"null"]),
    "wrong keys": st.sampled_from([b'{"txt": "a"}', b'{"content": "a"}', b"{}"]),
    "wrong types": st.sampled_from([b'{"text": 3}', b'{"text": ["a"]}', b'{"text": null}', b'{"text": {"a": 1}}']),
    "non-UTF-8": st.sampled_from([b'{"text": "caf\xe9"}', b"\xff\xfe", b'{"text": "\xc3"}']),
    "huge": st.integers(10_000, 200_000).map(lambda n: b'{"text": ' + b"9" * n + b"}"),
}
CHAT_BAD_LINES = {
    "no assistant": st.sampled_from([b'{"messages": [{"role": "user", "content": "Hi"}]}',
                                     b'{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}']),
    "bad role": st.sampled_from([b'{"messages": [{"role": "bot", "content": "Hi"}]}']),
    "wrong types": st.sampled_from([b'{"prompt": 1, "response": "a"}', b'{"messages": "hi"}',
                                    b'{"messages": [{"role": "user", "content": ["' + b"x" * 50_000 + b'"]}]}']),
}


def _write(tmp_path, name, good: dict, before: int, bad: bytes, blank: bool):
    lines = [json.dumps(good).encode()] * before
    if blank:
        lines.insert(0, b"")  # blank lines are skipped, but still counted
    lines += [bad, json.dumps(good).encode()]
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, len(lines) - 1  # the 1-based line of `bad`


def _check_one_line(err: DataError, path, lineno: int):
    message = str(err)
    assert f"{path}:{lineno}:" in message, message
    assert "\n" not in message and len(message) < 400, message[:500]


@SETTINGS
@given(kind=st.sampled_from(sorted(BAD_LINES)), data=st.data(), before=st.integers(0, 3), blank=st.booleans())
def test_malformed_text_files_name_file_and_line(tmp_path_factory, kind, data, before, blank):
    bad = data.draw(BAD_LINES[kind])
    path, lineno = _write(tmp_path_factory.mktemp("f"), "train.jsonl", GOOD_TEXT, before, bad, blank)
    with pytest.raises(DataError) as info:
        read_text_records(path)
    _check_one_line(info.value, path, lineno)


@SETTINGS
@given(kind=st.sampled_from(sorted(CHAT_BAD_LINES)), data=st.data(), before=st.integers(0, 3), blank=st.booleans())
def test_malformed_chat_files_name_file_and_line(tmp_path_factory, kind, data, before, blank):
    path, lineno = _write(tmp_path_factory.mktemp("f"), "chat.jsonl", GOOD_CHAT, before,
                          data.draw(CHAT_BAD_LINES[kind]), blank)
    with pytest.raises(DataError) as info:
        read_chat_records(path)
    _check_one_line(info.value, path, lineno)


def test_non_utf8_text_file_names_the_line(tmp_path):
    path = tmp_path / "train.txt"
    path.write_bytes(b"Good line.\n\nAnother good one.\ncaf\xe9 au lait\n")
    with pytest.raises(DataError, match=r"train\.txt:4: not valid UTF-8 \(byte 0xe9 at column 4\)"):
        read_text_records(path)


def test_good_files_still_read(tmp_path):
    path, _ = _write(tmp_path, "chat.jsonl", GOOD_CHAT, 2, json.dumps(GOOD_CHAT).encode(), True)
    assert len(build_sft_dataset(read_chat_records(path), make_tokenizer(), 64)) == 4
