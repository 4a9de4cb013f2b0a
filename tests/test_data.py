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
    with pytest.raises(DataError, match=r"a\.jsonl:2: record has neither 'messages' nor 'prompt' and 'response'"):
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


def test_mixed_dataset_keeps_the_length_and_spreads_the_mix_evenly():
    from controlllm.training.data import DataError, MixedDataset, mix_positions

    main, mix = list(range(100, 120)), ["a", "b", "c"]
    mixed = MixedDataset(main, mix, 0.25)
    items = [mixed[i] for i in range(len(mixed))]
    assert len(mixed) == len(main) and mixed.mixed_examples == 5
    assert [x for x in items if isinstance(x, int)] == main[:15]  # the training data in its own order
    assert [x for x in items if isinstance(x, str)] == ["a", "b", "c", "a", "b"]  # cycling
    assert [i for i, m in enumerate(mix_positions(20, 0.25)) if m] == [3, 7, 11, 15, 19]
    assert sum(mix_positions(1000, 0.1)) == 100
    for bad in (0.0, 1.0, float("nan")):
        with pytest.raises(DataError, match="mix-ratio"):
            MixedDataset(main, mix, bad)
    with pytest.raises(DataError, match="no training examples"):
        MixedDataset(main, [], 0.1)
