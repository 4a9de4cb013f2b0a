"""Stack expansion starts as the identity and its first training step stays small on every architecture.

Post-norm layers (Gemma 2/3, OLMo 2) normalise each sub-block's output before the residual add, so
zeroed output projections (LLaMA-Pro's recipe) would be rescaled to full size by the first update.
"""

import pytest
import torch

from controlllm import ControlConfig, get_control_model

from conftest import ARCHITECTURES, batch, clone, make_model

POST_NORM = ["gemma2", "gemma3", "olmo2"]


def stacked(base, expand_type="stack"):
    return get_control_model(clone(base), ControlConfig(num_expanded_layers=None, expanded_layers=[1, 2],
                                                        expand_type=expand_type))


@pytest.mark.parametrize("expand_type", ["stack", "hybrid"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_stack_copy_is_exactly_the_identity_at_init(arch, expand_type):
    base = make_model(arch)
    ids, mask = batch(left_pad=2, seq=10)
    expected = base(input_ids=ids, attention_mask=mask).logits
    model = stacked(base, expand_type)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected)


def first_step_update(arch, lr=1e-3):
    """RMS of what the stack copy at layer 1 adds to the residual stream after one AdamW step."""
    model = stacked(make_model(arch))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    ids, mask = batch(seq=16, bsz=4, seed=7)
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    optimizer.step()
    model.eval()
    seen = {}
    copy = model.blocks[1].expanded_layer
    pre = copy.register_forward_pre_hook(lambda m, args, kwargs: seen.__setitem__("in", (args or (kwargs["hidden_states"],))[0]),
                                         with_kwargs=True)
    post = copy.register_forward_hook(lambda m, args, out: seen.__setitem__("out", out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    pre.remove(), post.remove()
    return float((seen["out"] - seen["in"]).pow(2).mean().sqrt())


@pytest.mark.parametrize("arch", POST_NORM)
def test_first_step_on_post_norm_layers_is_as_small_as_on_llama(arch):
    llama = first_step_update("llama")
    update = first_step_update(arch)
    assert 0 < update and llama / 3 < update < 3 * llama, (update, llama)
