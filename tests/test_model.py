"""Invariants of ControlModel on tiny models of every supported architecture."""

import pytest
import torch
from transformers import BertConfig, BertModel, DynamicCache

from controlllm import ControlConfig, ControlModel, get_control_model
from controlllm.block import ControlBlock, StackBlock

from conftest import ARCHITECTURES, CORE_ARCHS, batch, clone, make_model, perturb_trainable

INTERPOLATIONS = ["lerp", "dlerp", "dlerp_in", "slerp"]


def control(model, layers=(0, 2), **kwargs):
    # Interpolators trained (so perturbing the trainable parameters moves the gates too).
    kwargs.setdefault("train_interpolation", True)
    return get_control_model(model, ControlConfig(num_expanded_layers=None, expanded_layers=list(layers), **kwargs))


def greedy(model, ids, mask, n=10, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                          pad_token_id=0, **kwargs)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_exact_logits_at_init(arch, interpolation):
    base = make_model(arch)
    ids, mask = batch(left_pad=3)
    expected = base(input_ids=ids, attention_mask=mask).logits
    model = control(clone(base), interpolation=interpolation)
    got = model(input_ids=ids, attention_mask=mask).logits
    assert (got - expected).abs().max() <= 1e-5
    assert torch.equal(got, expected)  # h_p + w (h_e - h_p) makes it bit-exact


@pytest.mark.parametrize("expand_type", ["stack", "hybrid"])
def test_stack_and_hybrid_exact_at_init(arch, expand_type):
    base = make_model(arch)
    ids, mask = batch(left_pad=2)
    model = control(clone(base), layers=(0, 1, 3), expand_type=expand_type)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base(input_ids=ids, attention_mask=mask).logits)
    assert torch.equal(greedy(model, ids, mask), greedy(base, ids, mask))


def test_greedy_generation_equals_base_at_init(arch):
    base = make_model(arch)
    ids, mask = batch(left_pad=3)
    model = control(clone(base), interpolation="dlerp")
    assert torch.equal(greedy(model, ids, mask), greedy(base, ids, mask))


@pytest.mark.parametrize("expand_type", ["concat", "stack", "hybrid"])
@pytest.mark.parametrize("layers", [(0, 2), (1, 3)])
def test_cache_equals_no_cache_after_training(arch, expand_type, layers):
    # Trained copies differ from the originals, so a missing or shared cache slot would show.
    model = control(make_model(arch), layers=layers, expand_type=expand_type, interpolation="dlerp")
    perturb_trainable(model, scale=0.2)
    ids, mask = batch(left_pad=4, seq=8)
    with_cache = greedy(model, ids, mask, n=12)
    without = greedy(model, ids, mask, n=12, use_cache=False)
    assert torch.equal(with_cache, without)
    with model.disable_control():  # the trained branches do change the output
        base_logits = model(input_ids=with_cache).logits
    assert (model(input_ids=with_cache).logits - base_logits).abs().max() > 1e-3


@pytest.mark.parametrize("arch_name", ["llama", "gemma3", "mistral"])
def test_static_cache_equals_no_cache(arch_name):
    model = control(make_model(arch_name), layers=(0, 3), interpolation="slerp", expand_type="hybrid")
    perturb_trainable(model, scale=0.2)
    ids, mask = batch(left_pad=2, seq=8)
    static = greedy(model, ids, mask, n=10, cache_implementation="static")
    assert torch.equal(static, greedy(model, ids, mask, n=10, use_cache=False))


def test_each_branch_has_its_own_cache_slot():
    model = control(make_model("llama"), layers=(0, 2, 3))
    ids, mask = batch()
    cache = DynamicCache(config=model.config)
    assert len(cache.layers) == 4
    model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
    assert len(cache.layers) == 7
    assert [b.slot for b in model.blocks.values()] == [4, 5, 6]
    for layer in cache.layers:
        assert layer.get_seq_length() == ids.shape[1]


def test_sliding_window_slots_mirror_their_layer():
    model = control(make_model("gemma3", sliding_window=4, num_hidden_layers=6), layers=(0, 5))
    ids, mask = batch(seq=10)
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
    assert cache.is_sliding[6] == cache.is_sliding[0]
    assert cache.is_sliding[7] == cache.is_sliding[5]
    assert cache.is_sliding[0] != cache.is_sliding[5]


def test_disable_control_gives_base_outputs():
    base = make_model("qwen2")
    ids, mask = batch(left_pad=2)
    expected = base(input_ids=ids, attention_mask=mask).logits
    model = control(clone(base), interpolation="dlerp_in", expand_type="hybrid", layers=(0, 1, 2))
    perturb_trainable(model)
    assert not torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected)
    with model.disable_control():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected)
        assert torch.equal(greedy(model, ids, mask), greedy(base, ids, mask))
    assert not torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected)


def test_only_copies_and_interpolators_are_trainable():
    model = control(make_model("llama"), layers=(1, 3), interpolation="dlerp")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".expanded_layer." in n or ".interpolator." in n for n in names)
    frozen = control(make_model("llama"), train_interpolation=False)
    assert all(".expanded_layer." in n for n, p in frozen.named_parameters() if p.requires_grad)
    assert not model.get_input_embeddings().weight.requires_grad
    assert not model.get_output_embeddings().weight.requires_grad
    assert not model.base_model.model.norm.weight.requires_grad


@pytest.mark.parametrize("expand_type", ["concat", "stack", "hybrid"])
def test_frozen_weights_bit_identical_after_training(expand_type):
    base = make_model("gemma2")
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = control(base, expand_type=expand_type, interpolation="dlerp", alignment_loss="cosine")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids, mask = batch(left_pad=3)
    for _ in range(3):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    state = model.base_model.state_dict()
    for name, value in original.items():
        for i in (0, 2):
            name = name.replace(f"layers.{i}.", f"layers.{i}.base_layer.")
        assert torch.equal(state[name], value), name
    moved = [n for n, v in model.trainable_state_dict().items() if ".expanded_layer." in n
             and not torch.equal(v, state[n.replace("expanded_layer", "base_layer")])]
    assert moved  # training did move the copies


def test_alignment_loss_added_in_forward_fp32_and_masked():
    model = control(make_model("llama"), alignment_weight=0.5)
    perturb_trainable(model)
    ids, mask = batch(left_pad=5)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.alignment_loss.dtype == torch.float32 and out.alignment_loss > 0
    assert torch.allclose(out.loss, out.lm_loss + 0.5 * out.alignment_loss)
    # Changing the padded tokens' content changes nothing in the alignment loss.
    ids2 = ids.clone()
    ids2[0, :5] = 7
    out2 = model(input_ids=ids2, attention_mask=mask, labels=ids)
    assert torch.equal(out.alignment_loss, out2.alignment_loss)
    # Manual: mean over real tokens per layer, then over layers.
    per_layer = []
    hooks = []
    blocks = model.control_blocks
    for b in blocks.values():
        hooks.append(b.register_forward_hook(lambda m, a, o: per_layer.append(m.alignment.clone())))
    unlabelled = model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    manual = torch.stack([(t * mask).sum() / mask.sum() for t in per_layer]).mean()
    assert torch.allclose(manual, unlabelled.alignment_loss)
    # With labels: over the real tokens that predict a label (the LM loss's positions).
    predicts = mask.clone()
    predicts[:, -1] = 0
    manual = torch.stack([(t * predicts).sum() / predicts.sum() for t in per_layer]).mean()
    assert torch.allclose(manual, out.alignment_loss)
    # Logits for the last position only (as generate's prefill asks) leave the padding mask intact.
    last = model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    assert last.logits.shape[1] == 1 and torch.allclose(last.alignment_loss, unlabelled.alignment_loss)


def test_no_alignment_work_in_generation_and_none_loss():
    model = control(make_model("llama"), alignment_loss="none")
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.alignment_loss is None and torch.equal(out.loss, out.lm_loss)
    greedy(model, ids, mask)
    assert all(b.alignment is None and not b.record for b in model.control_blocks.values())


def test_lm_gradients_flow_to_copies_and_interpolators():
    model = control(make_model("phi3"), interpolation="dlerp")
    perturb_trainable(model)
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "gate" in n)


def test_output_hidden_states_are_the_merged_ones():
    base = make_model("llama")
    ids, mask = batch()
    expected = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    model = control(clone(base))
    got = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(got) == len(expected) == 5
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    perturb_trainable(model)
    got = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert torch.equal(got[0], expected[0]) and not torch.equal(got[1], expected[1])


def test_interpolation_weights_reported():
    model = control(make_model("llama"), interpolation_init=1.0)
    assert model.interpolation_weights() == pytest.approx({0: 0.7310586, 2: 0.7310586})


def test_attribute_passthrough_and_trainable_count(capsys):
    model = control(make_model("llama"))
    assert model.config is model.base_model.config
    assert model.device.type == "cpu"
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    assert f"trainable params: {trainable:,d}" in capsys.readouterr().out
    assert isinstance(model.blocks[0], ControlBlock)
    stack = control(make_model("llama"), expand_type="hybrid")
    assert isinstance(stack.blocks[0], StackBlock) and isinstance(stack.blocks[2], ControlBlock)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="BertModel"):
        get_control_model(BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=32)), ControlConfig(num_expanded_layers=1))
    model = control(make_model("llama"))
    with pytest.raises(ValueError, match="already a ControlModel"):
        get_control_model(model, ControlConfig(num_expanded_layers=1))
    with pytest.raises(ValueError, match="already has Control blocks"):
        get_control_model(model.base_model, ControlConfig(num_expanded_layers=1))
    with pytest.raises(ValueError, match="out of range"):
        control(make_model("llama"), layers=(0, 9))
    with pytest.raises(ValueError, match="more than the model's 4 decoder layers"):
        get_control_model(make_model("llama"), ControlConfig(num_expanded_layers=5))
    with pytest.raises(TypeError, match="ControlConfig"):
        get_control_model(make_model("llama"), {"num_expanded_layers": 1})
    with pytest.raises(ValueError, match="output_attentions"):
        model(input_ids=batch()[0], output_attentions=True)


def test_bf16_exact_at_init():
    base = make_model("llama").to(torch.bfloat16)
    ids, mask = batch(left_pad=2)
    expected = base(input_ids=ids, attention_mask=mask).logits
    for interpolation in INTERPOLATIONS:
        model = control(clone(base), interpolation=interpolation, interpolation_init=0.7)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected), interpolation


def test_alignment_share_under_gradient_accumulation():
    # The Trainer passes num_items_in_batch (label tokens of the whole accumulated batch) and sums
    # micro-batch losses; each micro-batch's alignment term is weighted by its share of tokens.
    model = control(make_model("llama"), alignment_weight=2.0)
    perturb_trainable(model)
    ids, mask = batch()
    labels = ids.clone()
    labels[1, :6] = -100
    n = int((labels[:, 1:] != -100).sum())
    out = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(3 * n))
    assert torch.allclose(out.loss - out.lm_loss, 2.0 * out.alignment_loss / 3, atol=1e-6)


def test_return_dict_false_gives_a_tuple():
    model = control(make_model("llama"))
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids, return_dict=False)
    assert isinstance(out, tuple) and torch.equal(out[0], model(input_ids=ids, attention_mask=mask, labels=ids).loss)


@pytest.mark.parametrize("alignment_loss", ["mse", "cosine"])
def test_alignment_under_accumulation_sums_to_the_whole_batch_on_uneven_sft_answers(alignment_loss):
    """The alignment is averaged over the positions the LM loss is computed on, so micro-batches
    weighted by their share of the Trainer's token count add up to the whole batch's alignment."""
    from controlllm.training.data import DataCollator, build_sft_dataset

    from conftest import make_tokenizer

    tokenizer = make_tokenizer()
    chats = [[{"role": "user", "content": f"What is {a} plus {a}?"},
              {"role": "assistant", "content": " ".join([f"{2 * a}"] * (1 + 6 * (a >= 2)))}] for a in range(4)]
    examples = [build_sft_dataset(chats, tokenizer, 64)[i] for i in range(4)]
    collate = DataCollator.from_tokenizer(tokenizer)
    model = control(make_model("llama", vocab_size=len(tokenizer)), alignment_loss=alignment_loss, alignment_weight=2.0)
    perturb_trainable(model, scale=0.2)
    model.eval()

    def term(batch, num_items=None):
        kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
        with torch.no_grad():
            out = model(**batch, **kwargs)
        return out.loss - out.lm_loss, out

    whole = collate(examples)
    num_items = int((whole["labels"][:, 1:] != -100).sum())
    full_term, full = term(whole)
    assert full_term == pytest.approx(2.0 * float(full.alignment_loss), rel=1e-6)
    micro = [term(collate(examples[i:i + 2]), num_items) for i in (0, 2)]
    answers = [int((collate(examples[i:i + 2])["labels"] != -100).sum()) for i in (0, 2)]
    assert answers[0] * 2 < answers[1]  # uneven answers: one micro-batch has far more labels
    assert sum(t for t, _ in micro) == pytest.approx(float(full_term), rel=1e-5)
    assert sum(o.lm_loss for _, o in micro) == pytest.approx(float(full.lm_loss), rel=1e-5)
