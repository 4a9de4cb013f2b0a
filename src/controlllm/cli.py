"""The `controlllm` command: train, generate, chat, merge, dial, eval, demo, plot.

User errors (bad flags, missing, unreadable or malformed files, unfinished or mismatched runs,
unknown names, non-finite losses) print one line `controlllm: error: ...` and exit with status 2;
they are the library's `UserError`s. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import typing

from .errors import UsageError, UserError

EXIT_USAGE = 2
MERGE_WEIGHTS = "merge_weights.json"


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 3,7,11; got {text!r}")


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0,0.25,0.5; got {text!r}")


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        hint = hints[f.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint)
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        elif typing.get_origin(base) is list:
            parser.add_argument(flag, type=_int_list, default=f.default, help=help_text + " (comma-separated)")
        else:
            parser.add_argument(flag, type=base, default=f.default,
                                help=f"{help_text} (default: {f.default})", metavar=f.name.upper())


def build_parser() -> argparse.ArgumentParser:
    from .training.train import TrainConfig

    parser = argparse.ArgumentParser(prog="controlllm", description="Control LLM: learn something new, keep what you knew.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="continued pre-training or SFT with Control LLM or a baseline")
    _add_dataclass_flags(p, TrainConfig)

    for name, help_text in (("generate", "generate text from a prompt"), ("chat", "chat interactively")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--model", default=None, help="run folder, model folder or .gguf (default: SmolLM2-135M-Instruct)")
        p.add_argument("--base", default=None, help="base model of a delta/adapter (default: from its run_config.json)")
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        if name == "generate":
            p.add_argument("--prompt", required=True)
            p.add_argument("--raw", action="store_true", help="do not apply the chat template")

    p = sub.add_parser("merge", help="fold a Control delta into its base: a plain transformers model folder")
    p.add_argument("--model", required=True, help="run folder or its final/ holding a Control delta")
    p.add_argument("--base", default=None)
    p.add_argument("--output", required=True)
    p.add_argument("--check-text", default="The quick brown fox jumps over the lazy dog.",
                   help="text on which the merge's fidelity (KL) is reported")
    p.add_argument("--dequantize", action="store_true",
                   help="a run trained on a quantised base (--quantize-base): dequantise the base and fold the copies "
                        "into it, giving a full-precision model (without this flag such a merge is refused)")
    p.add_argument("--calibration-data", default=None,
                   help="data (the run's format: text for cpt, chats for sft) on which the mean weight of dlerp/dlerp_in "
                        "interpolators is measured for the fold (default: the run's --eval-data); recorded in "
                        "merge_weights.json")

    p = sub.add_parser("dial", help="turn a trained run back toward its base: the value that learns most within a "
                                    "forgetting budget, or a value you give (0 = roll back)")
    p.add_argument("--model", required=True, help="run folder (any method) to dial")
    p.add_argument("--output", required=True, help="folder for the dialled model (a run folder eval/generate/merge accept)")
    p.add_argument("--learn-data", default=None, help="held-out data of the new skill: its bits/char drop is the gain")
    p.add_argument("--keep-data", default=None, help="data of what the model should keep: KL to the base and loss change")
    p.add_argument("--max-kl", type=float, default=None, help="budget: KL(base || dialled) on --keep-data, nats/token")
    p.add_argument("--max-keep-increase", type=float, default=None,
                   help="budget: bits/char increase on --keep-data (with or instead of --max-kl)")
    p.add_argument("--value", type=float, default=None, help="set this dial value instead of searching (0 = the base)")
    p.add_argument("--values", type=_float_list, default=None, help="the grid searched (default: 0, 0.1, ..., 1)")
    p.add_argument("--refine", type=int, default=3, help="bisections toward the budget's edge after the grid")
    p.add_argument("--mode", default="output", help="Control runs: 'output' (scale w) or 'weights' (copies' weights "
                                                    "toward the originals, the merged form's dial)")
    p.add_argument("--base", default=None, help="base model of the run (default: from its run_config.json)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=64, help="texts read from each data file (first N)")

    p = sub.add_parser("eval", help="score a model on benchmarks, held-out text and divergence from its base")
    p.add_argument("--model", default=None, help="run folder, model folder or .gguf (default: the base model)")
    p.add_argument("--base", default=None)
    p.add_argument("--tasks", default="arc_easy", help="comma-separated task names (see controlllm.evaluation.evaluate)")
    p.add_argument("--limit", type=int, default=None, help="items per benchmark (first N, in file order)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--output", default=None, help="write the results JSON here")

    p = sub.add_parser("demo", help="the main job: teach SmolLM2-135M-Instruct Spanish with Control LLM, print a before/after table")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")

    p = sub.add_parser("export", help="write a model (any run, merged or plain) as one GGUF file for llama.cpp / Ollama")
    p.add_argument("--model", required=True, help="run folder (Control delta, LoRA adapter or full weights), merged "
                                                  "folder or model folder")
    p.add_argument("--base", default=None, help="base model of a delta/adapter (default: from its run_config.json)")
    p.add_argument("--format", default="gguf", help="file format (allowed: gguf)")
    p.add_argument("--dtype", default="f32", help="tensor type of the matrices: f32 (exact), f16 or q8_0 (default: f32)")
    p.add_argument("--output", required=True, help="the .gguf file to write")

    p = sub.add_parser("plot", help="draw a run's metrics.jsonl as a PNG dashboard (loss, alignment, per-layer w and drift)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder holding metrics.jsonl (the --output of train)")
    p.add_argument("--output", default=None, help="PNG to write (default: RUN_DIR/dashboard.png)")

    p = sub.add_parser("serve-export", help="write a folder `vllm serve` loads with the controlllm plugin: a Control "
                                            "run served unmerged (both branches and the interpolation), or a plain model")
    p.add_argument("--model", required=True, help="run folder (Control delta or full weights) or Llama model folder")
    p.add_argument("--base", default=None, help="base model of a delta (default: from its run_config.json)")
    p.add_argument("--output", required=True, help="folder to write; then: vllm serve OUTPUT")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="weights' dtype in the folder (default: float32, as loaded)")
    return parser


def _chat_prompt(tokenizer, text: str, raw: bool) -> str:
    if raw or not getattr(tokenizer, "chat_template", None):
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def _generate(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float) -> str:
    import torch

    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _base_reference(model, kind: str, args):
    """What `kl:` tasks compare against: the same weights without the trained part."""
    import torch

    if kind == "control":
        return "base"
    if kind == "lora":
        def without_adapter(input_ids, attention_mask):
            with model.disable_adapter(), torch.no_grad():
                return model(input_ids=input_ids, attention_mask=attention_mask).logits
        return without_adapter
    if kind == "full":
        from .checkpoints import load_run_base, resolve_run_folder

        base, _, _ = load_run_base(resolve_run_folder(args.model), args.base)
        return base.eval()
    raise UsageError("kl: tasks need a trained model (a run folder) to compare with its base; got a base model")


def _check_tasks(tasks: list[str], limit: int | None) -> None:
    """Reject unknown task names, missing text files and a negative --limit before a model loads."""
    from .evaluation import GENERATION_BENCHMARKS, MC_BENCHMARKS, load_benchmark

    if limit is not None and limit < 0:
        raise UsageError(f"--limit must be an integer >= 0, got {limit}")
    if not tasks:
        raise UsageError("--tasks is empty; give comma-separated task names")
    for task in tasks:
        kind, _, arg = task.partition(":")
        if kind in ("heldout", "kl") and arg:
            if not os.path.isfile(arg):
                raise UsageError(f"--tasks {task!r}: {arg!r} does not exist or is not a file")
        elif kind in MC_BENCHMARKS:
            try:
                load_benchmark(task, limit=0)
            except ValueError as err:  # e.g. an unknown MMLU subject
                raise UsageError(f"--tasks {task!r}: {err}") from err
        elif task not in GENERATION_BENCHMARKS:
            raise UsageError(f"unknown task {task!r}; allowed: {', '.join(MC_BENCHMARKS)}, mmlu:<subject>, "
                             f"{', '.join(GENERATION_BENCHMARKS)}, heldout:<path>, kl:<path>")


def _measure_merge_weights(model, tokenizer, args) -> str | None:
    """Measure the fold weight of dynamic interpolators on --calibration-data or the run's eval data
    (`controlllm.checkpoints.measure_fold_weights`, the rule a later stage's frozen base follows too);
    returns the data used (None when nothing was measured: the fold then uses sigmoid(b))."""
    from .checkpoints import measure_fold_weights

    path = measure_fold_weights(model, tokenizer, args.model, args.calibration_data)
    if path is None and any(b.interpolator.dynamic for b in model.control_blocks.values()):
        print("controlllm: note: no --calibration-data and no eval data in the run: dlerp/dlerp_in layers are folded "
              "with sigmoid(b)", file=sys.stderr)
    return path


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from .training.train import TrainConfig, train

        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        try:  # the flags are user input: a value TrainConfig or ControlConfig rejects is a usage error
            cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
        except (ValueError, TypeError) as err:
            raise UsageError(str(err)) from err
        result = train(cfg)
        dialled = {"dialled": {"output": os.path.join(cfg.output, "dialled"), "value": result.dial["value"]}} \
            if result.dial else {}
        print(json.dumps({"final": result.final, "seconds": round(result.seconds, 1),
                          "trainable_parameters": result.trainable_parameters, **result.metrics, **dialled}, indent=2))
        return 0
    if args.command in ("generate", "chat"):
        from .checkpoints import load_model

        model, tokenizer, _ = load_model(args.model, base=args.base)
        model.eval()
        if args.command == "generate":
            print(_generate(model, tokenizer, _chat_prompt(tokenizer, args.prompt, args.raw), args.max_new_tokens,
                            args.temperature))
            return 0
        messages = []
        while True:
            try:
                line = input("you> ")
            except EOFError:
                return 0
            if line.strip() in ("exit", "quit"):
                return 0
            messages.append({"role": "user", "content": line})
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            reply = _generate(model, tokenizer, prompt, args.max_new_tokens, args.temperature)
            messages.append({"role": "assistant", "content": reply})
            print(f"model> {reply}")
    if args.command == "merge":
        from .checkpoints import load_model
        from .merge import merge_fidelity
        from .model_card import carry_card_to_merge
        from .training.train import replace_dir

        output = os.fspath(args.output)
        if os.path.isdir(output) and os.listdir(output) and not os.path.isfile(os.path.join(output, "config.json")):
            raise UsageError(f"--output {output!r} is a folder with other files in it; merge writes a whole model folder "
                             "there (replacing it): give a new or empty folder, or an earlier merge's")
        model, tokenizer, kind = load_model(args.model, base=args.base)
        if kind != "control":
            raise UsageError(f"--model {args.model!r} holds a {kind} model; merge needs a Control delta")
        if model.quantization is not None and not args.dequantize:
            raise UsageError(f"--model {args.model!r} was trained on a {model.quantization} base: folding its copies into "
                             "quantised weights would re-quantise what was trained; pass --dequantize to merge into the "
                             "dequantised base (a full-precision model)")
        from .checkpoints import fold_record

        weights = fold_record(model, _measure_merge_weights(model, tokenizer, args))
        weights["dequantized_base"] = model.quantization
        enc = tokenizer(args.check_text, return_tensors="pt")
        # measures, changes nothing
        report = merge_fidelity(model, enc["input_ids"], enc["attention_mask"], dequantize=args.dequantize)
        merged = model.merge_and_unload(dequantize=args.dequantize)
        # Written whole into a staging folder, then put in place: a killed merge leaves the old output or none.
        staging = f"{os.path.abspath(output).rstrip(os.sep)}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            merged.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            with open(os.path.join(staging, MERGE_WEIGHTS), "w") as f:
                json.dump(weights, f, indent=2)
            replace_dir(staging, output)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        print(json.dumps({"output": args.output, **report,
                          "merge_weights": {int(i): round(v["weight"], 6) for i, v in weights["layers"].items()}},
                         indent=2))
        carry_card_to_merge(args.model, args.output, report, args.check_text)
        return 0
    if args.command == "dial":
        from .dial import DEFAULT_VALUES, run_dial

        for flag in ("max_kl", "max_keep_increase"):
            if getattr(args, flag) is not None and args.value is not None:
                raise UsageError(f"--value sets the dial by hand; it does not go with --{flag.replace('_', '-')}")
        if args.limit is not None and args.limit < 1:
            raise UsageError(f"--limit must be a positive integer, got {args.limit}")
        record = run_dial(args.model, args.output, learn_data=args.learn_data, keep_data=args.keep_data,
                          max_kl=args.max_kl, max_keep_increase=args.max_keep_increase, value=args.value,
                          values=args.values or DEFAULT_VALUES, mode=args.mode, refine=args.refine, base=args.base,
                          seq_len=args.seq_len, batch_size=args.batch_size, limit=args.limit)
        print(json.dumps({"output": args.output, "value": record["value"], "chosen": record["chosen"]}, indent=2))
        return 0
    if args.command == "eval":
        from .checkpoints import load_model
        from .evaluation import evaluate
        from .training.train import write_text_atomic

        tasks = [t for t in args.tasks.split(",") if t]
        _check_tasks(tasks, args.limit)
        model, tokenizer, kind = load_model(args.model, base=args.base)
        model.eval()
        reference = _base_reference(model, kind, args) if any(t.startswith("kl:") for t in tasks) else None
        results = evaluate(model, tokenizer, tasks, limit=args.limit, batch_size=args.batch_size, reference=reference)
        results = {"model": args.model, "kind": kind, **results}
        text = json.dumps(results, indent=2)
        print(text)
        if args.output:
            write_text_atomic(args.output, text + "\n")
        return 0
    if args.command == "demo":
        from .demo import run_demo

        run_demo(output=args.output, max_steps=args.max_steps, quick=args.quick)
        return 0
    if args.command == "export":
        from .serving.export import DTYPES, export_gguf

        if args.format != "gguf":  # checked before any model loads
            raise UsageError(f"--format {args.format!r} is not supported; allowed: gguf")
        if args.dtype not in DTYPES:
            raise UsageError(f"--dtype {args.dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
        print(json.dumps(export_gguf(args.model, args.output, dtype=args.dtype, base=args.base), indent=2))
        return 0
    if args.command == "plot":
        from .plots import plot_run

        print(plot_run(args.run_dir, args.output))
        return 0
    if args.command == "serve-export":
        import torch

        from .serving.vllm_export import export_run_for_vllm

        info = export_run_for_vllm(args.model, args.output, base=args.base,
                                   dtype=getattr(torch, args.dtype) if args.dtype else None)
        print(json.dumps({**info, "serve": f"vllm serve {args.output}"}, indent=2))
        return 0
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `controlllm` console script."""
    try:
        code = run(argv)
    except UserError as err:
        print(f"controlllm: error: {err}", file=sys.stderr)
        code = EXIT_USAGE
    sys.exit(code)


if __name__ == "__main__":
    main()
