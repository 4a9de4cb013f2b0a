"""llama.cpp's own tools, pinned: the HF -> GGUF converter and the quantiser.

- The converter (`convert_hf_to_gguf.py`, its `conversion` package and the `gguf-py` it was written
  against) comes from the llama-cpp-python source distribution on PyPI, which vendors llama.cpp
  (MIT licence) under `vendor/llama.cpp`. Only those files are unpacked (about 3 MB).
- The quantiser (`llama_model_quantize`, for Q4_K_M and the other k-quants) is llama.cpp's shared
  library `libllama` as node-llama-cpp's prebuilt CPU package on npm ships it; it is called through
  ctypes, so nothing is compiled.

Both go into one folder, `tools_dir()`: `$CONTROLLLM_LLAMA_CPP` if set, else
`<sys.prefix>/share/controlllm/llama.cpp-<version>` (inside the virtual environment). Install them with
`python -m controlllm.serving.llama_cpp install` (`make setup` does).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..errors import UserError

#: llama-cpp-python source distribution whose vendored llama.cpp provides the converter.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
#: node-llama-cpp prebuilt binary package whose libllama provides the quantiser (same as tests/llamacpp).
NODE_LLAMA_CPP_VERSION = "3.22.1"
#: What of vendor/llama.cpp is unpacked.
_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "models/templates/", "LICENSE")
_SETUP_HINT = "run `make setup` or `python -m controlllm.serving.llama_cpp install`"


class ToolsMissing(UserError, RuntimeError):
    """llama.cpp's converter or quantiser is not installed: what is missing and how to install it."""


def tools_dir() -> Path:
    """The folder holding the pinned converter (and, if installed, the quantiser library)."""
    env = os.environ.get("CONTROLLLM_LLAMA_CPP")
    if env:
        return Path(env)
    return Path(sys.prefix) / "share" / "controlllm" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


def converter_script() -> Path:
    """Path of the pinned `convert_hf_to_gguf.py`; raises ToolsMissing when it is not installed."""
    script = tools_dir() / "convert_hf_to_gguf.py"
    if not script.is_file() or not (tools_dir() / "gguf-py" / "gguf").is_dir():
        raise ToolsMissing(f"llama.cpp's converter (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}) is not installed "
                           f"in {tools_dir()}; {_SETUP_HINT}")
    return script


# --------------------------------------------------------------------------- installing


def _install_converter(dest: Path, python: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([python, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", tmp], check=True)
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
                if rel and (m.isfile() or m.isdir()) and any(rel == x or rel.startswith(x) for x in _MEMBERS):
                    m.name = rel
                    members.append(m)
            tar.extractall(dest, members=members, filter="data")


def _install_quantiser(dest: Path, platform: str) -> None:
    npm = shutil.which("npm")
    if npm is None:
        print("controlllm: note: npm not found; llama.cpp's quantiser (Q4_K_M) is not installed", file=sys.stderr)
        return
    package = f"@node-llama-cpp/{platform}@{NODE_LLAMA_CPP_VERSION}"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([npm, "pack", "--silent", package, "--pack-destination", tmp], check=True,
                       stdout=subprocess.DEVNULL)
        (tgz,) = Path(tmp).glob("*.tgz")
        lib = dest / "lib"
        lib.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tgz) as tar:
            for m in tar.getmembers():
                name = Path(m.name).name
                if m.isfile() and (".so" in name or name.endswith((".dylib", ".json"))):
                    m.name = name
                    tar.extract(m, lib, filter="data")


def install(dest: str | os.PathLike | None = None, quantiser: bool = True, platform: str = "linux-x64") -> Path:
    """Download and unpack the pinned converter (PyPI) and, if `quantiser` and npm is there, the quantiser
    library (npm) into `dest` (default: tools_dir()); returns the folder. Idempotent."""
    dest = Path(dest) if dest is not None else tools_dir()
    if not (dest / "convert_hf_to_gguf.py").is_file():
        staging = dest.with_name(dest.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        _install_converter(staging, sys.executable)
        if dest.exists():
            shutil.copytree(staging, dest, dirs_exist_ok=True)
            shutil.rmtree(staging)
        else:
            staging.rename(dest)
    if quantiser and libllama_path_in(dest) is None:
        _install_quantiser(dest, platform)
    return dest


def libllama_path_in(folder: Path) -> Path | None:
    """Path of the libllama shared library (the quantiser) installed in `folder`, or None."""
    lib = Path(folder) / "lib"
    found = [p for p in sorted(lib.glob("libllama*")) if "common" not in p.name] if lib.is_dir() else []
    return found[0] if found else None


# --------------------------------------------------------------------------- quantising

#: llama.cpp's `enum llama_ftype` values of the types quantise() writes.
LLAMA_FTYPES = {"q4_k_m": 15, "q4_k_s": 14, "q5_k_m": 17, "q6_k": 18, "q8_0": 7}


def require_quantiser(ftype: str) -> Path:
    """Path of the quantiser library; raises ToolsMissing (saying `ftype` needs it) when it is not installed."""
    lib_path = libllama_path_in(tools_dir())
    if lib_path is None:
        raise ToolsMissing(f"llama.cpp's quantiser (libllama from @node-llama-cpp/*@{NODE_LLAMA_CPP_VERSION}, npm) is "
                           f"not installed in {tools_dir() / 'lib'}; dtype {ftype!r} needs it; {_SETUP_HINT} "
                           "with npm on the PATH")
    return lib_path


def quantize(source: str | os.PathLike, output: str | os.PathLike, ftype: str, threads: int = 0) -> None:
    """Quantise a GGUF file (f32/f16/bf16) with llama.cpp's own `llama_model_quantize`.

    Raises ToolsMissing when the quantiser library is not installed, RuntimeError when llama.cpp fails.
    """
    lib_path = require_quantiser(ftype)
    # libllama loads libggml* beside it through its RUNPATH ($ORIGIN).
    lib = ctypes.CDLL(str(lib_path))
    # The params struct is returned by value (larger than 16 bytes: through a hidden pointer); a generous
    # buffer holds any version of it. Only its first two fields are set: nthread (int32) and ftype (int32),
    # the same in every llama.cpp since the function exists.
    params = ctypes.create_string_buffer(1024)
    lib.llama_model_quantize_default_params.restype = None
    lib.llama_model_quantize_default_params.argtypes = [ctypes.c_void_p]
    lib.llama_model_quantize_default_params(params)
    ctypes.c_int32.from_buffer(params, 0).value = threads
    ctypes.c_int32.from_buffer(params, 4).value = LLAMA_FTYPES[ftype]
    lib.llama_backend_init.restype = None
    lib.llama_backend_init()
    lib.llama_model_quantize.restype = ctypes.c_uint32
    lib.llama_model_quantize.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p]
    code = lib.llama_model_quantize(os.fsencode(source), os.fsencode(output), params)
    if code != 0:
        raise RuntimeError(f"llama.cpp's llama_model_quantize failed ({code}) on {os.fspath(source)}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m controlllm.serving.llama_cpp",
                                     description="install llama.cpp's pinned converter and quantiser")
    parser.add_argument("command", choices=["install", "where"])
    parser.add_argument("--dest", default=None, help="folder (default: $CONTROLLLM_LLAMA_CPP or inside the venv)")
    parser.add_argument("--no-quantiser", action="store_true", help="skip the npm quantiser library")
    parser.add_argument("--platform", default="linux-x64", help="node-llama-cpp binary package (default: linux-x64)")
    args = parser.parse_args(argv)
    if args.command == "where":
        print(args.dest or tools_dir())
        return 0
    print(install(args.dest, quantiser=not args.no_quantiser, platform=args.platform))
    return 0


if __name__ == "__main__":
    sys.exit(main())
