"""lm-evaluation-harness model "controlllm": a base model plus a saved Control delta.

    python -m controlllm.integrations.lm_eval run --model controlllm \\
        --model_args pretrained=/path/to/base,control=/path/to/control_delta,device=cpu,dtype=float32 \\
        --tasks arc_easy

The class is registered when this module is imported (from Python: import it, then call
`lm_eval.simple_evaluate(model="controlllm", ...)`). Importing `controlllm` never needs lm-eval:
only importing this module does.
"""

from __future__ import annotations

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "controlllm.integrations.lm_eval needs lm-evaluation-harness; install it with `pip install lm-eval` "
        "(or the project's `eval` extra)"
    ) from error

__all__ = ["ControlLMEval"]


@register_model("controlllm")
class ControlLMEval(HFLM):
    """`HFLM` whose model is the run in `control`, read by `controlllm.runs.open_run` as every
    controlllm command reads it (any method, dial and fold as recorded).

    `pretrained` is the base model folder (it also provides the tokenizer and config);
    `control` is a run folder, its final/, or a folder written by `ControlModel.save_pretrained`.
    Every other HFLM argument (device, dtype, batch_size, max_length, ...) keeps its meaning; for a
    run of one stage the base model is loaded by HFLM as usual and the run built on it, so options
    such as `dtype` and `gguf_file` apply; a later stage's base (earlier stages folded) is rebuilt
    by `open_run` and cast to HFLM's dtype.
    """

    def __init__(self, pretrained: str, control: str | None = None, **kwargs) -> None:
        if not control:
            raise ValueError(
                "model 'controlllm' needs control=<folder of a saved Control delta> in --model_args; "
                "to evaluate the base model alone use --model hf"
            )
        if not isinstance(pretrained, str):
            raise TypeError(
                f"model 'controlllm' takes pretrained=<base model folder> as a string, not {type(pretrained).__name__}"
            )
        self._control_path = control
        super().__init__(pretrained=pretrained, **kwargs)

    def _create_model(self, pretrained: str, *args, **kwargs) -> None:
        """Load the base model as HFLM does, then wrap it with the saved Control delta."""
        peft, delta = kwargs.get("peft"), kwargs.get("delta")
        if peft or delta:
            raise ValueError(f"model 'controlllm' does not combine with peft={peft!r} or delta={delta!r}; pass only control=")
        super()._create_model(pretrained, *args, **kwargs)
        from controlllm.runs import describe, open_run

        run = open_run(self._control_path, base=pretrained)
        if describe(run.base_path) == "base":
            model, _ = run.model(base_model=self._model)
        else:
            dtype = next(self._model.parameters()).dtype
            model = run.model()[0].to(dtype)
        self._model = model.eval()


def main() -> None:
    """`python -m controlllm.integrations.lm_eval ARGS`: lm-evaluation-harness's own CLI with the
    "controlllm" model registered (lm-eval does not discover plugins from entry points)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
