"""The `controlllm` command: train, generate, chat, merge, dial, eval, demo, plot.

User errors (bad flags, missing, unreadable or malformed files, unfinished or mismatched runs,
unknown names, non-finite losses) print one line `controlllm: error: ...` and exit with status 2;
they are the library's `UserError`s. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
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


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported as one line `controlllm: error: ...` (exit 2), like every
    other user error."""

    def error(self, message):
        name = self.prog.split()[-1] if " " in self.prog else ""
        where = f" {name}" if name and name != "controlllm" else ""
        self.exit(EXIT_USAGE, f"controlllm: error:{where} {message} (see `{self.prog} --help`)\n")


class _HelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default once, and only when it says something (not None/False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "(default" in text or default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: {default})"


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "threads":
            continue  # every command has --threads
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
            parser.add_argument(flag, type=base, default=f.default, help=help_text, metavar=f.name.upper())


def default_threads() -> int:
    """torch CPU threads when --threads is not given: $OMP_NUM_THREADS when set, else the cores this
    process may use minus the machine's current load (1-minute average, rounded), at least 1: all
    cores on an idle machine, fewer on a busy one, so a command does not oversubscribe it."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    try:
        busy = round(os.getloadavg()[0])
    except OSError:  # pragma: no cover - no load average
        busy = 0
    return max(1, min(cores, cores - busy))


def _common() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads (default: $OMP_NUM_THREADS, else the available cores minus the current load)")
    return common


def _overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (never the model being read or its base)")


def build_parser(train_defaults: dict | None = None, command_defaults: dict | None = None) -> argparse.ArgumentParser:
    """The `controlllm` parser; `train_defaults` (a recipe file's values) replace train's defaults,
    `command_defaults` ({command: values}) another command's, so flags on the command line override
    the file."""
    from .training.options import TrainConfig

    parser = _Parser(prog="controlllm", description="Control LLM: learn something new, keep what you knew.",
                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    common = [_common()]

    def command(name, help_text, **kwargs):
        return sub.add_parser(name, help=help_text, description=help_text, parents=common,
                              formatter_class=_HelpFormatter, **kwargs)

    p = command("train", "continued pre-training or SFT with Control LLM or a baseline")
    p.add_argument("--config", default=None, metavar="RECIPE.yaml",
                   help="a YAML recipe of these options (controlllm.training.recipe); flags override it")
    _add_dataclass_flags(p, TrainConfig)
    if train_defaults:
        p.set_defaults(**train_defaults)

    model_help = "run folder, model folder or .gguf (default: SmolLM2-135M-Instruct)"
    base_help = "base model of the run (default: the one its run_config.json records)"
    for name, help_text in (("generate", "generate text from a prompt"), ("chat", "chat interactively")):
        p = command(name, help_text)
        p.add_argument("--model", default=None, help=model_help)
        p.add_argument("--base", default=None, help=base_help)
        p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate")
        p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
        if name == "generate":
            p.add_argument("--prompt", required=True, help="the prompt (wrapped in the chat template unless --raw)")
            p.add_argument("--raw", action="store_true", help="do not apply the chat template")

    p = command("merge", "fold any trained run into plain weights: a transformers model folder at the base's cost")
    p.add_argument("--model", required=True, help="run folder (Control, LoRA/QLoRA, stack, full or dialled)")
    p.add_argument("--base", default=None, help=base_help)
    p.add_argument("--output", required=True, help="new folder for the merged model")
    _overwrite(p)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights' dtype in the folder; auto = the base model's own")
    p.add_argument("--check-data", default=None,
                   help="data on which the merge's fidelity (KL of the merged model from the unmerged one) is measured "
                        "(default: the run's eval data, else --check-text)")
    p.add_argument("--check-text", default="The quick brown fox jumps over the lazy dog.",
                   help="text for the fidelity check when there is no data")
    p.add_argument("--dequantize", action="store_true",
                   help="accepted for compatibility: a run on a quantised base is always merged into its dequantised "
                        "base (the weights its copies were trained against)")
    p.add_argument("--calibration-data", default=None,
                   help="measure the fold weight of dlerp/dlerp_in layers anew on this data (the run's format), instead "
                        "of the weight recorded when the run finished; recorded in merge_weights.json")

    p = command("dial", "turn a trained run back toward its base: the value that learns most within a forgetting "
                        "budget, or a value you give (0 = roll back)")
    p.add_argument("--config", default=None, metavar="RECIPE.yaml",
                   help="take options from the recipe's `dial:` section; flags override it")
    p.add_argument("--model", required=True, help="run folder (any method) to dial")
    p.add_argument("--output", required=True, help="new folder for the dialled run (a run folder every command accepts)")
    _overwrite(p)
    p.add_argument("--learn-data", default=None, help="held-out data of the new skill: its bits/char drop is the gain")
    p.add_argument("--keep-data", default=None, help="data of what the model should keep: KL to the base and loss change")
    p.add_argument("--max-kl", type=_non_negative, default=None,
                   help="budget: KL(base || dialled) on --keep-data, nats/token (> 0; to roll back use --value 0)")
    p.add_argument("--max-keep-increase", type=float, default=None,
                   help="budget: bits/char increase on --keep-data (with or instead of --max-kl)")
    p.add_argument("--value", type=float, default=None,
                   help="set this dial value instead of searching; relative to the trained stage (0 = its base)")
    p.add_argument("--values", type=_float_list, default=None, help="the grid searched (default: 0, 0.1, ..., 1)")
    p.add_argument("--refine", type=int, default=3, help="bisections toward the budget's edge after the grid")
    p.add_argument("--mode", default="output", choices=("output", "weights"),
                   help="Control runs: 'output' scales w; 'weights' moves the copies' weights toward the originals")
    p.add_argument("--base", default=None, help=base_help)
    p.add_argument("--seq-len", type=_positive, default=256, help="tokens per scored window")
    p.add_argument("--batch-size", type=_positive, default=8, help="windows per forward pass")
    p.add_argument("--limit", type=_positive, default=64, help="texts read from each data file (first N)")
    p.add_argument("--check", type=_fraction, default=0.5,
                   help="share of the keep texts held out of the choice, to report the chosen value's forgetting on "
                        "texts it was not chosen on (0: choose on all)")
    p.add_argument("--confidence", type=_confidence, default=0.95,
                   help="hold the budget to a one-sided bootstrap bound at this confidence ('none': the estimate)")

    p = command("eval", "score a model (and its base, with the change) on benchmarks, held-out data and KL to the base")
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--base", default=None, help=base_help)
    p.add_argument("--tasks", default="arc_easy",
                   help="comma-separated: arc_easy, arc_challenge, ..., mmlu:<subject>, heldout:<file>, kl:<file>")
    p.add_argument("--limit", type=int, default=100, help="items per benchmark (first N, in file order); 0 = all")
    p.add_argument("--batch-size", type=_positive, default=16, help="items per forward pass")
    p.add_argument("--no-base", action="store_true", help="do not score the base model beside a trained run")
    p.add_argument("--output", default=None, help="also write the results JSON to this file")
    _overwrite(p)

    p = command("demo", "the main job: teach SmolLM2-135M-Instruct Spanish with Control LLM, print a before/after table")
    p.add_argument("--output", default="runs/demo", help="run folder")
    p.add_argument("--max-steps", type=int, default=None, help="training steps (default: the demo's)")
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")

    p = command("export", "write any run (merged first) or model folder as one GGUF file for llama.cpp / Ollama")
    p.add_argument("--model", required=True, help="run folder of any kind, merged folder or model folder")
    p.add_argument("--base", default=None, help=base_help)
    p.add_argument("--format", default="gguf", help="file format (allowed: gguf)")
    p.add_argument("--dtype", default="f32",
                   help="tensor type of the matrices: f32 (exact), f16, bf16, q8_0 or q4_k_m (llama.cpp's quantiser)")
    p.add_argument("--output", required=True, help="the .gguf file to write")
    _overwrite(p)

    from . import compare

    compare_help = ("which method keeps most at equal gain, on your data: trains full, LoRA, Control (and SDFT for "
                    "SFT data) over a rate grid with their dials and reports forgetting at equal gain")
    p = sub.add_parser("compare", help=compare_help, description=compare_help, formatter_class=_HelpFormatter)
    compare.add_arguments(p)  # its own --threads
    p.add_argument("--config", default=None, metavar="RECIPE.yaml",
                   help="take options from the recipe's `compare:` section; flags override it")
    for name, values in (command_defaults or {}).items():
        if values:
            chosen = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
            chosen.set_defaults(**values)
            for action in chosen._actions:  # an option the recipe gives is no longer required on the command line
                if action.dest in values:
                    action.required = False

    p = command("plot", "draw a run's metrics.jsonl as a PNG dashboard (loss, alignment, per-layer w and drift)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder holding metrics.jsonl (the --output of train)")
    p.add_argument("--output", default=None, help="PNG to write (default: RUN_DIR/dashboard.png)")

    p = command("serve-export", "write a folder `vllm serve` loads with the controlllm plugin: a Control run served "
                                "unmerged (both branches and the interpolation), or a plain model")
    p.add_argument("--model", required=True, help="run folder (Control, stack, hybrid, low-rank or full weights) or a model folder of a family vLLM "
                        "serves (Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, Granite)")
    p.add_argument("--base", default=None, help=base_help)
    p.add_argument("--output", required=True, help="new folder to write; then: vllm serve OUTPUT")
    _overwrite(p)
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="weights' dtype in the folder (default: float32, as loaded)")
    return parser


def _number(cast, ok, allowed: str, none: bool = False):
    """An argparse type: `cast` the text, keep it when `ok(value)`, else say what is `allowed`
    (with `none`, the word 'none' gives None)."""
    def parse(text: str):
        if none and text.lower() == "none":
            return None
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value
    return parse


_positive = _number(int, lambda v: v >= 1, "a positive integer")
_fraction = _number(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
_confidence = _number(float, lambda v: 0.0 < v < 1.0, "a number in (0, 1) or 'none'", none=True)
_non_negative = _number(float, lambda v: math.isfinite(v) and v > 0,
                        "a finite number > 0 (to roll back to the base, use --value 0)")


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


def _reference(run, model):
    """What `kl:` tasks compare the run's model with: the base it was trained on."""
    import torch

    if run.kind == "lora":
        def without_adapter(input_ids, attention_mask):
            with model.disable_adapter(), torch.no_grad():
                return model(input_ids=input_ids, attention_mask=attention_mask).logits
        return without_adapter
    reference = run.reference()
    if reference is None:
        raise UsageError("kl: tasks need a trained model (a run folder) to compare with its base; got a base model")
    return reference


def _numbers(results: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in results.items():
        if isinstance(value, dict):
            flat.update(_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


# Result keys that describe the measurement, not the model: no "change" is reported for them.
_NOT_SCORES = ("tokens", "characters", "chars", "seconds", "stderr", "/n", "_n", "items", "texts", "runtime")


def _with_base(results: dict, base: dict) -> dict:
    """Every score of `results` beside the base's value and the change: {name: {model, base, change}}
    (counts, timings and standard errors left out)."""
    ours, theirs = _numbers(results), _numbers(base)
    return {k: {"model": v, "base": theirs[k], "change": v - theirs[k]} for k, v in ours.items()
            if k in theirs and not k.endswith(_NOT_SCORES)}


def _merge(args) -> dict:
    import torch

    from .merge import fidelity, fidelity_batches
    from .model_card import write_merged_card
    from .runs import Output, open_run

    run = open_run(args.model, base=args.base)
    if run.kind == "base":
        raise UsageError(f"--model {args.model!r} is a model folder, not a trained run: it is already plain weights")
    out = Output(args.output, overwrite=args.overwrite, protect=run.protected)
    for flag in ("calibration_data", "check_data"):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"--{flag.replace('_', '-')} {path!r} does not exist or is not a file")
    if args.calibration_data is not None and run.kind != "control":
        raise UsageError(f"--calibration-data measures the fold of Control dlerp/dlerp_in layers; {args.model!r} is a "
                         f"{run.kind} run")
    unmerged, tokenizer = run.model(dequantize=True)
    calibration = None
    if args.calibration_data is not None and any(b.interpolator.dynamic for b in unmerged.control_blocks.values()):
        from .merge import calibration_batches

        task = run.record.get("task", "cpt")
        unmerged.measure_merge_weights(calibration_batches(args.calibration_data, tokenizer, task=task,
                                                           seq_len=run.record.get("seq_len", 256)),
                                       source=args.calibration_data)
        calibration = args.calibration_data
    check = args.check_data or run.record.get("eval_data")
    if check is not None and os.path.isfile(check):
        batches = fidelity_batches(tokenizer, data=check, task=run.record.get("task", "cpt"),
                                   seq_len=run.record.get("seq_len", 256))
        checked_on = check
    else:
        batches = fidelity_batches(tokenizer, text=args.check_text)
        checked_on = json.dumps(args.check_text)
    with torch.no_grad():
        reference = [unmerged(**b).logits.float() for b in batches]
    weights = None
    if run.kind == "control":
        from .runs import fold_record

        weights = fold_record(unmerged, calibration or (run.record.get("fold") or {}).get("calibration_data"))
        weights["dequantized_base"] = run.quantization
        merged = unmerged.merge_and_unload(dequantize=True)
    elif run.kind == "lora":
        merged = unmerged.merge_and_unload()
    else:
        merged = unmerged
    merged.eval()
    report = fidelity(reference, merged, batches)  # merged.eval(): fidelity runs without gradients
    dtype = args.dtype
    if dtype == "auto":
        dtype = _base_dtype(run) or "float32"
    merged = merged.to(getattr(torch, dtype))
    with out.staging() as folder:
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        if weights is not None:
            with open(os.path.join(folder, MERGE_WEIGHTS), "w") as f:
                json.dump(weights, f, indent=2)
        write_merged_card(folder, run, {**report, "checked_on": checked_on, "dtype": dtype})
    summary = {"output": args.output, "kind": run.kind, "dtype": dtype, "checked_on": checked_on, **report}
    if weights is not None:
        summary["merge_weights"] = {int(i): round(v["weight"], 6) for i, v in weights["layers"].items()}
    return summary


def _base_dtype(run) -> str | None:
    """The dtype the run's original base model folder stores its weights in (None when unknown)."""
    base = run.lineage.get("base_model")
    path = os.path.join(base, "config.json") if base and os.path.isdir(base) else None
    if path is None or not os.path.isfile(path):
        return None
    with open(path) as f:
        config = json.load(f)
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in ("float32", "bfloat16", "float16") else None


def _recipe_defaults(argv: list[str] | None) -> tuple[str | None, dict | None]:
    """(command, the values of its `--config FILE`), read before the real parse: train's options
    (`controlllm.training.recipe.load_recipe`), or the file's `dial:` / `compare:` section."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in ("train", "dial", "compare"):
        return None, None
    pre = _Parser(prog=f"controlllm {argv[0]}", add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv[1:])
    if known.config is None:
        return None, None
    from .training.recipe import command_section, load_recipe

    if argv[0] == "train":
        return "train", load_recipe(known.config)
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[argv[0]]
    allowed = [a.dest for a in sub._actions if a.option_strings and a.dest not in ("help", "config")]
    return argv[0], command_section(known.config, argv[0], allowed)


def run(argv: list[str] | None = None) -> int:
    command, defaults = _recipe_defaults(argv)
    args = build_parser(defaults if command == "train" else None, {command: defaults} if command else None
                        ).parse_args(argv)
    if args.command == "compare":
        from .compare import run_from_args

        if args.threads is None:  # as every command: not all the cores of a shared machine
            args.threads = default_threads()
        return run_from_args(args)
    if args.command != "plot":
        import torch

        threads = args.threads if args.threads is not None else default_threads()
        if threads < 1:
            raise UsageError(f"--threads must be a positive integer, got {threads}")
        torch.set_num_threads(threads)
    if args.command == "train":
        from .training.options import TrainConfig
        from .training.train import train

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
        from .runs import open_run

        model, tokenizer = open_run(args.model, base=args.base).model()
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
        print(json.dumps(_merge(args), indent=2))
        return 0
    if args.command == "dial":
        from .dial import DEFAULT_VALUES, run_dial

        for flag in ("max_kl", "max_keep_increase"):
            if getattr(args, flag) is not None and args.value is not None:
                raise UsageError(f"--value sets the dial by hand; it does not go with --{flag.replace('_', '-')}")
        record = run_dial(args.model, args.output, learn_data=args.learn_data, keep_data=args.keep_data,
                          max_kl=args.max_kl, max_keep_increase=args.max_keep_increase, value=args.value,
                          values=args.values or DEFAULT_VALUES, mode=args.mode, refine=args.refine, base=args.base,
                          seq_len=args.seq_len, batch_size=args.batch_size, limit=args.limit, overwrite=args.overwrite,
                          check=args.check, confidence=args.confidence)
        print(json.dumps({"output": args.output, "value": record["value"], "chosen": record["chosen"]}, indent=2))
        return 0
    if args.command == "eval":
        from .evaluation import evaluate
        from .runs import Output, open_run

        tasks = [t for t in args.tasks.split(",") if t]
        _check_tasks(tasks, args.limit)
        limit = args.limit or None
        run = open_run(args.model, base=args.base)
        out = Output(args.output, kind="file", overwrite=args.overwrite, protect=run.protected) if args.output else None
        model, tokenizer = run.model()
        reference = _reference(run, model) if any(t.startswith("kl:") for t in tasks) else None
        results = evaluate(model, tokenizer, tasks, limit=limit, batch_size=args.batch_size, reference=reference)
        results = {"model": args.model, "kind": run.kind, **results}
        if run.kind != "base" and not args.no_base:
            base_model, _ = run.base_model()
            base_tasks = [t for t in tasks if not t.startswith("kl:")]
            base = evaluate(base_model.eval(), tokenizer, base_tasks, limit=limit, batch_size=args.batch_size) \
                if base_tasks else {}
            results["base"] = base
            results["versus_base"] = _with_base({k: v for k, v in results.items() if k not in ("model", "kind")}, base)
        text = json.dumps(results, indent=2)
        print(text)
        if out is not None:
            out.write_text(text + "\n")
        return 0
    if args.command == "demo":
        from .demo import run_demo

        run_demo(output=args.output, max_steps=args.max_steps, quick=args.quick)
        return 0
    if args.command == "export":
        from .runs import Output, open_run
        from .serving.export import DTYPES, export_run

        if args.format != "gguf":  # checked before any model loads
            raise UsageError(f"--format {args.format!r} is not supported; allowed: gguf")
        if args.dtype not in DTYPES:
            raise UsageError(f"--dtype {args.dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
        if not args.output.endswith(".gguf"):
            raise UsageError(f"--output {args.output!r} must end in .gguf")
        run = open_run(args.model, base=args.base)
        out = Output(args.output, kind="file", overwrite=args.overwrite, protect=run.protected)
        with out.staging() as tmp:  # the Modelfile (Ollama: FROM the file, its stop tokens) names the final file
            info = export_run(run, tmp, dtype=args.dtype, modelfile=args.output)
        print(json.dumps({**info, "output": args.output}, indent=2))
        return 0
    if args.command == "plot":
        from .plots import plot_run

        print(plot_run(args.run_dir, args.output))
        return 0
    if args.command == "serve-export":
        import torch

        from .serving.vllm_export import export_run_for_vllm

        info = export_run_for_vllm(args.model, args.output, base=args.base, overwrite=args.overwrite,
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
