"""A quiet start: drop one misleading warning of a dependency at its source, nothing else.

peft imports bitsandbytes at its own import time whenever it is installed, so every command that
touches peft loads it, quantised or not. On CPUs with AVX512-BF16, bitsandbytes 0.50 then tries to
fetch an optional fused 4-bit kernel from the Hub (the `kernels` package) and, when it cannot, logs
"Failed to load CPU gemm_4bit_forward from kernels-community ..." on stderr: it looks like a failure
but is not one (bitsandbytes falls back to its own kernel). `SilenceOptionalKernel` drops that one
record at bitsandbytes' logger; every other record of that logger passes.

Likewise peft (0.21) asks transformers (5.x) `is_gradient_checkpointing`, which warns that it is
deprecated (a FutureWarning on every LoRA run that the user cannot act on); that one warning is
ignored by its message. Importing this module installs both (torch-free: it costs nothing at start).
"""

from __future__ import annotations

import logging
import warnings

#: The logger (bitsandbytes/backends/cpu/ops.py) and the start of the message it logs.
BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
OPTIONAL_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
#: The start of transformers' deprecation warning that peft's LoRA setup triggers (a regex for warnings).
DEPRECATED_BY_PEFT = r"`is_gradient_checkpointing` is deprecated"


class SilenceOptionalKernel(logging.Filter):
    """Drops bitsandbytes' warning that its optional fused CPU kernel is unavailable."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(OPTIONAL_KERNEL_MESSAGE)


def install() -> None:
    """Add the filter to bitsandbytes' CPU logger (once; the logger object is the one bitsandbytes gets)."""
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    if not any(isinstance(f, SilenceOptionalKernel) for f in logger.filters):
        logger.addFilter(SilenceOptionalKernel())
    warnings.filterwarnings("ignore", message=DEPRECATED_BY_PEFT, category=FutureWarning)


install()
