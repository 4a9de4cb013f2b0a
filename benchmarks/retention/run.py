"""Learning vs forgetting on SmolLM2-135M-Instruct, along each run's training trajectory.

Two experiments:
- cpt: continued pre-training on Spanish (a new language), long enough that full fine-tuning
  forgets; every method is scored at log-spaced checkpoints of one run (one cosine schedule).
- seq: sequential skills. Stage 1 teaches arithmetic (continued SFT), stage 2 continues from
  stage 1's result on Spanish; stage 1's skill is scored along stage 2 (backward transfer).

At every checkpoint: the new skill (Spanish held-out bits/char), drift (KL to the base model and
English bits/char on held-out English), and in seq the stage-1 skill (exact match). At the last
checkpoint of a cpt run also the multiple-choice suite (ARC-Easy, PIQA, HellaSwag). Every Control
run's merged model (`merge_and_unload`, what a user deploys) is scored on the same probes.

    .venv/bin/python benchmarks/retention/run.py                  # plan 'fast': about 70 min on 2 cores (67 measured)
    .venv/bin/python benchmarks/retention/run.py --plan full      # 10x the tokens: about 3.5 hours on 2 cores
    .venv/bin/python benchmarks/retention/run.py --quick          # smoke run of every code path
    benchmarks/retention/gpu.sh                                   # the GPU-scale variant (bf16)

Runs live under runs/retention/<plan>/<experiment>/<variant>/ (result.json each); a rerun skips
finished runs. The report (benchmarks/results/retention.{md,json}, one PNG per experiment) is
rewritten after every finished run (for --quick, under runs/retention/quick/report/).
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
import threading
import time
from dataclasses import dataclass, field

import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import retention_report as report  # noqa: E402
import retention_tasks as tasks  # noqa: E402
from controlllm.assets import AssetError, load_pretrained  # noqa: E402
from controlllm.training.train import TrainConfig, TrainingError, train  # noqa: E402

SEED = 42
EXPERIMENTS = ("cpt", "seq")
CONFIG_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


@dataclass
class Variant:
    """One method of the plan: TrainConfig overrides, the learning rate(s), and whether general
    English is mixed into the training data (replay)."""

    overrides: dict
    lr: float  # cpt; in seq the stage-2 (Spanish) learning rate
    stage1_lr: float | None = None  # seq only: the arithmetic stage
    replay: bool = False
    # WiSE-FT (Wortsman et al. 2022): after training, the weights interpolated with the base's,
    # base + alpha (tuned - base), scored at each alpha (cpt only; alpha 1 is the run's last checkpoint)
    wise_ft: tuple[float, ...] = ()

    def missing_fields(self) -> list[str]:
        """TrainConfig fields this variant needs that the installed library does not have."""
        return sorted(set(self.overrides) - CONFIG_FIELDS)


# Learning rates are those the previous round of this benchmark chose on the new skill's
# validation split only (Spanish validation loss for CPT, validation exact match for arithmetic),
# per method; full fine-tuning also runs at a 10x gentler rate. Budgets are fixed before any run:
# 0.01 (nmse units) is the drift the unconstrained nmse recipe reached in a few dozen steps, 0.001
# a tenth of it.
LORA = dict(method="lora", lora_r=16, lora_alpha=32)
# WiSE-FT's mixing coefficients, fixed before any run: the paper's default 0.5 and its neighbours.
WISE_FT_ALPHAS = (0.25, 0.5, 0.75)
CPT_VARIANTS = {
    "full": Variant(dict(method="full"), 3e-4, wise_ft=WISE_FT_ALPHAS),
    "full-gentle": Variant(dict(method="full"), 3e-5),
    "full-replay": Variant(dict(method="full"), 3e-4, replay=True),
    "lora-r16": Variant(LORA, 3e-3),
    "freeze-8": Variant(dict(method="freeze", num_expanded_layers=8), 1e-3),
    "stack-8": Variant(dict(method="stack", num_expanded_layers=8), 1e-3),
    "control-paper-cpt": Variant(dict(method="control", preset="paper-cpt"), 1e-3),
    "control-paper-csft": Variant(dict(method="control", preset="paper-csft"), 1e-3),
    "control-recommended": Variant(dict(method="control", preset="recommended"), 3e-3),
    "control-budget-0.01": Variant(dict(method="control", preset="recommended", alignment_budget=0.01), 3e-3),
    "control-budget-0.001": Variant(dict(method="control", preset="recommended", alignment_budget=0.001), 3e-3),
}
# Learning-rate grid points of the long plans, between the rates above: more of the frontier,
# reported, never chosen on retention (the equal-gain reference stays the validation-chosen full FT).
CPT_GRID = {
    "full-1e-4": Variant(dict(method="full"), 1e-4),
    "control-recommended-1e-3": Variant(dict(method="control", preset="recommended"), 1e-3),
}
SEQ_VARIANTS = {
    "full": Variant(dict(method="full"), 3e-4, stage1_lr=1e-4),
    "lora-r16": Variant(LORA, 3e-3, stage1_lr=1e-3),
    "freeze-8": Variant(dict(method="freeze", num_expanded_layers=8), 1e-3, stage1_lr=3e-4),
    "stack-8": Variant(dict(method="stack", num_expanded_layers=8), 1e-3, stage1_lr=3e-4),
    "control-recommended": Variant(dict(method="control", preset="recommended"), 3e-3, stage1_lr=1e-3),
}
# Control with explicit fields (no preset): lerp, w = 0.5 fixed, scale-free nmse alignment.
CONTROL_NMSE = Variant(dict(method="control", num_expanded_layers=8, interpolation="lerp", train_interpolation=False,
                            alignment_loss="nmse"), 3e-3, stage1_lr=1e-3)


@dataclass
class Settings:
    """Sizes of one plan."""

    plan: str
    threads: int = 1  # torch threads per worker process
    workers: int = 2  # processes side by side
    bf16: bool = False
    # retention suite
    mc_items: int = 200
    english_texts: int = 32
    text_chars: int = 500
    # Spanish (cpt, and stage 2 of seq)
    spanish_val: int = 16
    spanish_test: int = 32
    cpt_steps: int = 200
    cpt_batch: int = 4
    cpt_seq: int = 128
    replay_share: float = 0.1  # of the training characters, for the replay variant
    # seq
    sft_steps: int = 40
    sft_batch: int = 8
    stage2_steps: int = 48
    arith_train: int = 3000
    arith_val: int = 48
    arith_test: int = 80
    answer_tokens: int = 24
    cpt_variants: dict = field(default_factory=lambda: dict(CPT_VARIANTS))
    seq_variants: dict = field(default_factory=lambda: dict(SEQ_VARIANTS))

    def variants(self, experiment: str) -> dict:
        return self.cpt_variants if experiment == "cpt" else self.seq_variants


def checkpoint_steps(total: int) -> list[int]:
    """Log-spaced checkpoints of one run: about total/8, total/4, total/2, then total. All but the
    last are multiples of the first (the Trainer saves every `save_steps` = the first, and at the end)."""
    first = max(1, total // 8)
    return sorted({s for s in (first, 2 * first, 4 * first) if s < total} | {total})


def full_settings() -> Settings:
    """10x the previous round's 10,240 CPT tokens per run (100 steps x 4 x 256 = 102,400), trained in
    bfloat16 autocast (1.5-1.9x the float32 speed on a CPU with AVX512-BF16; scoring stays float32)."""
    return Settings(plan="full", bf16=True, mc_items=120, cpt_steps=100, cpt_seq=256, stage2_steps=48,
                    cpt_variants={**CPT_VARIANTS, **CPT_GRID})


def fast_settings() -> Settings:
    """The same methods and measurements at the budget that fits 100 minutes on 2 cores (bf16 training:
    67 min measured on an idle 2-core machine)."""
    return Settings(plan="fast", bf16=True, mc_items=100, english_texts=24, spanish_test=24, cpt_steps=32,
                    sft_steps=26, stage2_steps=24, arith_test=48)


def gpu_settings() -> Settings:
    """One GPU, bf16: 20x the full plan's tokens per CPT run (2,048,000), every item of the MC suite."""
    return Settings(plan="gpu", workers=1, bf16=True, mc_items=1000, english_texts=64, spanish_test=64,
                    spanish_val=32, cpt_steps=1000, cpt_batch=16, sft_steps=200, stage2_steps=240,
                    arith_train=8000, arith_test=200, cpt_variants={**CPT_VARIANTS, **CPT_GRID})


def quick_settings() -> Settings:
    """Every code path (checkpoints, LoRA, Control and its merged model, both stages) in minutes; the
    replay variant differs from full only in its data file, which every plan writes."""
    return Settings(
        plan="quick", mc_items=4, english_texts=4, text_chars=240, spanish_val=4, spanish_test=4,
        cpt_steps=4, cpt_batch=2, cpt_seq=32, sft_steps=3, sft_batch=4, stage2_steps=4, arith_train=64,
        arith_val=4, arith_test=4, answer_tokens=10,
        cpt_variants={"full": Variant(dict(method="full"), 3e-4, wise_ft=(0.5,)),
                      "lora-r16": CPT_VARIANTS["lora-r16"], "control-nmse-8": CONTROL_NMSE,
                      "control-recommended": CPT_VARIANTS["control-recommended"]},
        seq_variants={"full": SEQ_VARIANTS["full"], "control-nmse-8": CONTROL_NMSE},
    )


# Where each plan's report goes by default (the fast plan is the one `make bench-retention` runs).
RESULTS = {"fast": lambda runs: os.path.join(ROOT, "benchmarks", "results"),
           "full": lambda runs: os.path.join(ROOT, "benchmarks", "results", "retention_full"),
           "gpu": lambda runs: os.path.join(ROOT, "benchmarks", "results", "retention_gpu"),
           "quick": lambda runs: os.path.join(runs, "report")}
PLANS = {"full": full_settings, "fast": fast_settings, "gpu": gpu_settings, "quick": quick_settings}


# ------------------------------------------------------------------------------ checkpoints
class CheckpointPruner:
    """Deletes the checkpoints a run writes at steps it will not score, as soon as they appear
    (a full fine-tuning checkpoint with its optimizer state is 1.6 GB)."""

    def __init__(self, run_dir: str, keep: set[int]):
        self.run_dir, self.keep = run_dir, keep
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.prune()

    def _loop(self):
        while not self._stop.wait(5.0):
            self.prune()

    def prune(self):
        for name in os.listdir(self.run_dir) if os.path.isdir(self.run_dir) else []:
            step = name[len("checkpoint-"):]
            if name.startswith("checkpoint-") and step.isdigit() and int(step) not in self.keep:
                shutil.rmtree(os.path.join(self.run_dir, name), ignore_errors=True)


def load_checkpoint_state(model, method: str, checkpoint: str) -> None:
    """Load a checkpoint's trained weights into `model`, the finished run's own model object (so
    the loader does not need to know what the run started from)."""
    from safetensors.torch import load_file

    from controlllm.model import WEIGHTS_NAME, ControlModel

    if isinstance(model, ControlModel):
        model.load_trainable_state(load_file(os.path.join(checkpoint, WEIGHTS_NAME)), source=checkpoint)
    elif method == "lora":
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(os.path.join(checkpoint, "adapter_model.safetensors")))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{checkpoint}: unexpected LoRA keys {result.unexpected_keys[:3]}")
    else:
        state = load_file(os.path.join(checkpoint, "model.safetensors"))
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
        if unexpected or set(missing) - tied:
            raise ValueError(f"{checkpoint}: missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]}")


@torch.no_grad()
def interpolate_weights(model, base_state: dict, tuned_state: dict, alpha: float) -> None:
    """Set `model`'s floating-point weights to base + alpha (tuned - base) (WiSE-FT); alpha 0 is the
    base model, 1 the fine-tuned one. Other entries (integer buffers) are taken from `tuned_state`."""
    if set(base_state) != set(tuned_state):
        raise ValueError(f"the base and fine-tuned models differ in weights: "
                         f"{sorted(set(base_state) ^ set(tuned_state))[:3]}")
    mixed = {k: (base_state[k] + alpha * (t - base_state[k]) if t.is_floating_point() else t)
             for k, t in tuned_state.items()}
    model.load_state_dict(mixed)


# ------------------------------------------------------------------------------------ bench
class Bench:
    """Data, evaluation sets, the base model's cached scores and the run loop of one worker."""

    def __init__(self, settings: Settings, runs_dir: str):
        self.s = settings
        self.runs = runs_dir
        os.makedirs(os.path.join(self.runs, "data"), exist_ok=True)
        _, self.tokenizer = load_pretrained(None)
        self.suite = tasks.RetentionSuite.build(settings.mc_items, settings.english_texts, settings.text_chars)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self._reference = None
        self.records = None  # folder of committed per-run records (<results>/retention_runs/<plan>)
        self._prepare_spanish()
        self._prepare_arithmetic()

    def _prepare_spanish(self):
        s = self.s
        data = tasks.spanish_data(s.text_chars, s.spanish_val, s.spanish_test)
        self.cpt_train = os.path.join(self.runs, "data", "cpt_train.txt")
        self.cpt_replay = os.path.join(self.runs, "data", "cpt_train_replay.txt")
        chars = sum(map(len, data["train"]))
        # Replay: general English making up `replay_share` of the training characters, interleaved.
        replay = tasks.replay_texts(int(chars * s.replay_share / (1 - s.replay_share)))
        mixed = list(data["train"])
        every = max(1, len(mixed) // max(len(replay), 1))
        for k, text in enumerate(replay):
            mixed.insert(min(len(mixed), (k + 1) * every + k), text)
        _write_if_changed(self.cpt_train, "\n\n".join(d.replace("\n\n", "\n") for d in data["train"]))
        _write_if_changed(self.cpt_replay, "\n\n".join(d.replace("\n\n", "\n") for d in mixed))
        self.spanish_val, self.spanish_test, self.spanish_sources = data["val"], data["test"], data["test_sources"]
        self.spanish_info = {"train_documents": len(data["train"]), "train_characters": chars,
                             "replay_texts": len(replay), "replay_characters": sum(map(len, replay)),
                             "val_texts": len(data["val"]), "test_texts": len(data["test"])}

    def _prepare_arithmetic(self):
        s = self.s
        test = tasks.arithmetic_items(s.arith_test, seed=1)
        val = tasks.arithmetic_items(s.arith_val, seed=2, exclude={it["key"] for it in test})
        train_items = tasks.arithmetic_items(s.arith_train, seed=3, exclude={it["key"] for it in test + val})
        self.sft_train = os.path.join(self.runs, "data", "arith_train.jsonl")
        self.sft_val = os.path.join(self.runs, "data", "arith_val.jsonl")
        for path, items in ((self.sft_train, train_items), (self.sft_val, val)):
            _write_if_changed(path, "".join(json.dumps({"prompt": it["prompt"], "response": it["response"]}) + "\n"
                                            for it in items))
        self.arith_val = tasks.arithmetic_gen_items(self.tokenizer, val)
        self.arith_test = tasks.arithmetic_gen_items(self.tokenizer, test)
        self.arith_info = {"train_items": len(train_items), "val_items": len(val), "test_items": len(test),
                           "example": train_items[0]}

    # ------------------------------------------------------------------------ evaluation
    def base_model(self):
        """The base model, loaded once and kept in memory: the KL reference and WiSE-FT's origin."""
        if self._reference is None:
            self._reference, _ = load_pretrained(None)
            self._reference.to(self.device).eval()
        return self._reference

    def reference(self):
        """KL reference: the base model's logits (also in seq, where a run starts from stage 1)."""
        ref = self.base_model()
        return lambda ids, mask: ref(input_ids=ids, attention_mask=mask).logits

    def probes(self, model, experiment: str, mc: bool = False, val: bool = False, is_base: bool = False) -> dict:
        """Scores of one model: Spanish test bits/char, English bits/char and KL to the base; in seq
        the arithmetic exact match; with `val` the Spanish validation texts; with `mc` the MC suite."""
        out, seconds, tok = {}, {}, self.tokenizer
        model.to(self.device)
        start = time.time()
        sp = tasks.per_text_scores(model, tok, self.spanish_test, batch_size=8)
        out["spanish"] = {"bpc": tasks.bpc(sp), "nll": sp["nll"], "chars": sp["chars"]}
        if val:
            v = tasks.per_text_scores(model, tok, self.spanish_val, batch_size=8)
            # per text too, so the report can tell two learning rates apart on validation with a paired SE
            out["spanish_val"] = {"bpc": tasks.bpc(v), "nll": v["nll"], "chars": v["chars"]}
        seconds["spanish"] = time.time() - start
        start = time.time()
        out["english"] = self.suite.evaluate_english(model, tok, reference=None if is_base else self.reference())
        seconds["english"] = time.time() - start
        if experiment == "seq":
            start = time.time()
            out["arith"] = tasks.exact_match_scores(model, tok, self.arith_test, self.s.answer_tokens)
            seconds["arith"] = time.time() - start
        if mc:
            start = time.time()
            out["mc"] = self.suite.evaluate_mc(model, tok)
            seconds["mc"] = time.time() - start
        out["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
        return out

    def base_scores(self, keys) -> None:
        """Score the base model on `keys` ('mc', 'cpt', 'seq') unless cached (one file each) or among
        the committed records (`base.json` next to the per-run records, with the same fingerprint)."""
        committed = self.committed_base()
        for key in keys:
            if key in committed and (_read_json(self.base_path(key)) or {}).get("fingerprint") != self.fingerprint():
                _write_json(self.base_path(key), {"fingerprint": self.fingerprint(), "scores": committed[key],
                                                  "seconds": committed["seconds"].get(key)})
        todo = [k for k in keys if (_read_json(self.base_path(k)) or {}).get("fingerprint") != self.fingerprint()]
        if not todo:
            return
        model, _ = load_pretrained(None)
        model.to(self.device).eval()
        for key in todo:
            start = time.time()
            if key == "mc":
                scores = {"mc": self.suite.evaluate_mc(model, self.tokenizer)}
            else:
                scores = self.probes(model, key, val=True, is_base=True)
                if key == "seq":
                    scores["arith_val"] = tasks.exact_match_scores(model, self.tokenizer, self.arith_val,
                                                                   self.s.answer_tokens)
            seconds = round(time.time() - start, 1)
            _write_json(self.base_path(key), {"fingerprint": self.fingerprint(), "scores": scores, "seconds": seconds})
            print(f"[{time.strftime('%H:%M:%S')}] base model: {key} scored in {seconds:.0f} s", flush=True)
        del model
        gc.collect()

    def base_path(self, key: str) -> str:
        return os.path.join(self.runs, f"base-{key}.json")

    def committed_base(self) -> dict:
        """The base model's per-item scores committed with the per-run records (`base.json`, written
        by the report), if they were made with this plan's evaluation sets; else {"seconds": {}}."""
        done = _read_json(os.path.join(self.records, "base.json")) if self.records else None
        if not done or done.get("fingerprint") != self.fingerprint():
            return {"seconds": {}}
        return {"seconds": dict(done.get("seconds", {})), **{k: done[k] for k in ("mc", "cpt", "seq") if k in done}}

    def base(self) -> dict:
        """The base model's scores per key, from this run folder's cache, else from the committed
        records; with the seconds each took and the fingerprint of the evaluation sets."""
        out = {"fingerprint": self.fingerprint(), "seconds": {}}
        committed = self.committed_base()
        for key in ("mc", "cpt", "seq"):
            cached = _read_json(self.base_path(key))
            if cached and cached.get("fingerprint") == self.fingerprint():
                out[key] = cached["scores"]
                out["seconds"][key] = cached["seconds"]
            elif key in committed:
                out[key] = committed[key]
                out["seconds"][key] = committed["seconds"].get(key)
        return out

    def fingerprint(self) -> dict:
        keys = ("mc_items", "english_texts", "text_chars", "spanish_val", "spanish_test", "arith_val", "arith_test",
                "answer_tokens")
        return {k: getattr(self.s, k) for k in keys}

    # ------------------------------------------------------------------------------ runs
    def folder(self, experiment: str, name: str) -> str:
        return os.path.join(self.runs, experiment, name)

    def config(self, variant: Variant, task: str, lr: float, output: str, steps: int, save_steps: int,
               model: str | None = None) -> TrainConfig:
        s = self.s
        common = dict(output=output, lr=lr, seed=SEED, progress=False, logging_steps=max(1, steps // 20),
                      threads=s.threads, bf16=s.bf16, max_steps=steps, save_steps=save_steps,
                      save_total_limit=steps // save_steps + 1, model=model, keep_checkpoints=True, **variant.overrides)
        if task == "cpt":
            data = self.cpt_replay if variant.replay else self.cpt_train
            return TrainConfig(data=data, task="cpt", batch_size=s.cpt_batch, seq_len=s.cpt_seq, **common)
        return TrainConfig(data=self.sft_train, task="sft", batch_size=s.sft_batch, seq_len=128, **common)

    def train_scored(self, cfg: TrainConfig, experiment: str, steps: list[int], start_model=None,
                     mc_last: bool = False) -> tuple[dict, object]:
        """Train one run, then score the checkpoints at `steps`; returns (record, trained model)."""
        shutil.rmtree(cfg.output, ignore_errors=True)
        kwargs = {}
        if cfg.model is None or start_model is not None:
            model, tokenizer = start_model if start_model is not None else load_pretrained(None)
            kwargs = dict(model=model, tokenizer=tokenizer)
        with CheckpointPruner(cfg.output, set(steps)):
            result = train(cfg, **kwargs)
        trained = result.model
        trained.eval()
        record = {"config": _jsonable(dataclasses.asdict(cfg)), "train_seconds": round(result.seconds, 1),
                  "trainable_parameters": result.trainable_parameters, "total_parameters": result.total_parameters,
                  "train_log": _read_jsonl(os.path.join(cfg.output, "metrics.jsonl")), "checkpoints": []}
        tokens_per_step = (cfg.batch_size * cfg.seq_len if cfg.task == "cpt" else None)
        # Earlier checkpoints first (loaded into the trained model object), the last one as trained.
        for step in steps[:-1]:
            load_checkpoint_state(trained, cfg.method, os.path.join(cfg.output, f"checkpoint-{step}"))
            record["checkpoints"].append({"step": step, **self.probes(trained, experiment)})
        load_checkpoint_state(trained, cfg.method, os.path.join(cfg.output, f"checkpoint-{steps[-1]}"))
        record["checkpoints"].append({"step": steps[-1], **self.probes(trained, experiment, mc=mc_last, val=True)})
        for c in record["checkpoints"]:
            c["tokens"] = c["step"] * tokens_per_step if tokens_per_step else None
        if hasattr(trained, "interpolation_weights"):
            record["interpolation_weights"] = {str(k): round(float(v), 4)
                                               for k, v in trained.interpolation_weights().items()}
        del result
        gc.collect()
        return record, trained

    def finished(self, experiment: str, name: str, cfg: TrainConfig, wise_ft: tuple[float, ...] = ()) -> dict | None:
        """The run's result if it already finished with the same settings (and WiSE-FT points at
        `wise_ft`): in this run folder, or among the per-run records committed with the results (so a
        long plan resumes on a new checkout; paths are compared relative to the run folder they were
        made in)."""
        own = os.path.join(self.folder(experiment, name), "result.json")
        wanted = _portable_config(_jsonable(dataclasses.asdict(cfg)))
        committed = [os.path.join(self.records, experiment, f"{name}.json")] if self.records else []
        for path in [own, *committed]:
            done = _read_json(path)
            alphas = tuple(p["alpha"] for p in (done or {}).get("wise_ft", []))
            if done and not done.get("failed") and _portable_config(done.get("config")) == wanted \
                    and alphas == tuple(wise_ft):
                if path != own:
                    os.makedirs(os.path.dirname(own), exist_ok=True)
                    _write_json(own, done)
                    print(f"[{time.strftime('%H:%M:%S')}] {experiment} {name}: finished earlier ({path})", flush=True)
                return done
        return None

    def planned(self, experiment: str, name: str) -> tuple[TrainConfig, tuple[float, ...]]:
        """The TrainConfig a finished run must have been made with (seq: its stage 2), and its
        WiSE-FT alphas: what `finished` compares a record against."""
        s, variant, folder = self.s, self.s.variants(experiment)[name], self.folder(experiment, name)
        if experiment == "cpt":
            steps = checkpoint_steps(s.cpt_steps)
            return (self.config(variant, "cpt", variant.lr, os.path.join(folder, "train"), s.cpt_steps, steps[0]),
                    variant.wise_ft)
        steps = checkpoint_steps(s.stage2_steps)
        return (self.config(variant, "cpt", variant.lr, os.path.join(folder, "stage2"), s.stage2_steps, steps[0],
                            model=os.path.join(folder, "stage1")), ())

    def run_cpt(self, name: str, variant: Variant) -> dict:
        s = self.s
        folder = self.folder("cpt", name)
        steps = checkpoint_steps(s.cpt_steps)
        cfg = self.config(variant, "cpt", variant.lr, os.path.join(folder, "train"), s.cpt_steps, steps[0])
        done = self.finished("cpt", name, cfg, variant.wise_ft)
        if done:
            return done
        print(f"[{time.strftime('%H:%M:%S')}] cpt {name} lr={variant.lr:g}: training {s.cpt_steps} steps", flush=True)
        record, trained = self.train_scored(cfg, "cpt", steps, mc_last=True)
        out = {"experiment": "cpt", "variant": name, "lr": variant.lr, "replay": variant.replay, **record}
        if variant.wise_ft:
            out["wise_ft"] = self.wise_ft(trained, variant.wise_ft, steps[-1])
        self._merged(out, trained, "cpt", mc=True)
        return self._finish(folder, out, cfg)

    def run_seq(self, name: str, variant: Variant) -> dict:
        s = self.s
        folder = self.folder("seq", name)
        stage1_dir, stage2_dir = os.path.join(folder, "stage1"), os.path.join(folder, "stage2")
        cfg1 = self.config(variant, "sft", variant.stage1_lr, stage1_dir, s.sft_steps, s.sft_steps)
        steps = checkpoint_steps(s.stage2_steps)
        cfg2 = self.config(variant, "cpt", variant.lr, stage2_dir, s.stage2_steps, steps[0], model=stage1_dir)
        done = self.finished("seq", name, cfg2)
        if done:
            return done
        print(f"[{time.strftime('%H:%M:%S')}] seq {name}: stage 1 (arithmetic) lr={variant.stage1_lr:g}, "
              f"{s.sft_steps} steps", flush=True)
        stage1, model1 = self.train_scored(cfg1, "seq", [s.sft_steps])
        stage1["val"] = tasks.exact_match_scores(model1, self.tokenizer, self.arith_val, s.answer_tokens)
        print(f"[{time.strftime('%H:%M:%S')}]   stage 1: {report.headline('seq', stage1['checkpoints'][-1])}",
              flush=True)
        del model1
        gc.collect()
        print(f"[{time.strftime('%H:%M:%S')}] seq {name}: stage 2 (Spanish) lr={variant.lr:g}, {s.stage2_steps} steps",
              flush=True)
        planned = cfg2
        try:  # the library's multi-stage training: a new run from stage 1's run folder
            record, trained = self.train_scored(cfg2, "seq", steps)
            start = "library multi-stage (TrainConfig.model = stage 1's run folder)"
        except (AssetError, OSError, ValueError) as error:
            print(f"[{time.strftime('%H:%M:%S')}]   this library cannot start a run from a run folder ({error}); "
                  "stage 2 starts from stage 1's model, merged into a plain model", flush=True)
            cfg2 = dataclasses.replace(cfg2, model=None)
            record, trained = self.train_scored(cfg2, "seq", steps, start_model=self.stage1_model(variant, stage1_dir))
            start = "stage 1's model merged into a plain model (merge_and_unload for LoRA and Control)"
        out = {"experiment": "seq", "variant": name, "lr": variant.lr, "stage1_lr": variant.stage1_lr,
               "stage1": stage1, "stage2_start": start, **record}
        self._merged(out, trained, "seq", mc=False)
        shutil.rmtree(stage1_dir, ignore_errors=True)
        return self._finish(folder, out, planned)

    def stage1_model(self, variant: Variant, stage1_dir: str):
        """Stage 1's finished model as a plain transformers model (and the tokenizer)."""
        final = os.path.join(stage1_dir, "final")
        method = variant.overrides["method"]
        if method in ("full", "freeze"):
            return load_pretrained(final)
        base, tokenizer = load_pretrained(None)
        if method == "lora":
            from peft import PeftModel

            return PeftModel.from_pretrained(base, final).merge_and_unload(), tokenizer
        from controlllm.model import ControlModel

        return ControlModel.from_pretrained(base, final).merge_and_unload(), tokenizer

    def wise_ft(self, trained, alphas: tuple[float, ...], step: int) -> list[dict]:
        """WiSE-FT points of a fully fine-tuned model: its weights interpolated with the base model's
        at each alpha, scored like a last checkpoint (MC included). `trained` is left as it was."""
        base_state = self.base_model().state_dict()
        tuned = {k: v.detach().clone() for k, v in trained.state_dict().items()}
        points = []
        for alpha in alphas:
            interpolate_weights(trained, base_state, tuned, alpha)
            points.append({"alpha": alpha, "step": step, **self.probes(trained, "cpt", mc=True, val=True)})
            print(f"[{time.strftime('%H:%M:%S')}]   WiSE-FT alpha {alpha:g}: {report.headline('cpt', points[-1])}",
                  flush=True)
        trained.load_state_dict(tuned)
        del tuned
        gc.collect()
        return points

    def _merged(self, out: dict, trained, experiment: str, mc: bool) -> None:
        """For Control and stack runs, the merged model's probes at the last checkpoint."""
        if hasattr(trained, "merge_and_unload") and out["config"]["method"] in ("control", "stack"):
            blocks = getattr(trained, "control_blocks", {})
            out["merge_weights"] = {str(i): {"w": round(float(b.merge_weight()), 4), "source": b.merge_weight_source()}
                                    for i, b in sorted(blocks.items()) if hasattr(b, "merge_weight")}
            merged = trained.merge_and_unload()
            merged.eval()
            out["merged"] = {"step": out["checkpoints"][-1]["step"], **self.probes(merged, experiment, mc=mc, val=True)}

    def _finish(self, folder: str, out: dict, cfg: TrainConfig) -> dict:
        out["config"] = _jsonable(dataclasses.asdict(cfg))
        _write_json(os.path.join(folder, "result.json"), out)
        shutil.rmtree(cfg.output, ignore_errors=True)  # weights are not needed once scored
        last = out["checkpoints"][-1]
        print(f"[{time.strftime('%H:%M:%S')}]   {out['experiment']} {out['variant']} done: trained "
              f"{out['train_seconds']:.0f} s; {report.headline(out['experiment'], last)}", flush=True)
        gc.collect()
        return out

    def run(self, experiment: str, name: str) -> dict | None:
        variant = self.s.variants(experiment)[name]
        missing = variant.missing_fields()
        if missing:
            print(f"[{time.strftime('%H:%M:%S')}] {experiment} {name}: skipped; this library's TrainConfig has no "
                  f"{', '.join(missing)}", flush=True)
            return None
        folder = self.folder(experiment, name)
        os.makedirs(folder, exist_ok=True)
        try:
            return self.run_cpt(name, variant) if experiment == "cpt" else self.run_seq(name, variant)
        except TrainingError as error:  # e.g. a non-finite loss
            out = {"experiment": experiment, "variant": name, "lr": variant.lr, "failed": str(error)}
            _write_json(os.path.join(folder, "result.json"), out)
            print(f"[{time.strftime('%H:%M:%S')}]   failed: {error}", flush=True)
            return out


# ------------------------------------------------------------------------------ helpers
def _jsonable(data):
    return json.loads(json.dumps(data))


def _portable_config(config: dict | None) -> dict | None:
    """A run's TrainConfig with paths made relative to the run folder it was made in (`output` is
    <runs>/<experiment>/<variant>/<stage>)."""
    if not config or not isinstance(config.get("output"), str):
        return config
    runs = os.path.dirname(os.path.dirname(os.path.dirname(config["output"])))
    # Options TrainConfig gained after a run was made, at their defaults, do not make it another run.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return {k: os.path.relpath(v, runs) if isinstance(v, str) and v.startswith(runs + os.sep) else v
            for k, v in config.items() if k not in NOT_THE_MODEL and (k not in LATER_OPTIONS or v != defaults.get(k))}


# TrainConfig fields added after the committed runs were made (their defaults change nothing).
LATER_OPTIONS = ("mix_data", "mix_ratio", "keep_data", "max_kl", "max_keep_increase", "quantize_base", "copy_rank",
                 "copy_alpha")
# Fields that say what is kept on disk, not which model is trained (the benchmark keeps its checkpoints).
NOT_THE_MODEL = ("keep_checkpoints",)


def _write_if_changed(path: str, text: str) -> None:
    """Write a data file atomically, and only when its content differs (another process may read it)."""
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


def collect(bench: Bench, committed: bool = False) -> dict:
    """Every finished run on disk, per experiment and variant, in the plan's order. With `committed`
    (--report-only), a run missing from the run folder is taken from the committed per-run records
    when it was made with the plan's settings, so the report regenerates on a new checkout from the
    committed files alone."""
    out = {}
    for experiment in EXPERIMENTS:
        for name, variant in bench.s.variants(experiment).items():
            result = _read_json(os.path.join(bench.folder(experiment, name), "result.json"))
            if result is None and committed and not variant.missing_fields():
                result = bench.finished(experiment, name, *bench.planned(experiment, name))
            if result:
                out.setdefault(experiment, {})[name] = result
    return out


# Seconds per training token of one single-threaded process with another beside it, and seconds per
# scored checkpoint, measured in the previous round of this benchmark on this machine (its run
# records: 62-66 tokens/s full, 76-83 LoRA, 99-105 freeze, 77-78 stack, 76-86 Control on 8 layers;
# MC 0.33 s per item and task; Spanish + English probes 45 s for 24 + 24 texts).
SPEED = {"full": 64, "lora": 78, "freeze": 100, "stack": 77, "control": 80}
BF16_SPEEDUP = 1.5  # measured on SmolLM2 full fine-tuning, 4 x 256 tokens, one thread: 64 -> 95 tokens/s


def estimate_seconds(settings: Settings, experiment: str, name: str) -> float:
    """Process seconds one job takes (training + scoring), for balancing and the plan's estimate."""
    s, v = settings, settings.variants(experiment)[name]
    speed = SPEED[v.overrides["method"]] * (BF16_SPEEDUP if s.bf16 and not torch.cuda.is_available() else 1.0)
    light = (0.9 * s.spanish_test + 1.1 * s.english_texts) * s.text_chars / 500 + 3
    val = 0.9 * s.spanish_val * s.text_chars / 500
    mc = 0.33 * s.mc_items * len(tasks.MC_TASKS)
    merged = v.overrides["method"] in ("control", "stack")
    if experiment == "cpt":
        train_s = s.cpt_steps * s.cpt_batch * s.cpt_seq / speed
        score = 4 * light + val + mc + (light + val + mc) * (int(merged) + len(v.wise_ft))
        return train_s + score + 30
    arith = 0.35 * s.arith_test
    train_s = s.sft_steps * s.sft_batch * 57 / speed + s.stage2_steps * s.cpt_batch * s.cpt_seq / speed
    score = 2 * (light + arith) + 4 * (light + arith) + 2 * val + (light + arith + val if merged else 0)
    return train_s + score + 60


# The order runs start in: the runs the verdict rests on first, so a partial run already answers
# most of the question (full fine-tuning's forgetting, the gentle frontier, the Control recipes).
PRIORITY = ("full", "full-gentle", "control-recommended", "control-paper-cpt", "control-paper-csft", "lora-r16",
            "stack-8", "full-replay", "freeze-8", "control-budget-0.01", "control-budget-0.001", "full-1e-4",
            "control-recommended-1e-3")


def assign(settings: Settings, jobs: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """Split jobs over the workers in priority order (CPT before sequential, then `PRIORITY`), each
    onto the least loaded worker."""
    loads = [[0.0, []] for _ in range(settings.workers)]
    rank = {name: k for k, name in enumerate(PRIORITY)}
    for job in sorted(jobs, key=lambda j: (EXPERIMENTS.index(j[0]), rank.get(j[1], len(rank)))):
        slot = min(loads, key=lambda x: x[0])
        slot[0] += estimate_seconds(settings, *job)
        slot[1].append(job)
    return [slot[1] for slot in loads]


def environment(settings: Settings, command: str) -> dict:
    import peft

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        cpu += f"; GPU {torch.cuda.get_device_name(0)}"
    settings_dict = {k: v for k, v in dataclasses.asdict(settings).items() if not k.endswith("_variants")}
    plan = {exp: {name: {"lr": v.lr, "stage1_lr": v.stage1_lr, "replay": v.replay, **v.overrides,
                         **({"wise_ft": list(v.wise_ft)} if v.wise_ft else {})}
                  for name, v in settings.variants(exp).items()} for exp in EXPERIMENTS}
    return {"command": command, "machine": f"{cpu}, {os.cpu_count()} CPU cores", "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "seed": SEED, "settings": settings_dict, "plan": plan, "checkpoints": {
                "cpt": checkpoint_steps(settings.cpt_steps), "seq": checkpoint_steps(settings.stage2_steps)}}


def invocations(record: dict | None) -> list[dict]:
    """The invocations that ran a plan, from runs/.../invocation.json (older files hold one)."""
    record = record or {}
    return record.get("invocations", [record] if "seconds" in record else [])


def invocations_seconds(record: dict | None) -> float:
    """Wall time of a plan: the sum over the invocations that ran it."""
    return float(sum(i["seconds"] for i in invocations(record)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", choices=[p for p in PLANS if p != "quick"], default="fast",
                        help="sizes: fast (fits 100 min on 2 cores), full (10x the tokens, about 3.5 h), gpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks every code path in minutes")
    parser.add_argument("--runs", default=None, help="run folder (default runs/retention/<plan>)")
    parser.add_argument("--results", default=None,
                        help="where the report goes (default benchmarks/results; runs/.../report for --quick)")
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS), help="comma-separated subset of: cpt,seq")
    parser.add_argument("--variants", default=None, help="comma-separated subset of the plan's variants")
    parser.add_argument("--workers", type=int, default=None, help="processes side by side (default: the plan's)")
    parser.add_argument("--estimate", action="store_true", help="print the plan's estimated time and stop")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from finished runs and stop")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # 'cpt:full,seq:lora-r16,...'
    args = parser.parse_args(argv)
    settings = PLANS["quick" if args.quick else args.plan]()
    if args.workers:
        settings.workers = args.workers
    experiments = [e for e in args.experiments.split(",") if e]
    for experiment in experiments:
        if experiment not in EXPERIMENTS:
            parser.error(f"unknown experiment {experiment!r}; allowed: {', '.join(EXPERIMENTS)}")
    wanted = None if args.variants is None else set(args.variants.split(","))
    jobs = [(e, n) for e in experiments for n in settings.variants(e) if wanted is None or n in wanted]
    if args.estimate:
        plan = assign(settings, jobs)
        for k, part in enumerate(plan):
            total = sum(estimate_seconds(settings, *j) for j in part)
            print(f"worker {k}: {total / 60:.0f} min: " + ", ".join(f"{e}:{n}" for e, n in part))
        print(f"estimated wall time: {max(sum(estimate_seconds(settings, *j) for j in p) for p in plan) / 60 + 4:.0f} "
              "min (+4 min base-model scoring and start-up)")
        return 0
    torch.set_num_threads(settings.threads)
    transformers.utils.logging.disable_progress_bar()
    runs = os.path.abspath(args.runs or os.path.join(ROOT, "runs", "retention", settings.plan))
    results = os.path.abspath(args.results or RESULTS[settings.plan](runs))
    os.makedirs(results, exist_ok=True)
    command = "python benchmarks/retention/run.py" + (" --quick" if args.quick else f" --plan {settings.plan}")
    started = time.time()
    bench = Bench(settings, runs)
    bench.records = os.path.join(results, "retention_runs", settings.plan)
    info = {"environment": environment(settings, command),
            "data": {"spanish": bench.spanish_info, "arithmetic": bench.arith_info}}
    invocation = os.path.join(runs, "invocation.json")
    earlier = invocations_seconds(_read_json(invocation))  # this plan's earlier invocations, if resumed

    def publish(elapsed=None):
        report.write(results, info, bench.base(), collect(bench, committed=args.report_only), settings,
                     elapsed=earlier + time.time() - started if elapsed is None else elapsed)

    if args.report_only:
        committed = _read_json(os.path.join(results, "retention.json")) or {}
        # The machine and versions are those that ran the plan (the committed report's), not this one's.
        ran = committed.get("environment", {})
        info["environment"].update({k: ran[k] for k in ("machine", "python", "torch", "transformers", "peft")
                                    if k in ran})
        bench.base_scores(["mc", "cpt", "seq"])  # a no-op where the base model's scores are committed
        publish(invocations_seconds(_read_json(invocation)) or committed.get("elapsed_seconds", 0.0))
        return 0
    if args.worker is not None or settings.workers == 1:
        mine = [tuple(j.split(":", 1)) for j in args.worker.split(",") if j] if args.worker else jobs
        index = int(os.environ.get("RETENTION_WORKER", "0"))
        # Worker 0 scores the base model on the MC suite, worker 1 on the probes (cached on disk).
        keys = (["mc", "cpt", "seq"] if settings.workers == 1 else (["mc"] if index == 0 else ["cpt", "seq"]))
        bench.base_scores(keys)
        for experiment, name in mine:
            bench.run(experiment, name)
            publish()
        if args.worker is not None:
            return 0
    else:
        print(f"[{time.strftime('%H:%M:%S')}] retention benchmark ({settings.plan}): {len(jobs)} runs on "
              f"{settings.workers} workers", flush=True)
        procs = []
        for k, part in enumerate(assign(settings, jobs)):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", ",".join(f"{e}:{n}" for e, n in part),
                   "--runs", runs, "--results", results, "--workers", str(settings.workers)]
            cmd += ["--quick"] if args.quick else ["--plan", settings.plan]
            procs.append(subprocess.Popen(cmd, env={**os.environ, "RETENTION_WORKER": str(k)}))
        failed = [k for k, p in enumerate(procs) if p.wait() != 0]
        # A worker that finished early may have skipped the base scores the other was writing.
        bench.base_scores(["mc", "cpt", "seq"])
        if failed:
            publish()
            print(f"worker(s) {failed} failed; see the output above", file=sys.stderr)
            return 1
    # A plan run in several invocations (resumed, or a subset of its runs at a time) reports the sum.
    this = {"seconds": round(time.time() - started, 1), "jobs": [f"{e}:{n}" for e, n in jobs],
            "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    history = invocations(_read_json(invocation)) + [this]  # read again: another invocation may have ended
    _write_json(invocation, {"invocations": history})
    publish(earlier + this["seconds"])
    print(f"[{time.strftime('%H:%M:%S')}] done in {(time.time() - started) / 60:.1f} min; report in {results}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
