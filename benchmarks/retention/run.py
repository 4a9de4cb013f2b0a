"""Learning vs forgetting on SmolLM2-135M-Instruct: Control LLM against the usual ways to fine-tune.

Two experiments mirror the paper: CPT (continued pre-training on Spanish, a new language) and
CSFT (continued SFT on 2-3 digit addition/subtraction, a new skill). Every method sees the same
data in the same order for the same number of steps; each method's learning rate is chosen on the
new skill's validation split only, never on the retention benchmarks.

    .venv/bin/python benchmarks/retention/run.py            # the full benchmark (about 2 hours, 2 cores)
    .venv/bin/python benchmarks/retention/run.py --quick    # a smoke run of every code path (< 10 min)

Runs live under runs/retention/<mode>/ (one folder per experiment, method and learning rate, with
its result.json); a rerun skips finished runs, so an interrupted benchmark resumes where it
stopped. Results are rewritten after every run: benchmarks/results/retention.{md,json} and one
learning-vs-forgetting plot per experiment (for --quick, under runs/retention/quick/report/).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import retention_report as report  # noqa: E402
import retention_tasks as tasks  # noqa: E402
from controlllm.assets import load_pretrained  # noqa: E402
from controlllm.train import TrainConfig, TrainingError, train  # noqa: E402

SEED = 42
EXPERIMENTS = ("cpt", "csft")

# Method variants: TrainConfig overrides. The lerp variants keep w = 0.5 fixed and the dlerp
# variants learn it, as the paper's CSFT and CPT recipes do.
CONTROL_LERP = dict(method="control", interpolation="lerp", alignment_loss="mse", train_interpolation=False)
CONTROL_DLERP = dict(method="control", interpolation="dlerp", alignment_loss="cosine", train_interpolation=True)
VARIANTS = {
    "full": dict(method="full"),
    "lora-r16": dict(method="lora", lora_r=16, lora_alpha=32),
    "stack-8": dict(method="stack", num_expanded_layers=8),
    "freeze-8": dict(method="freeze", num_expanded_layers=8),
    "control-lerp-mse-8": dict(CONTROL_LERP, num_expanded_layers=8),
    # The paper's MSE on this model's raw hidden states reaches several times the LM loss at
    # weight 1; 'nmse' divides it by the frozen branch's squared norm (scale-free).
    "control-lerp-nmse-8": dict(CONTROL_LERP, num_expanded_layers=8, alignment_loss="nmse"),
    # The same 8 copies moved up by 6 layers so the last layer is among them, as in the paper's
    # 8 of 32 (the library's even spacing takes 2, 5, ..., 23 of 30).
    "control-lerp-nmse-8top": dict(CONTROL_LERP, expanded_layers=[8, 11, 14, 17, 20, 23, 26, 29], alignment_loss="nmse"),
    "control-dlerp-cos-8": dict(CONTROL_DLERP, num_expanded_layers=8),
    "control-lerp-mse-15": dict(CONTROL_LERP, num_expanded_layers=15),
    "control-dlerp-cos-15": dict(CONTROL_DLERP, num_expanded_layers=15),
}


@dataclass
class Settings:
    """Sizes of one benchmark mode. The full mode is sized for about 2 hours on 2 CPU cores,
    running the two experiments side by side, one core each."""

    mode: str
    threads: int = 1  # per experiment process
    # retention suite (shared by both experiments; the base model is scored once). With about 10%
    # of answers flipping, 300 items per benchmark put the paired standard error of the 4-benchmark
    # average near 1 point, so a 2-point change stands out of the noise.
    mc_items: int = 40
    english_texts: int = 24
    text_chars: int = 500
    # CPT
    cpt_steps: int = 20
    cpt_batch: int = 4
    cpt_seq: int = 128
    cpt_val_blocks: int = 16
    spanish_val: int = 16
    spanish_test: int = 24
    translation_pairs: int = 16
    translation_tokens: int = 40
    # CSFT
    sft_steps: int = 26
    sft_batch: int = 8
    arith_train: int = 2000
    arith_val: int = 48
    arith_test: int = 80
    basic_arith: int = 80
    answer_tokens: int = 64
    # per experiment: variant -> list of learning rates, or the name of a variant (earlier in the
    # list) whose validation-chosen learning rate it reuses
    variants: dict = field(default_factory=dict)


def full_settings() -> Settings:
    # Every method gets a two-value learning-rate grid around where it learns at this budget
    # (full fine-tuning needs the smallest; LoRA and the expanded copies larger ones).
    plan = {
        "full": [1e-4, 3e-4],
        "lora-r16": [1e-3, 3e-3],
        "freeze-8": [3e-4, 1e-3],
        "stack-8": [3e-4, 1e-3],
        "control-lerp-mse-8": [1e-3, 3e-3],
        "control-lerp-nmse-8": [1e-3, 3e-3],
        "control-lerp-nmse-8top": [1e-3, 3e-3],
        "control-dlerp-cos-8": [1e-3, 3e-3],
        "control-dlerp-cos-15": [1e-3, 3e-3],
    }
    # The layer-choice check (-8top) runs in CPT only, to fit the time.
    csft = {k: v for k, v in plan.items() if k != "control-lerp-nmse-8top"}
    return Settings(mode="full", mc_items=300, variants={"cpt": dict(plan), "csft": csft})


def quick_settings() -> Settings:
    """Every code path (grids, reused learning rates, light and heavy scores, the report) in minutes."""
    return Settings(
        mode="quick", mc_items=4, english_texts=4, text_chars=300,
        cpt_steps=2, cpt_batch=2, cpt_seq=64, cpt_val_blocks=4, spanish_val=4, spanish_test=4, translation_pairs=2,
        translation_tokens=8, sft_steps=2, sft_batch=4, arith_train=64, arith_val=4, arith_test=6,
        basic_arith=4, answer_tokens=12,
        variants={"cpt": {"full": [3e-4], "control-dlerp-cos-8": [1e-3, 3e-3], "stack-8": "control-dlerp-cos-8"},
                  "csft": {"full": [3e-4], "control-lerp-nmse-8": [3e-3], "lora-r16": [3e-3]}},
    )


# ---------------------------------------------------------------------------------------- setup
class Bench:
    """Data, shared evaluation sets, the base model's cached scores and the run loop.

    Every run gets the light evaluation (new-skill validation and test score, English held-out
    loss and KL to the base model); the run each variant keeps (its validation-chosen learning
    rate) also gets the heavy one (the multiple-choice retention suite and the second new-skill
    metric). Scores are cached in each run's result.json.
    """

    def __init__(self, settings: Settings, runs_dir: str):
        self.s = settings
        self.runs = runs_dir
        os.makedirs(os.path.join(self.runs, "data"), exist_ok=True)
        _, self.tokenizer = load_pretrained(None)
        self.suite = tasks.RetentionSuite.build(settings.mc_items, settings.english_texts, settings.text_chars)
        self.reference = None  # a frozen base copy: the KL reference for methods without disable_control()
        self._prepare_cpt()
        self._prepare_csft()

    def _prepare_cpt(self):
        s = self.s
        data = tasks.spanish_data(s.text_chars, s.spanish_val, s.spanish_test, s.translation_pairs)
        self.cpt_train = os.path.join(self.runs, "data", "cpt_train.txt")
        self.cpt_val = os.path.join(self.runs, "data", "cpt_val.txt")
        # One document per paragraph block: a blank line inside a fortune must not split it.
        _write_if_changed(self.cpt_train, "\n\n".join(d.replace("\n\n", "\n") for d in data["train"]))
        _write_if_changed(self.cpt_val, "\n\n".join(d.replace("\n\n", "\n") for d in data["val"]))
        self.spanish_test = data["test"]
        self.spanish_sources = data["test_sources"]
        self.translation = tasks.translation_items(data)
        self.cpt_info = {"train_documents": len(data["train"]), "train_characters": sum(map(len, data["train"])),
                         "val_texts": len(data["val"]), "test_texts": len(data["test"]),
                         "translation_pairs": len(self.translation)}

    def _prepare_csft(self):
        from controlllm.data import build_sft_dataset

        s = self.s
        test = tasks.arithmetic_items(s.arith_test, seed=1)
        val = tasks.arithmetic_items(s.arith_val, seed=2, exclude={it["key"] for it in test})
        train_items = tasks.arithmetic_items(s.arith_train, seed=3, exclude={it["key"] for it in test + val})
        self.sft_train = os.path.join(self.runs, "data", "csft_train.jsonl")
        self.sft_val = os.path.join(self.runs, "data", "csft_val.jsonl")
        for path, items in ((self.sft_train, train_items), (self.sft_val, val)):
            _write_if_changed(path, "".join(json.dumps({"prompt": it["prompt"], "response": it["response"]}) + "\n"
                                            for it in items))
        self.arith_val = tasks.arithmetic_gen_items(self.tokenizer, val)
        self.arith_test = tasks.arithmetic_gen_items(self.tokenizer, test)
        self.basic_arith = tasks.basic_arithmetic_items(self.tokenizer, s.basic_arith)
        records = [[{"role": "user", "content": it["prompt"]}, {"role": "assistant", "content": it["response"]}]
                   for it in train_items[:200]]
        lengths = [len(x["input_ids"]) for x in build_sft_dataset(records, self.tokenizer, 128).examples]
        self.sft_mean_tokens = sum(lengths) / len(lengths)
        self.csft_info = {"mean_tokens_per_item": round(self.sft_mean_tokens, 1), "train_items": len(train_items),
                          "val_items": len(val), "test_items": len(test),
                          "basic_arithmetic_items": len(self.basic_arith), "example": train_items[0]}

    # ------------------------------------------------------------------------------ evaluation
    def reference_fn(self, model):
        if model is None:
            return None
        if hasattr(model, "disable_control"):
            def base(ids, mask):
                with model.disable_control():
                    return model(input_ids=ids, attention_mask=mask).logits
            return base
        if self.reference is None:
            self.reference, _ = load_pretrained(None)
            self.reference.eval()
        return lambda ids, mask: self.reference(input_ids=ids, attention_mask=mask).logits

    def light(self, experiment: str, model, is_base: bool = False) -> dict:
        """Validation score, main new-skill test score, English held-out loss and KL to base."""
        s, tok, out, timing = self.s, self.tokenizer, {}, {}
        start = time.time()
        if experiment == "csft":
            out["val"] = {"arith_val": tasks.exact_match_scores(model, tok, self.arith_val, s.answer_tokens)}
            out["test"] = {"arith_test": tasks.exact_match_scores(model, tok, self.arith_test, s.answer_tokens)}
        else:  # CPT validation is the trainer's eval loss on the validation file
            scores = tasks.per_text_scores(model, tok, self.spanish_test, batch_size=8)
            out["test"] = {"spanish": {"bpc": tasks.bpc(scores), "nll": scores["nll"], "chars": scores["chars"],
                                       "sources": self.spanish_sources}}
        timing["skill"] = time.time() - start
        start = time.time()
        out["english"] = self.suite.evaluate_english(model, tok, reference=None if is_base else self.reference_fn(model))
        timing["english"] = time.time() - start
        out["light_seconds"] = {k: round(v, 1) for k, v in timing.items()}
        return out

    def skill_extra(self, experiment: str, model) -> dict:
        """The second new-skill metric (translation chrF or basic_arithmetic)."""
        s, tok = self.s, self.tokenizer
        if experiment == "csft":
            return {"basic_arithmetic": tasks.exact_match_scores(model, tok, self.basic_arith, s.answer_tokens)}
        return {"translation": tasks.translation_scores(model, tok, self.translation, s.translation_tokens)}

    def heavy(self, experiment: str, model) -> dict:
        """The multiple-choice retention suite and the second new-skill metric."""
        start = time.time()
        extra = self.skill_extra(experiment, model)
        skill_seconds = time.time() - start
        start = time.time()
        mc = self.suite.evaluate_mc(model, self.tokenizer)
        return {"test_extra": extra, "retention": mc,
                "heavy_seconds": {"skill": round(skill_seconds, 1), "mc": round(time.time() - start, 1)}}

    def base_scores(self, keys) -> None:
        """Score the base model on `keys` ("retention", "cpt", "csft") unless cached; each key is
        cached in its own file (runs/.../base-<key>.json), so processes never write the same file."""
        todo = [k for k in keys if (_read_json(self.base_path(k)) or {}).get("fingerprint") != self.fingerprint()]
        if not todo:
            return
        model, _ = load_pretrained(None)
        model.eval()
        for key in todo:
            start = time.time()
            if key == "retention":
                scores = self.suite.evaluate_mc(model, self.tokenizer)
            else:
                light = self.light(key, model, is_base=True)
                scores = {"val": light.get("val"), "test": {**light["test"], **self.skill_extra(key, model)},
                          "english": light["english"]}
            seconds = round(time.time() - start, 1)
            _write_json(self.base_path(key), {"fingerprint": self.fingerprint(), "scores": scores, "seconds": seconds})
            print(f"  base model: {key} scored in {seconds:.0f} s", flush=True)
        del model
        gc.collect()

    def base_path(self, key: str) -> str:
        return os.path.join(self.runs, f"base-{key}.json")

    def base(self) -> dict:
        """The cached base-model scores: {"retention": ..., "cpt": ..., "csft": ..., "seconds": {...}}."""
        out = {"seconds": {}}
        for key in ("retention",) + EXPERIMENTS:
            cached = _read_json(self.base_path(key))
            if cached and cached.get("fingerprint") == self.fingerprint():
                out[key] = cached["scores"]
                out["seconds"][key] = cached["seconds"]
        return out

    def fingerprint(self) -> dict:
        """What the cached base scores depend on: the evaluation sets."""
        s = self.s
        keys = ("mc_items", "english_texts", "text_chars", "spanish_val", "spanish_test", "translation_pairs",
                "translation_tokens", "arith_val", "arith_test", "basic_arith", "answer_tokens")
        return {k: getattr(s, k) for k in keys}

    # ----------------------------------------------------------------------------------- runs
    def folder(self, experiment: str, variant: str, lr: float) -> str:
        return os.path.join(self.runs, experiment, variant, f"lr{lr:g}")

    def train_config(self, experiment: str, variant: str, lr: float, folder: str) -> TrainConfig:
        s = self.s
        common = dict(output=os.path.join(folder, "train"), lr=lr, seed=SEED, progress=False, logging_steps=4,
                      save_total_limit=1, threads=s.threads, **VARIANTS[variant])
        if experiment == "cpt":
            return TrainConfig(data=self.cpt_train, eval_data=self.cpt_val, task="cpt", max_steps=s.cpt_steps,
                               save_steps=s.cpt_steps, batch_size=s.cpt_batch, seq_len=s.cpt_seq,
                               max_eval_samples=s.cpt_val_blocks, **common)
        return TrainConfig(data=self.sft_train, eval_data=self.sft_val, task="sft", max_steps=s.sft_steps,
                           save_steps=s.sft_steps, batch_size=s.sft_batch, seq_len=128, max_eval_samples=None,
                           **common)

    def run(self, experiment: str, variant: str, lr: float, heavy: bool, keep_model: bool = False):
        """Train one (experiment, variant, lr) and score it; returns (result, model or None).

        A finished run (result.json, with the heavy scores when asked for) is read, not rerun."""
        folder = self.folder(experiment, variant, lr)
        path = os.path.join(folder, "result.json")
        cfg = self.train_config(experiment, variant, lr, folder)
        done = _read_json(path)
        # A finished run counts only when it was made with today's settings (a changed plan reruns it).
        current = done and done.get("config") == json.loads(json.dumps(dataclasses.asdict(cfg))) and all(
            len(r["correct"]) == self.s.mc_items for r in (done.get("retention") or {}).values())
        if current and (done.get("retention") or done.get("failed") or not heavy):
            return done, None
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        print(f"[{time.strftime('%H:%M:%S')}] {experiment} {variant} lr={lr:g}: training", flush=True)
        model, tokenizer = load_pretrained(None)
        try:
            result = train(cfg, model=model, tokenizer=tokenizer)
        except TrainingError as error:  # e.g. a non-finite loss at too high a learning rate
            out = {"experiment": experiment, "variant": variant, "lr": lr, "failed": str(error),
                   "config": dataclasses.asdict(cfg)}
            _write_json(path, out)
            shutil.rmtree(os.path.join(folder, "train"), ignore_errors=True)
            print(f"[{time.strftime('%H:%M:%S')}]   failed: {error}", flush=True)
            return out, None
        trained = result.model
        trained.eval()
        tokens = _trained_tokens(cfg, self.sft_mean_tokens)
        out = {"experiment": experiment, "variant": variant, "lr": lr, "config": dataclasses.asdict(cfg),
               "train_seconds": round(result.seconds, 1), "trained_tokens": tokens,
               "trainable_parameters": result.trainable_parameters, "total_parameters": result.total_parameters,
               "val_loss": result.metrics.get("eval_loss"),
               "train_log": _read_jsonl(os.path.join(folder, "train", "metrics.jsonl"))}
        if hasattr(trained, "interpolation_weights"):
            out["interpolation_weights"] = {str(k): round(float(v), 4) for k, v in trained.interpolation_weights().items()}
        start = time.time()
        out.update(self.light(experiment, trained))
        if heavy:
            self._add_heavy(out, trained)
        out["eval_seconds"] = round(time.time() - start, 1)
        _write_json(path, out)
        # Weights are not needed once scored (a full model is 0.5 GB, its checkpoint 1.6 GB).
        shutil.rmtree(os.path.join(folder, "train"), ignore_errors=True)
        print(f"[{time.strftime('%H:%M:%S')}]   trained {result.seconds:.0f} s ({tokens / result.seconds:.0f} tok/s), "
              f"scored {out['eval_seconds']:.0f} s; {report.headline(out)}", flush=True)
        del model, result
        gc.collect()  # the trainer and its optimizer state
        if keep_model:
            return out, trained
        del trained
        gc.collect()
        return out, None

    def _add_heavy(self, out: dict, model) -> None:
        extra = self.heavy(out["experiment"], model)
        out["test"].update(extra.pop("test_extra"))
        out.update(extra)

    def add_heavy(self, result: dict, model) -> dict:
        """Score a kept model on the heavy suite and update its result.json."""
        start = time.time()
        self._add_heavy(result, model)
        result["eval_seconds"] = round(result["eval_seconds"] + time.time() - start, 1)
        _write_json(os.path.join(self.folder(result["experiment"], result["variant"], result["lr"]), "result.json"), result)
        print(f"[{time.strftime('%H:%M:%S')}]   {result['experiment']} {result['variant']} lr={result['lr']:g} chosen; "
              f"{report.headline(result)}", flush=True)
        return result

    def run_variant(self, experiment: str, variant: str, chosen_lrs: dict, read_only: bool = False) -> list[dict]:
        """Every learning rate of a variant (light scores), then the heavy scores for the chosen one.
        With `read_only`, only finished runs are read back (to learn their chosen learning rate)."""
        grid = self.s.variants[experiment][variant]
        if isinstance(grid, str) and grid not in chosen_lrs:
            return []
        lrs = [chosen_lrs[grid]] if isinstance(grid, str) else list(grid)
        if read_only:
            done = [_read_json(os.path.join(self.folder(experiment, variant, lr), "result.json")) for lr in lrs]
            if all(done) and any(d.get("retention") for d in done):
                chosen_lrs[variant] = report.choose(experiment, done)["lr"]
            return []
        results, kept = [], {}
        for lr in lrs:
            result, model = self.run(experiment, variant, lr, heavy=len(lrs) == 1, keep_model=len(lrs) > 1)
            results.append(result)
            kept[lr] = model
        if all(r.get("failed") for r in results):
            return results
        chosen = report.choose(experiment, results)
        if not chosen.get("retention"):
            if kept.get(chosen["lr"]) is not None:
                self.add_heavy(chosen, kept[chosen["lr"]])
            else:  # resumed after the model was gone: train it again (same seed, same result)
                result, _ = self.run(experiment, variant, chosen["lr"], heavy=True)
                chosen.update(result)
        kept.clear()
        gc.collect()
        chosen_lrs[variant] = chosen["lr"]
        return results


def _trained_tokens(cfg: TrainConfig, sft_mean_tokens: float) -> int:
    if cfg.task == "cpt":
        return cfg.max_steps * cfg.batch_size * cfg.seq_len
    # SFT sequences are short and padded per batch: count the mean real length.
    return int(round(cfg.max_steps * cfg.batch_size * sft_mean_tokens))


def _write_if_changed(path: str, text: str) -> None:
    """Write a data file atomically, and only when its content differs (another process may be
    reading it)."""
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    except OSError:
        pass
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _read_jsonl(path: str) -> list:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except OSError:
        return []


def _write_json(path: str, data) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def collect(bench: Bench) -> dict:
    """Every finished run on disk, per experiment and variant, in the plan's order."""
    out = {}
    for experiment, variants in bench.s.variants.items():
        for variant in variants:
            root = os.path.join(bench.runs, experiment, variant)
            found = []
            for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
                result = _read_json(os.path.join(root, name, "result.json"))
                if result:
                    found.append(result)
            if found:
                out.setdefault(experiment, {})[variant] = sorted(found, key=lambda r: r["lr"])
    return out


def environment(settings: Settings, command: str) -> dict:
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"command": command, "machine": f"{cpu}, {os.cpu_count()} CPU cores",
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "seed": SEED, "settings": dataclasses.asdict(settings)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks every code path in minutes")
    parser.add_argument("--runs", default=None, help="run folder (default runs/retention/<mode>)")
    parser.add_argument("--results", default=None,
                        help="where the report goes (default benchmarks/results, or <runs>/report with --quick)")
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS), help="comma-separated subset of: cpt,csft")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per experiment process (default 1)")
    parser.add_argument("--serial", action="store_true", help="run the experiments one after the other, in this process")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from finished runs and stop")
    parser.add_argument("--variants", default=None, help="comma-separated subset of the plan's variants to run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--score-retention", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = quick_settings() if args.quick else full_settings()
    # One thread per experiment process side by side; a serial run gets every core.
    settings.threads = args.threads or (min(os.cpu_count() or 1, 2) if args.serial else 1)
    experiments = [e for e in args.experiments.split(",") if e]
    for experiment in experiments:
        if experiment not in EXPERIMENTS:
            parser.error(f"unknown experiment {experiment!r}; allowed: {', '.join(EXPERIMENTS)}")
    torch.set_num_threads(settings.threads)
    transformers.utils.logging.disable_progress_bar()  # keep the log to one line per run
    runs = os.path.abspath(args.runs or os.path.join(ROOT, "runs", "retention", settings.mode))
    results = os.path.abspath(args.results or (os.path.join(runs, "report") if args.quick
                                               else os.path.join(ROOT, "benchmarks", "results")))
    os.makedirs(results, exist_ok=True)
    command = "python benchmarks/retention/run.py" + (" --quick" if args.quick else "")
    started = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] retention benchmark ({settings.mode}, {', '.join(experiments)}): "
          "preparing data", flush=True)
    bench = Bench(settings, runs)
    info = {"environment": environment(settings, command), "data": {"cpt": bench.cpt_info, "csft": bench.csft_info}}

    invocation = os.path.join(runs, "invocation.json")

    def publish(elapsed=None):
        report.write(results, info, bench.base(), collect(bench), settings,
                     elapsed=time.time() - started if elapsed is None else elapsed)

    if args.report_only:
        publish((_read_json(invocation) or {}).get("seconds", 0.0))
        return 0
    if args.worker or args.serial or len(experiments) == 1:
        for experiment in experiments:
            # The first experiment also scores the base model on the shared retention suite.
            first = args.score_retention if args.worker else experiment == experiments[0]
            bench.base_scores((["retention"] if first else []) + [experiment])
            chosen_lrs: dict = {}
            for variant in settings.variants[experiment]:
                selected = args.variants is None or variant in args.variants.split(",")
                bench.run_variant(experiment, variant, chosen_lrs, read_only=not selected)
                if selected:
                    publish()
    else:
        # One process per experiment, side by side: on a small CPU two single-threaded processes
        # get more done than one process with two threads (tokenising, generation loops and small
        # matrix products do not parallelise well).
        procs = []
        for experiment in experiments:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--experiments", experiment,
                   "--runs", runs, "--results", results, "--threads", str(settings.threads)]
            cmd += ["--variants", args.variants] if args.variants else []
            cmd += (["--quick"] if args.quick else []) + (["--score-retention"] if experiment == experiments[0] else [])
            procs.append((experiment, subprocess.Popen(cmd)))
        failed = [e for e, p in procs if p.wait() != 0]
        if failed:
            publish()
            print(f"experiment(s) {', '.join(failed)} failed; see the output above", file=sys.stderr)
            return 1
    if not args.worker:
        _write_json(invocation, {"seconds": round(time.time() - started, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
        publish()
        print(f"[{time.strftime('%H:%M:%S')}] done in {(time.time() - started) / 60:.1f} min; report in {results}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
