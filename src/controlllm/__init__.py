"""controlllm: Control LLM (Wei et al. 2025) for any transformers causal LM.

Freeze a pretrained model, run trainable copies of some decoder blocks beside the originals,
merge each pair with an interpolator and align them, so the model learns something new and
keeps what it knew.
"""

from .config import ControlConfig
from .merge import merge_fidelity
from .model import ControlModel, ControlModelOutput, get_control_model

__version__ = "0.1.0"

__all__ = ["ControlConfig", "ControlModel", "ControlModelOutput", "get_control_model", "merge_fidelity", "__version__"]
