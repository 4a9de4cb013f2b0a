"""Tests for controlllm.training.data: reading records, CPT packing, SFT label masking, batching."""

from __future__ import annotations

import json

import pytest
import torch

from controlllm.training.data import (
    FALLBACK_CHAT_TEMPLATE,
    IGNORE_INDEX,
    DataCollator,
    DataError,
    assistant_spans,
    build_cpt_dataset,
    build_sft_dataset,
    load_dataset_for_task,
    read_chat_records,
    read_text_records,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello there, how are you today?",
    "Paris is the capital of France.",
    "I am fine, thank you very much.",
    "What is the capital of Spain? Madrid is.",
]


def _make_tokenizer(chat_template: str | None = CHATML):
    """A small byte-level BPE tokenizer trained here, so no download is needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", bos_token="<|endoftext|>")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def tok():
    return _make_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    return _make_tokenizer(chat_template=None)


def _label_runs(example, tokenizer) -> list[str]:
    """Decode each contiguous run of supervised label positions."""
    runs, current = [], []
    for label in example["labels"].tolist():
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


CONVERSATION = [
    {"role": "system", "content": "Be nice."},
    {"role": "user", "content": "Hello there, how are you?"},
    {"role": "assistant", "content": "I am fine, thank you."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital."},
]


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- reading


def test_read_text_records_txt_splits_on_blank_lines(tmp_path):
    path = _write(tmp_path / "a.txt", "First doc\nstill first.\n\n  \nSecond doc.\n\n\nThird.\n")
    assert read_text_records(path) == ["First doc\nstill first.", "Second doc.", "Third."]


def test_read_text_records_txt_without_blank_lines_is_one_document(tmp_path):
    path = _write(tmp_path / "a.txt", "line one\nline two\nline three\n")
    assert read_text_records(path) == ["line one\nline two\nline three"]


def test_read_text_records_jsonl(tmp_path):
    path = _write(tmp_path / "a.jsonl", '{"text": "alpha"}\n\n{"text": "beta", "id": 2}\n{"text": "  "}\n')
    assert read_text_records(path) == ["alpha", "beta"]


def test_read_text_records_errors(tmp_path):
    with pytest.raises(DataError, match=r"data file .*nope\.txt does not exist"):
        read_text_records(tmp_path / "nope.txt")
    with pytest.raises(DataError, match=r"unsupported data file extension '\.csv'.*allowed: \.txt, \.jsonl"):
        read_text_records(_write(tmp_path / "a.csv", "x"))
    bad = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n\n{"text": broken}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        read_text_records(bad)
    missing = _write(tmp_path / "missing.jsonl", '{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match=r"missing\.jsonl:2: record has no 'text' field \(keys: body\)"):
        read_text_records(missing)
    wrong_type = _write(tmp_path / "num.jsonl", '{"text": 5}\n')
    with pytest.raises(DataError, match=r"num\.jsonl:1: field 'text' must be a string, got int"):
        read_text_records(wrong_type)
    not_object = _write(tmp_path / "list.jsonl", '["text"]\n')
    with pytest.raises(DataError, match=r"list\.jsonl:1: expected a JSON object, got list"):
        read_text_records(not_object)
    with pytest.raises(DataError, match=r"empty\.txt: no documents found"):
        read_text_records(_write(tmp_path / "empty.txt", "\n \n"))


def test_read_chat_records_both_forms(tmp_path):
    lines = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"prompt": "Q?", "response": "A."},
        {"system": "Be brief.", "prompt": "Q2?", "response": "A2."},
    ]
    path = _write(tmp_path / "chat.jsonl", "\n".join(json.dumps(line) for line in lines) + "\n")
    assert read_chat_records(path) == [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Q2?"},
            {"role": "assistant", "content": "A2."},
        ],
    ]


def test_read_chat_records_errors(tmp_path):
    with pytest.raises(DataError, match=r"unsupported data file extension '\.txt'.*allowed: \.jsonl"):
        read_chat_records(_write(tmp_path / "chat.txt", "hi"))
    no_field = _write(tmp_path / "a.jsonl", '{"prompt": "p", "response": "r"}\n{"prompt": "only"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: record has none of the chat forms \(keys: prompt\); allowed: 'messages'"):
        read_chat_records(no_field)
    bad_role = _write(tmp_path / "b.jsonl", '\n{"messages": [{"role": "Assistant", "content": "x"}]}\n')
    with pytest.raises(DataError, match=r"b\.jsonl:2: message 0 has role 'Assistant'; allowed: system, user"):
        read_chat_records(bad_role)
    no_content = _write(tmp_path / "c.jsonl", '{"messages": [{"role": "user"}]}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:1: message 0 must be an object with 'role' and 'content'"):
        read_chat_records(no_content)
    malformed = _write(tmp_path / "d.jsonl", '{"prompt": "p", "response": "r"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        read_chat_records(malformed)
    with pytest.raises(DataError, match=r"e\.jsonl: no conversations found"):
        read_chat_records(_write(tmp_path / "e.jsonl", "\n"))


# --------------------------------------------------------------------------- CPT packing


def test_cpt_packing_lengths_content_and_eos(tok):
    texts = CORPUS[:3]
    seq_len = 7
    stream = []
    for text in texts:
        stream += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ds = build_cpt_dataset(texts, tok, seq_len)
    assert len(ds) == len(stream) // seq_len
    packed = torch.cat([ds[i]["input_ids"] for i in range(len(ds))]).tolist()
    assert packed == stream[: len(ds) * seq_len]  # remainder dropped, order kept
    for i in range(len(ds)):
        item = ds[i]
        assert item["input_ids"].shape == (seq_len,)
        assert torch.equal(item["labels"], item["input_ids"])
        assert item["attention_mask"].tolist() == [1] * seq_len
    # Each document is followed by exactly one eos token.
    lengths = [len(tok(text, add_special_tokens=False)["input_ids"]) for text in texts]
    eos_positions = [sum(lengths[: i + 1]) + i for i in range(len(texts))]
    kept = [p for p in eos_positions if p < len(packed)]
    assert [i for i, t in enumerate(packed) if t == tok.eos_token_id] == kept
    assert len(kept) >= 2
    assert tok.decode(packed[: lengths[0]]) == texts[0]


def test_cpt_too_few_tokens(tok):
    n_tokens = len(tok("Hello there", add_special_tokens=False)["input_ids"]) + 1
    with pytest.raises(DataError, match=rf"hold {n_tokens} tokens .* fewer than one block of seq_len=512"):
        build_cpt_dataset(["Hello there"], tok, 512)
    with pytest.raises(DataError, match=r"seq_len must be an integer >= 2, got 1"):
        build_cpt_dataset(["Hello there"], tok, 1)
    with pytest.raises(DataError, match=r"no texts"):
        build_cpt_dataset([], tok, 8)


# --------------------------------------------------------------------------- SFT labels


def test_sft_labels_are_exactly_assistant_content_and_end_marker(tok):
    ds = build_sft_dataset([CONVERSATION], tok, 512)
    assert len(ds) == 1
    example = ds[0]
    assert _label_runs(example, tok) == ["I am fine, thank you.<|im_end|>", "Paris is the capital.<|im_end|>"]
    # The tokens are those of the rendered chat, unchanged.
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert example["input_ids"].tolist() == tok(rendered, add_special_tokens=False)["input_ids"]
    supervised = example["labels"] != IGNORE_INDEX
    assert torch.equal(example["labels"][supervised], example["input_ids"][supervised])


def test_sft_fallback_template_without_chat_template(plain_tok):
    assert plain_tok.chat_template is None
    text, spans = assistant_spans(CONVERSATION, plain_tok, FALLBACK_CHAT_TEMPLATE)
    assert text.startswith("System: Be nice.\nUser: Hello there, how are you?\nAssistant: I am fine")
    ds = build_sft_dataset([CONVERSATION], plain_tok, 512)
    assert _label_runs(ds[0], plain_tok) == ["I am fine, thank you.<|im_end|>", "Paris is the capital.<|im_end|>"]


def test_sft_prompt_response_records_from_file(tmp_path, tok):
    path = _write(tmp_path / "chat.jsonl", json.dumps({"prompt": "Hello there?", "response": "I am fine."}) + "\n")
    ds = load_dataset_for_task(path, tok, "sft", 128)
    assert _label_runs(ds[0], tok) == ["I am fine.<|im_end|>"]


def test_sft_truncation_keeps_prefix_and_drops_empty_examples(tok):
    full = build_sft_dataset([CONVERSATION], tok, 512)[0]
    labels = full["labels"].tolist()
    first_label = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    cut = first_label + 3
    short = build_sft_dataset([CONVERSATION], tok, cut)[0]
    assert short["input_ids"].tolist() == full["input_ids"].tolist()[:cut]
    assert short["labels"].tolist() == labels[:cut]
    assert sum(label != IGNORE_INDEX for label in short["labels"].tolist()) == 3

    # Cut before the first assistant token: that conversation is dropped, the other kept.
    no_answer = [{"role": "user", "content": "Hi"}]
    ds = build_sft_dataset([CONVERSATION, no_answer, [{"role": "user", "content": "Q"},
                                                     {"role": "assistant", "content": "A"}]], tok, first_label)
    assert len(ds) == 1
    assert _label_runs(ds[0], tok) == ["A<|im_end|>"]
    with pytest.raises(DataError, match=r"all 2 conversations were dropped.*seq_len=5"):
        build_sft_dataset([CONVERSATION, no_answer], tok, 5)


def test_sft_rejects_bad_messages(tok):
    with pytest.raises(DataError, match=r"conversation 0: message 1 has role 'bot'"):
        build_sft_dataset([[{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]], tok, 32)


# --------------------------------------------------------------------------- collator


def test_collator_right_pads(tok):
    collate = DataCollator(pad_token_id=0)
    batch = collate([
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": torch.tensor([8]), "attention_mask": torch.tensor([1]), "labels": torch.tensor([8])},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(v.dtype == torch.long for v in batch.values())

    rounded = DataCollator(pad_token_id=3, pad_to_multiple_of=4)([{"input_ids": [1, 2, 3, 4, 5]}])
    assert rounded["input_ids"].tolist() == [[1, 2, 3, 4, 5, 3, 3, 3]]
    assert rounded["labels"].tolist() == [[1, 2, 3, 4, 5, -100, -100, -100]]

    from_tok = DataCollator.from_tokenizer(tok)  # no pad token: falls back to eos
    assert tok.pad_token_id is None and from_tok.pad_token_id == tok.eos_token_id
    with pytest.raises(DataError, match=r"pad_token_id must be an integer token id, got None"):
        DataCollator(pad_token_id=None)
    with pytest.raises(DataError, match=r"empty list"):
        collate([])


def test_datasets_feed_a_causal_lm(tok, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config).eval()
    collate = DataCollator.from_tokenizer(tok)
    sft = build_sft_dataset([CONVERSATION, CONVERSATION[:3]], tok, 64)
    cpt = load_dataset_for_task(_write(tmp_path / "c.txt", "\n\n".join(CORPUS)), tok, "cpt", 8)
    for dataset in (sft, cpt):
        batch = collate([dataset[i] for i in range(2)])
        with torch.no_grad():
            out = model(**batch)
        assert torch.isfinite(out.loss)


def test_load_dataset_for_task_unknown_task(tmp_path, tok):
    with pytest.raises(DataError, match=r"unknown task 'dpo'; allowed: 'cpt', 'sft'"):
        load_dataset_for_task(tmp_path / "x.txt", tok, "dpo", 8)


# --------------------------------------------------------------------------- real tokenizer


@pytest.mark.slow
def test_sft_labels_with_the_default_model_tokenizer():
    from controlllm.assets import load_pretrained

    _, tokenizer = load_pretrained()
    conversation = CONVERSATION[1:]  # the template adds its default system prompt
    ds = build_sft_dataset([conversation], tokenizer, 512)
    example = ds[0]
    expected = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)
    assert example["input_ids"].tolist() == list(expected)
    assert _label_runs(example, tokenizer) == ["I am fine, thank you.<|im_end|>", "Paris is the capital.<|im_end|>"]


class _Examples(torch.utils.data.Dataset):
    """Examples with a given number of trained tokens each; input_ids[0] is the example's id."""

    def __init__(self, tokens, first_id):
        self.items = [{"input_ids": [first_id + i] + [7] * n, "labels": [-100] + [7] * n} for i, n in enumerate(tokens)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def _share(examples, mix_ids):
    from controlllm.training.data import trained_tokens

    mixed = sum(trained_tokens(e) for e in examples if e["input_ids"][0] in mix_ids)
    return mixed / sum(trained_tokens(e) for e in examples)


@pytest.mark.parametrize("epoch", [0, 1])
def test_mixed_dataset_keeps_the_main_order_and_a_token_share(epoch):
    """SFT-like: main examples train on 10 tokens, mix documents on 120; at ratio 0.25 the mix holds at most
    a quarter of the trained tokens (not a quarter of the examples), and the main data comes in the order a
    run without mixing visits it (the Trainer's seeded shuffle, epoch by epoch)."""
    from controlllm.training.data import MixedDataset, data_order

    main, mix = _Examples([10] * 200, 1000), _Examples([120] * 7, 5000)
    mixed = MixedDataset(main, mix, 0.25, seed=3)
    mixed.set_epoch(epoch)
    items = list(mixed)
    main_ids = [e["input_ids"][0] - 1000 for e in items if e["input_ids"][0] < 5000]
    assert main_ids == data_order(len(main), 3, epoch)  # every main example, in the unmixed order
    mix_ids = set(range(5000, 5007))
    share = _share(items, mix_ids)
    print("mixed examples", len(items) - len(main_ids), "token share", round(share, 4))
    assert 0.25 - 120 / sum(10 * 200 + 120 for _ in [0]) <= share <= 0.25
    # ... at every point of the epoch, not only at its end
    assert all(_share(items[:k], mix_ids) <= 0.25 for k in range(1, len(items) + 1))
    assert list(mixed) == items  # deterministic per epoch (a resumed run replays it)


def test_mixed_dataset_follows_the_trainers_order():
    """data_order is the order the Trainer's sampler draws a map-style dataset in."""
    from accelerate.data_loader import SeedableRandomSampler

    from controlllm.training.data import data_order

    sampler = SeedableRandomSampler(data_source=range(50), data_seed=42)
    assert list(sampler) == data_order(50, 42, 0)
    assert list(sampler) == data_order(50, 42, 1)  # the sampler advanced its epoch


def test_mixed_dataset_refuses_a_ratio_that_takes_nothing():
    from controlllm.training.data import DataError, MixedDataset

    with pytest.raises(DataError, match=r"--mix-ratio 0.1 takes no --mix-data example.*at least 0.143 would"):
        MixedDataset(_Examples([64] * 6, 0), _Examples([64] * 3, 100), 0.1)
    for bad in (0, 1, 1.5, -0.1, float("nan"), True):
        with pytest.raises(DataError, match="mix-ratio"):
            MixedDataset(_Examples([5] * 6, 0), _Examples([5], 100), bad)


def test_text_mixed_into_sft_trains_every_token(tmp_path, tok):
    from controlllm.training.data import build_mix_dataset, read_mix_records

    text = _write(tmp_path / "keep.txt", "\n\n".join(CORPUS))
    records = read_mix_records(text, "sft")
    assert records[0] == "text"
    dataset = build_mix_dataset(records, tok, "sft", 8)
    assert len(dataset) >= len(CORPUS)
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["input_ids"].numel() <= 8 and torch.equal(item["labels"], item["input_ids"])
    jsonl = _write(tmp_path / "keep.jsonl", "\n".join(json.dumps({"text": t}) for t in CORPUS))
    assert read_mix_records(jsonl, "sft")[0] == "text"
    chats = _write(tmp_path / "chats.jsonl", json.dumps({"prompt": "a", "response": "b"}))
    assert read_mix_records(chats, "sft")[0] == "chat"


def _trained_batches(monkeypatch, cfg):
    """Train with `cfg` and return every example the Trainer collated, in order."""
    from controlllm.training import data
    from controlllm.training.train import train

    seen = []
    original = data.DataCollator.__call__

    def recording(self, features):
        seen.extend({"input_ids": list(map(int, f["input_ids"])), "labels": list(map(int, f["labels"]))}
                    for f in features)
        return original(self, features)

    with monkeypatch.context() as patch:
        patch.setattr(data.DataCollator, "__call__", recording)
        train(cfg)
    return seen


def test_train_mixes_text_into_sft_by_trained_tokens_keeping_the_order(tmp_path, monkeypatch, tiny_model_dir,
                                                                        chat_file):
    """`train --task sft --mix-data keep.txt --mix-ratio 0.25`: the examples the Trainer sees hold the mix at
    (at most, and within one document of) a quarter of the trained tokens, and the chats in the order of the
    run without mixing."""
    from controlllm.training.data import trained_tokens
    from controlllm.training.train import TrainConfig

    keep = _write(tmp_path / "keep.txt", "\n\n".join(["Madrid es grande.", "Hola amigo."] * 6))
    common = dict(model=str(tiny_model_dir), data=str(chat_file), task="sft", max_steps=8, batch_size=4, seq_len=64,
                  save_steps=100, logging_steps=1, progress=False, lr=1e-3)
    plain = _trained_batches(monkeypatch, TrainConfig(output=str(tmp_path / "plain"), **common))
    mixed = _trained_batches(monkeypatch, TrainConfig(output=str(tmp_path / "mixed"), mix_data=str(keep),
                                                      mix_ratio=0.25, **common))
    is_mix = [e["labels"] == e["input_ids"] for e in mixed]  # a document trains on every token, a chat does not
    main = [e["input_ids"] for e, m in zip(mixed, is_mix) if not m]
    mix_tokens = sum(trained_tokens(e) for e, m in zip(mixed, is_mix) if m)
    total = sum(trained_tokens(e) for e in mixed)
    document = max(trained_tokens(e) for e, m in zip(mixed, is_mix) if m)
    print("examples", len(mixed), "of the mix", sum(is_mix), "mix token share", round(mix_tokens / total, 3))
    assert len(mixed) == len(plain)  # the same steps and batch size
    assert main == [e["input_ids"] for e in plain][:len(main)]
    assert 0.25 - document / total <= mix_tokens / total <= 0.25




# --------------------------------------------------------------------------- formats

EXPECTED_CHAT = [{"role": "user", "content": "Add the numbers.\n\n2 and 2"}, {"role": "assistant", "content": "4."}]


def test_alpaca_sharegpt_and_messages_records_in_one_file(tmp_path):
    rows = [
        {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4."},
        {"instruction": "Say hi.", "input": "", "output": "Hi.", "system": "Be brief."},
        {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}], "system": "S."},
        {"conversations": [{"from": "system", "value": "T."}, {"from": "user", "value": "Q2?"},
                           {"from": "assistant", "value": "A2."}]},
    ]
    path = _write(tmp_path / "mixed.jsonl", "\n".join(json.dumps(r) for r in rows))
    assert read_chat_records(path) == [
        EXPECTED_CHAT,
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."},
         {"role": "assistant", "content": "Hi."}],
        [{"role": "system", "content": "S."}, {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
        [{"role": "system", "content": "T."}, {"role": "user", "content": "Q2?"},
         {"role": "assistant", "content": "A2."}],
    ]


def test_json_array_parquet_arrow_and_saved_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    alpaca = [{"instruction": "Add the numbers.", "input": "2 and 2", "output": "4."}]
    assert read_chat_records(_write(tmp_path / "alpaca_data.json", json.dumps(alpaca))) == [EXPECTED_CHAT]
    table = datasets.Dataset.from_list(alpaca)
    table.to_parquet(str(tmp_path / "a.parquet"))
    assert read_chat_records(tmp_path / "a.parquet") == [EXPECTED_CHAT]
    table.save_to_disk(str(tmp_path / "saved"))
    assert read_chat_records(tmp_path / "saved") == [EXPECTED_CHAT]
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    assert read_chat_records(arrow) == [EXPECTED_CHAT]
    texts = datasets.Dataset.from_dict({"text": ["alpha", " ", "beta"], "id": [1, 2, 3]})
    texts.to_parquet(str(tmp_path / "t.parquet"))
    assert read_text_records(tmp_path / "t.parquet") == ["alpha", "beta"]


def test_format_errors_name_the_file_the_record_and_what_is_accepted(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"instruction": "x", "output": "y"}, {"question": "q", "answer": "a"}]
    with pytest.raises(DataError, match=r"b\.json: record 2: record has none of the chat forms \(keys: answer, "
                                        r"question\); allowed: .*Alpaca"):
        read_chat_records(_write(tmp_path / "b.json", json.dumps(rows)))
    datasets.Dataset.from_dict({"body": ["x"]}).to_parquet(str(tmp_path / "c.parquet"))
    with pytest.raises(DataError, match=r"c\.parquet: record 1: record has no 'text' field \(keys: body\); "
                                        r"allowed: .*'text' column"):
        read_text_records(tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"d\.json: a \.json data file must hold an array of records"):
        read_chat_records(_write(tmp_path / "d.json", '{"instruction": "x", "output": "y"}'))
    with pytest.raises(DataError, match=r"e\.jsonl:1: message 1 is from 'robot'; allowed: system, human"):
        read_chat_records(_write(tmp_path / "e.jsonl", json.dumps(
            {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]})))
    with pytest.raises(DataError, match=r"cannot read .*f\.parquet as parquet"):
        read_chat_records(_write(tmp_path / "f.parquet", "not parquet"))
    with pytest.raises(DataError, match=r"g\.jsonl:1: expected a JSON object, got list"):
        read_chat_records(_write(tmp_path / "g.jsonl", '[{"prompt": "p", "response": "r"}]'))
