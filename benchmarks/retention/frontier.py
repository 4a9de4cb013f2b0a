"""Method + dial frontiers: what a user can get from each method, at fair learning rates, in two settings.

Every method trains on SmolLM2-135M-Instruct over a learning-rate grid of three rates, the rate
chosen on the new skill's validation split only (at s = 1, the run as trained). Each run is then
read along its trajectory (half way, the end) and along its dial at the end
(`controlllm.dial.Dial`: WiSE-FT for full and freeze fine-tuning, the LoRA scale, the copies'
contribution for stack, the interpolation weight for Control) at s = 0.25, 0.5, 0.75. A method's
frontier is the Pareto envelope of those points; methods are compared at equal gain on it.

Two settings:
- cpt: continued pre-training on Spanish (a new language); gain = Spanish test bits/char.
- csft: continued SFT on arithmetic word problems with gold answers (the paper's headline
  setting); gain = exact match on held-out items.
Forgetting, both: KL to the base model and bits/char on held-out English; multiple choice (ARC-Easy,
PIQA, HellaSwag) at the end of each run.

Rows: every method's grid (full 3e-5/1e-4/3e-4, LoRA, freeze-8, stack-8, three Control presets on 8
copies from the authors' 5e-5 up, low-rank Control on LoRA's grid, and in csft SDFT, self-distillation
through TRL, 1e-5/3e-5/1e-4, dialled by WiSE-FT like full) at seed 42, and for full fine-tuning (the reference, whose gain
sets the levels) one rate beyond the edge of its grid where validation chose that edge; each setting's
grids followed by its headline rows at
seeds 1 and 2 (full at its chosen rate, gentle full = its lowest rate, LoRA and the best Control at
their chosen rates); then in cpt each method but low-rank Control at its chosen rate with 10% general English mixed in
(`TrainConfig.mix_data`).

    .venv/bin/python benchmarks/retention/frontier.py                # the plan; resumes; ~10 min per run per worker
    .venv/bin/python benchmarks/retention/frontier.py --estimate     # list the jobs and what is finished
    .venv/bin/python benchmarks/retention/frontier.py --report-only  # rewrite the report from the records
    .venv/bin/python benchmarks/retention/frontier.py --quick        # smoke run of every code path

Workers take the next unfinished job from one queue (claimed with a lock folder), so any number of
invocations share a plan; jobs that depend on chosen rates wait until their grid is finished. Each
finished run is copied to benchmarks/results/retention_runs/frontier/<experiment>/<name>.json, and
the report (benchmarks/results/retention_frontier.{md,json,png}) is rewritten after every run: a plan
resumes on a new checkout from the committed records.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
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

import frontier_report as report  # noqa: E402
import retention_tasks as tasks  # noqa: E402
import run as retention  # noqa: E402
from run import CheckpointPruner, _jsonable, _read_json, _read_jsonl, _write_if_changed, _write_json  # noqa: E402

from controlllm.assets import load_pretrained  # noqa: E402
from controlllm.dial import Dial  # noqa: E402
from controlllm.integrations.sdft import train_sdft  # noqa: E402
from controlllm.training.data import read_chat_records  # noqa: E402
from controlllm.training.train import TrainConfig, TrainingError, train  # noqa: E402

EXPERIMENTS = ("cpt", "csft")
SEEDS = (42, 1, 2)  # the first is the grid's
DIAL_POINTS = (0.25, 0.5, 0.75)
LORA = dict(method="lora", lora_r=16, lora_alpha=32)
CONTROL_RATES = (5e-5, 3e-4, 1e-3)  # from the authors' 5e-5 up
# Method families and their learning-rate grids (the same in both settings). Control, freeze and
# stack all train 8 of the 30 layers.
FAMILIES = {  # in the order their grids run: the rows the verdict rests on first
    "full": (dict(method="full"), (3e-5, 1e-4, 3e-4)),
    "control-recommended-8": (dict(method="control", preset="recommended", num_expanded_layers=8), CONTROL_RATES),
    "lora-r16": (LORA, (3e-4, 1e-3, 3e-3)),
    "control-paper-csft-8": (dict(method="control", preset="paper-csft", num_expanded_layers=8), CONTROL_RATES),
    "stack-8": (dict(method="stack", num_expanded_layers=8), (1e-4, 3e-4, 1e-3)),
    "freeze-8": (dict(method="freeze", num_expanded_layers=8), (1e-4, 3e-4, 1e-3)),
    "control-paper-cpt-8": (dict(method="control", preset="paper-cpt", num_expanded_layers=8), CONTROL_RATES),
    # Low-rank Control (`--copy-rank 16`): the recommended recipe on the same 8 layers, each copy its frozen
    # layer plus rank-16, alpha-32 factors on its 7 linear layers; LoRA's grid, since it trains LoRA-sized factors.
    "lowrank-control-8": (dict(method="control", preset="recommended", num_expanded_layers=8, copy_rank=16,
                               copy_alpha=32), (3e-4, 1e-3, 3e-3)),
    # Self-distillation fine-tuning (TRL's SDFTTrainer through controlllm.integrations.sdft, as
    # `controlllm compare --methods sdft`): every weight trained, dialled like full (WiSE-FT); csft only.
    "sdft": (dict(method="sdft"), (1e-5, 3e-5, 1e-4)),
}
SFT_ONLY = ("sdft",)  # families that learn from demonstrations: not run in cpt
# Families run again with 10% general English mixed in (cpt, at their chosen rates): the first seven.
MIX_FAMILIES = ("full", "control-recommended-8", "lora-r16", "control-paper-csft-8", "stack-8", "freeze-8",
                "control-paper-cpt-8")
SEEDED = report.SEEDED  # the rows run at 3 seeds
MIX_RATIO = 0.1


@dataclass
class Job:
    """One training run of the plan."""

    experiment: str
    family: str
    rate: str  # a learning rate ('3e-05'), 'chosen' (the family's validation choice), 'lowest' or
    # 'beyond' (the reference's rate beyond the edge of its grid that validation chose; report.BEYOND)
    seed: int = SEEDS[0]
    mix: bool = False

    @property
    def name(self) -> str:
        return f"{self.family}@{self.rate}" + (f"-seed{self.seed}" if self.seed != SEEDS[0] else "") + \
            ("-mix" if self.mix else "")


@dataclass
class Settings:
    """Sizes of one plan (the evaluation sets, the training budget)."""

    plan: str
    threads: int = 1
    workers: int = 2
    bf16: bool = False  # this machine's CPU has no bfloat16 instructions: float32 is faster
    mc_items: int = 100
    english_texts: int = 24
    text_chars: int = 500
    spanish_val: int = 16
    spanish_test: int = 24
    cpt_steps: int = 32
    cpt_batch: int = 4
    cpt_seq: int = 128
    replay_share: float = 0.1
    sft_steps: int = 32
    sft_batch: int = 8
    arith_train: int = 3000
    arith_val: int = 48
    arith_test: int = 96
    answer_tokens: int = 24
    families: dict = field(default_factory=lambda: dict(FAMILIES))
    dial_points: tuple = DIAL_POINTS
    seeds: tuple = SEEDS


def quick_settings() -> Settings:
    """Every code path (grid, chosen rate, seeds, mix, every dial kind) in minutes."""
    return Settings(plan="frontier-quick", mc_items=4, english_texts=4, text_chars=240, spanish_val=4,
                    spanish_test=4, cpt_steps=4, cpt_batch=2, cpt_seq=32, sft_steps=4, sft_batch=4, arith_train=64,
                    arith_val=4, arith_test=4, answer_tokens=10, dial_points=(0.5,), seeds=(42, 1),
                    families={"full": (dict(method="full"), (3e-5, 3e-4)),
                              "lora-r16": (LORA, (3e-3,)),
                              "control-recommended-8": (dict(method="control", preset="recommended",
                                                             num_expanded_layers=2), (1e-3,)),
                              "sdft": (dict(method="sdft"), (3e-5,))})


PLANS = {"frontier": lambda: Settings(plan="frontier"), "frontier-quick": quick_settings}


def jobs(s: Settings) -> list[Job]:
    """The plan's jobs in the order they start: per setting (cpt first) every grid (the families in
    FAMILIES' order), then that setting's seed rows, so that one setting's verdict across seeds comes
    before the next setting starts; then the mixed-data rows."""
    out = []
    for experiment in EXPERIMENTS:
        families = [f for f in s.families if experiment == "csft" or f not in SFT_ONLY]
        out += [Job(experiment, fam, f"{lr:g}") for fam in families for lr in s.families[fam][1]]
        out += [Job(experiment, fam, "beyond") for fam in families]
        for seed in s.seeds[1:]:
            for row in SEEDED:
                if row == "full-gentle":
                    out.append(Job(experiment, "full", "lowest", seed))
                elif row == "control-best" or row in s.families:
                    out.append(Job(experiment, row, "chosen", seed))
    out += [Job("cpt", fam, "chosen", mix=True) for fam in s.families if fam in MIX_FAMILIES]
    return out


class FrontierBench(retention.Bench):
    """The retention benchmark's data and evaluation sets, scored per setting, with the dial."""

    def __init__(self, settings: Settings, runs_dir: str, records: str):
        super().__init__(settings, runs_dir)
        self.records = records
        self.mix_path = os.path.join(self.runs, "data", "mix_english.txt")
        chars = self.spanish_info["train_characters"]
        mix = tasks.replay_texts(int(chars * MIX_RATIO / (1 - MIX_RATIO)))
        _write_if_changed(self.mix_path, "\n\n".join(t.replace("\n\n", "\n") for t in mix))

    # ---------------------------------------------------------------------------- scoring
    def probes(self, model, experiment: str, mc: bool = False, val: bool = False, is_base: bool = False) -> dict:
        """cpt: Spanish test bits/char (and validation); csft: arithmetic exact match (and validation);
        both: English bits/char and KL to the base; with `mc` the multiple-choice suite."""
        out, seconds, tok = {}, {}, self.tokenizer
        model.to(self.device)
        start = time.time()
        if experiment == "cpt":
            sp = tasks.per_text_scores(model, tok, self.spanish_test, batch_size=8)
            out["spanish"] = {"bpc": tasks.bpc(sp), "nll": sp["nll"], "chars": sp["chars"]}
            if val:
                v = tasks.per_text_scores(model, tok, self.spanish_val, batch_size=8)
                out["spanish_val"] = {"bpc": tasks.bpc(v), "nll": v["nll"], "chars": v["chars"]}
        else:
            out["arith"] = tasks.exact_match_scores(model, tok, self.arith_test, self.s.answer_tokens)
            if val:
                out["arith_val"] = tasks.exact_match_scores(model, tok, self.arith_val, self.s.answer_tokens)
        seconds["skill"] = time.time() - start
        start = time.time()
        out["english"] = self.suite.evaluate_english(model, tok, reference=None if is_base else self.reference())
        seconds["english"] = time.time() - start
        if mc:
            start = time.time()
            out["mc"] = self.suite.evaluate_mc(model, tok)
            seconds["mc"] = time.time() - start
        out["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
        return out

    def base_scores(self, keys=("mc", "cpt", "csft")) -> None:
        """Score the base model on `keys` unless cached in the run folder or committed (base.json)."""
        have = self.base()
        todo = [key for key in keys if key not in have]
        if not todo:
            return
        model, _ = load_pretrained(None)
        model.to(self.device).eval()
        for key in todo:
            start = time.time()
            scores = ({"mc": self.suite.evaluate_mc(model, self.tokenizer)} if key == "mc"
                      else self.probes(model, key, val=True, is_base=True))
            seconds = round(time.time() - start, 1)
            _write_json(self.base_path(key), {"fingerprint": self.fingerprint(), "scores": scores, "seconds": seconds})
            print(f"[{time.strftime('%H:%M:%S')}] base model: {key} scored in {seconds:.0f} s", flush=True)
        del model
        gc.collect()

    def base(self) -> dict:
        """The base model's scores from the run folder, else from the committed base.json (a fresh checkout)."""
        out = {"fingerprint": self.fingerprint(), "seconds": {}}
        committed = _read_json(os.path.join(self.records, "base.json")) or {}
        for key in ("mc", "cpt", "csft"):
            cached = _read_json(self.base_path(key))
            if cached and cached.get("fingerprint") == self.fingerprint():
                out[key], out["seconds"][key] = cached["scores"], cached["seconds"]
            elif committed.get("fingerprint") == self.fingerprint() and key in committed:
                out[key], out["seconds"][key] = committed[key], committed.get("seconds", {}).get(key)
        return out

    # ------------------------------------------------------------------------------- runs
    def results(self) -> dict:
        """Every finished run: {experiment: {name: record}} from the run folder and the committed records."""
        out = {}
        for experiment in EXPERIMENTS:
            names = set()
            for folder in (os.path.join(self.runs, experiment), os.path.join(self.records, experiment)):
                if os.path.isdir(folder):
                    names |= {n[:-5] if n.endswith(".json") else n for n in os.listdir(folder)
                              if not n.endswith(".lock")}
            for name in sorted(names):
                done = self.finished(experiment, name)
                if done:
                    out.setdefault(experiment, {})[name] = done
        return out

    def finished(self, experiment: str, name: str) -> dict | None:
        """A finished run's record made with this plan's settings, from the run folder or the
        committed records (copied into the run folder)."""
        own = os.path.join(self.runs, experiment, name, "result.json")
        for path in (own, os.path.join(self.records, experiment, f"{name}.json")):
            done = _read_json(path)
            if done and done.get("settings") == self.plan_key(experiment):
                if path != own:
                    os.makedirs(os.path.dirname(own), exist_ok=True)
                    _write_json(own, done)
                return done
        return None

    def plan_key(self, experiment: str) -> dict:
        """What makes two records comparable: the evaluation sets, the training budget, the dial points."""
        s = self.s
        budget = (dict(steps=s.cpt_steps, batch=s.cpt_batch, seq=s.cpt_seq) if experiment == "cpt"
                  else dict(steps=s.sft_steps, batch=s.sft_batch, seq=128, train_items=s.arith_train))
        return _jsonable({**self.fingerprint(), **budget, "dial_points": list(s.dial_points)})

    def resolve(self, job: Job, done: dict) -> tuple[str, float] | None:
        """The job's method family (control-best: the best Control family) and learning rate, or None
        while the grids it depends on are unfinished."""
        family = job.family
        if family == "control-best":
            family = report.best_control(job.experiment, self.base(), done.get(job.experiment, {}), self.s)
            if family is None:
                return None
        rates = self.s.families[family][1]
        if job.rate == "beyond":
            extra = report.beyond_rate(job.experiment, family, rates, done.get(job.experiment, {}))
            return None if extra is None else (family, extra or None)  # (family, None): no such run needed
        if job.rate not in ("chosen", "lowest"):
            return family, float(job.rate)
        chosen = report.chosen_rate(job.experiment, family, rates, done.get(job.experiment, {}))
        if chosen is None:  # "lowest" too: it may turn out to be the chosen rate (then no new run)
            return None
        return family, (min(rates) if job.rate == "lowest" else chosen)

    def duplicate(self, job: Job, done: dict) -> bool:
        """A job not to run: gentle full fine-tuning (its grid's lowest rate) when validation chose that
        rate anyway (the same run as full@chosen at that seed), or the run beyond the reference's grid
        when validation chose an inner rate."""
        if job.rate == "beyond":
            resolved = self.resolve(job, done)
            return resolved is not None and resolved[1] is None
        if job.rate != "lowest":
            return False
        lowest = self.resolve(job, done)
        return lowest is not None and self.resolve(dataclasses.replace(job, rate="chosen"), done) == lowest

    def progress(self, done: dict) -> tuple[int, int]:
        """(finished, planned) jobs; a duplicate of another job counts as neither."""
        planned = [j for j in jobs(self.s) if not self.duplicate(j, done)]
        return sum(1 for j in planned if j.name in done.get(j.experiment, {})), len(planned)

    def config(self, job: Job, family: str, lr: float, output: str) -> TrainConfig:
        """The run's TrainConfig (for SDFT, the same budget as method "full": run_job hands its fields to
        train_sdft)."""
        s, overrides = self.s, dict(self.s.families[family][0])
        if overrides.get("method") == "sdft":
            overrides["method"] = "full"
        steps = s.cpt_steps if job.experiment == "cpt" else s.sft_steps
        common = dict(output=output, lr=lr, seed=job.seed, progress=False, logging_steps=max(1, steps // 16),
                      threads=s.threads, bf16=s.bf16, max_steps=steps, save_steps=steps // 2, save_total_limit=3,
                      keep_checkpoints=True, **overrides)
        if job.mix:
            common.update(mix_data=self.mix_path, mix_ratio=MIX_RATIO)
        if job.experiment == "cpt":
            return TrainConfig(data=self.cpt_train, task="cpt", batch_size=s.cpt_batch, seq_len=s.cpt_seq, **common)
        return TrainConfig(data=self.sft_train, task="sft", batch_size=s.sft_batch, seq_len=128, **common)

    def run_job(self, job: Job, family: str, lr: float) -> dict:
        """Train one run; score it half way, at the end (validation and MC too) and along its dial."""
        folder = os.path.join(self.runs, job.experiment, job.name)
        cfg = self.config(job, family, lr, os.path.join(folder, "train"))
        sdft = self.s.families[family][0].get("method") == "sdft"
        shutil.rmtree(cfg.output, ignore_errors=True)
        half, steps = cfg.save_steps, cfg.max_steps
        print(f"[{time.strftime('%H:%M:%S')}] {job.experiment} {job.name}: {family} lr={lr:g} seed={job.seed}, "
              f"{steps} steps", flush=True)
        model, tokenizer = load_pretrained(None)
        with CheckpointPruner(cfg.output, {half, steps}):
            if sdft:
                result = train_sdft(model, tokenizer, read_chat_records(cfg.data), cfg.output, lr=lr, steps=steps,
                                    batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=job.seed, bf16=cfg.bf16,
                                    threads=cfg.threads, progress=False, save_steps=half, data=cfg.data)
            else:
                result = train(cfg, model=model, tokenizer=tokenizer)
        trained = result.model
        trained.eval()
        out = {"experiment": job.experiment, "variant": job.name, "family": family, "lr": lr, "seed": job.seed,
               "mix": job.mix, "settings": self.plan_key(job.experiment),
               "config": _jsonable({**dataclasses.asdict(cfg), **({"method": "sdft"} if sdft else {})}),
               "train_seconds": round(result.seconds, 1), "trainable_parameters": result.trainable_parameters,
               "train_log": _read_jsonl(os.path.join(cfg.output, "metrics.jsonl")), "checkpoints": [], "dial": []}
        retention.load_checkpoint_state(trained, cfg.method, os.path.join(cfg.output, f"checkpoint-{half}"))
        out["checkpoints"].append({"step": half, **self.probes(trained, job.experiment)})
        retention.load_checkpoint_state(trained, cfg.method, os.path.join(cfg.output, f"checkpoint-{steps}"))
        out["checkpoints"].append({"step": steps, **self.probes(trained, job.experiment, mc=True, val=True)})
        dial = Dial(trained, base=None if cfg.method in ("control", "stack", "lora") else self.base_model())
        out["dial_kind"] = dial.kind
        for value in self.s.dial_points:
            dial.set(value)
            out["dial"].append({"value": value, "step": steps, **self.probes(trained, job.experiment)})
        dial.set(1.0)
        if hasattr(trained, "interpolation_weights"):
            out["interpolation_weights"] = {str(k): round(float(v), 4) for k, v in trained.interpolation_weights().items()}
        _write_json(os.path.join(folder, "result.json"), out)
        os.makedirs(os.path.join(self.records, job.experiment), exist_ok=True)
        _write_json(os.path.join(self.records, job.experiment, f"{job.name}.json"), out)
        shutil.rmtree(cfg.output, ignore_errors=True)
        print(f"[{time.strftime('%H:%M:%S')}]   {job.name} done: trained {out['train_seconds']:.0f} s; "
              f"{report.headline(job.experiment, self.base(), out)}", flush=True)
        del result, trained, dial
        gc.collect()
        return out

    # ------------------------------------------------------------------------------ queue
    def claim(self, job: Job) -> bool:
        """Take `job` for this process (a lock folder with its pid); a dead process's claim is taken over."""
        lock = os.path.join(self.runs, job.experiment, job.name + ".lock")
        os.makedirs(os.path.dirname(lock), exist_ok=True)
        try:
            os.mkdir(lock)
        except FileExistsError:
            pid = (_read_json(os.path.join(lock, "pid.json")) or {}).get("pid")
            if pid is None or _alive(pid):
                return False
            shutil.rmtree(lock, ignore_errors=True)
            return self.claim(job)
        _write_json(os.path.join(lock, "pid.json"), {"pid": os.getpid()})
        return True

    def release(self, job: Job) -> None:
        shutil.rmtree(os.path.join(self.runs, job.experiment, job.name + ".lock"), ignore_errors=True)

    def work(self, publish, wanted=None) -> None:
        """Run unfinished jobs in plan order until none is left that can start."""
        while True:
            done = self.results()
            started = False
            for job in jobs(self.s):
                if (wanted and job.experiment not in wanted) or job.experiment in done and job.name in done[job.experiment]:
                    continue
                resolved = self.resolve(job, done)
                if resolved is None or self.duplicate(job, done) or not self.claim(job):
                    continue
                family, lr = resolved
                try:
                    if not self.finished(job.experiment, job.name):
                        self.run_job(job, family, lr)
                except TrainingError as error:
                    print(f"[{time.strftime('%H:%M:%S')}]   {job.name} failed: {error}", flush=True)
                    out = {"experiment": job.experiment, "variant": job.name, "family": family, "lr": lr,
                           "seed": job.seed, "mix": job.mix, "settings": self.plan_key(job.experiment),
                           "failed": str(error)}
                    _write_json(os.path.join(self.records, job.experiment, f"{job.name}.json"), out)
                finally:
                    self.release(job)
                publish()
                started = True
                break
            if not started:
                if not self.others_running():
                    return
                time.sleep(30)  # a job another worker runs may unblock one that waits for its grid

    def others_running(self) -> bool:
        """Whether another live process holds a claim in this run folder."""
        for experiment in EXPERIMENTS:
            folder = os.path.join(self.runs, experiment)
            for name in os.listdir(folder) if os.path.isdir(folder) else []:
                pid = (_read_json(os.path.join(folder, name, "pid.json")) or {}).get("pid")
                if name.endswith(".lock") and pid not in (None, os.getpid()) and _alive(pid):
                    return True
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks every code path in minutes")
    parser.add_argument("--runs", default=None, help="run folder (default runs/retention/<plan>)")
    parser.add_argument("--results", default=None, help="where the report and records go "
                        "(default benchmarks/results; runs/.../report for --quick)")
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS), help="comma-separated subset of: cpt,csft")
    parser.add_argument("--workers", type=int, default=None, help="processes side by side (default 2)")
    parser.add_argument("--estimate", action="store_true", help="list the jobs, which are finished, and stop")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the records and stop")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = PLANS["frontier-quick" if args.quick else "frontier"]()
    if args.workers is not None:
        if args.workers < 1:
            parser.error(f"--workers must be at least 1, got {args.workers}")
        settings.workers = args.workers
    wanted = [e for e in args.experiments.split(",") if e]
    for experiment in wanted:
        if experiment not in EXPERIMENTS:
            parser.error(f"unknown experiment {experiment!r}; allowed: {', '.join(EXPERIMENTS)}")
    torch.set_num_threads(settings.threads)
    transformers.utils.logging.disable_progress_bar()
    runs = os.path.abspath(args.runs or os.path.join(ROOT, "runs", "retention", settings.plan))
    results = os.path.abspath(args.results or (os.path.join(runs, "report") if args.quick
                                               else os.path.join(ROOT, "benchmarks", "results")))
    records = os.path.join(results, "retention_runs", settings.plan)
    os.makedirs(records, exist_ok=True)
    bench = FrontierBench(settings, runs, records)
    command = "python benchmarks/retention/frontier.py" + (" --quick" if args.quick else "")

    def publish():
        done = bench.results()
        report.write(results, settings, bench.base(), done, command, bench.records, bench.progress(done))

    if args.estimate:
        done = bench.results()
        for job in jobs(settings):
            if job.name in done.get(job.experiment, {}):
                state = "done"
            elif bench.resolve(job, done) is None:
                state = "waits for its grid"
            elif bench.duplicate(job, done):
                state = "not needed (an inner rate was chosen)" if job.rate == "beyond" else "same run as full@chosen"
            else:
                state = "to run"
            print(f"{job.experiment:5s} {job.name:40s} {state}")
        return 0
    if args.report_only:
        bench.base_scores()
        publish()
        return 0
    bench.base_scores()
    if args.worker or settings.workers == 1:
        bench.work(publish, wanted)
        return 0
    print(f"[{time.strftime('%H:%M:%S')}] frontier benchmark: {len(jobs(settings))} jobs, {settings.workers} workers",
          flush=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--runs", runs, "--results", results,
           "--experiments", ",".join(wanted)] + (["--quick"] if args.quick else [])
    procs = [subprocess.Popen(cmd) for _ in range(settings.workers)]
    failed = [k for k, p in enumerate(procs) if p.wait() != 0]
    publish()
    if failed:
        print(f"worker(s) {failed} failed; see the output above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
