import torch

import pytest

from controlllm.alignment import alignment_per_token, cosine_alignment, masked_mean, mse_alignment, nmse_alignment


def test_mse_per_token():
    h_p = torch.zeros(1, 2, 4)
    h_e = torch.tensor([[[1.0, 1, 1, 1], [2.0, 0, 0, 0]]])
    assert torch.allclose(mse_alignment(h_p, h_e), torch.tensor([[1.0, 1.0]]))


def test_nmse_is_relative_and_scale_free():
    h_p = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])
    h_e = torch.tensor([[[3.0, 5.0], [1.0, 0.0]]])
    assert torch.allclose(nmse_alignment(h_p, h_e), torch.tensor([[1.0 / 25.0, 0.0]]))
    # Scaling both branches by 100 multiplies mse by 1e4 and leaves nmse unchanged.
    assert torch.allclose(nmse_alignment(100 * h_p, 100 * h_e), nmse_alignment(h_p, h_e))
    assert torch.allclose(mse_alignment(100 * h_p, 100 * h_e), 1e4 * mse_alignment(h_p, h_e))


def test_nmse_gradient_treats_the_frozen_norm_as_a_constant():
    h_p = torch.tensor([[[3.0, 4.0]]], requires_grad=True)
    h_e = torch.tensor([[[3.0, 5.0]]], requires_grad=True)
    nmse_alignment(h_p, h_e).sum().backward()
    # d/dh_e = 2 (h_e - h_p) / 25 and d/dh_p is its negative: the denominator passes no gradient.
    assert torch.allclose(h_e.grad, torch.tensor([[[0.0, 2.0 / 25]]]))
    assert torch.allclose(h_p.grad, -h_e.grad)


def test_unknown_kind_names_the_allowed_ones():
    with pytest.raises(ValueError, match="'nmse'"):
        alignment_per_token("l1", torch.zeros(1, 1, 2), torch.zeros(1, 1, 2))


def test_cosine_with_margin():
    a = torch.tensor([[[1.0, 0.0]]])
    b = torch.tensor([[[0.0, 1.0]]])
    assert torch.allclose(cosine_alignment(a, b), torch.tensor([[0.5]]))  # 0.5 * (1 - 0)^2
    assert torch.allclose(cosine_alignment(a, b, margin=0.5), torch.tensor([[0.125]]))
    assert torch.equal(cosine_alignment(a, a), torch.zeros(1, 1))


def test_fp32_from_bf16():
    h = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    assert alignment_per_token("mse", h, h + 1).dtype == torch.float32
    assert alignment_per_token("cosine", h, -h).dtype == torch.float32
    assert alignment_per_token("nmse", h, h + 1).dtype == torch.float32


def test_masked_mean_ignores_padding():
    layer1 = torch.tensor([[1.0, 100.0], [3.0, 5.0]])
    layer2 = torch.tensor([[2.0, 100.0], [4.0, 6.0]])
    mask = torch.tensor([[1, 0], [1, 1]])
    # layer 1: (1 + 3 + 5) / 3 = 3, layer 2: (2 + 4 + 6) / 3 = 4 -> 3.5
    assert torch.allclose(masked_mean([layer1, layer2], mask), torch.tensor(3.5))
    assert torch.allclose(masked_mean([layer1], None), layer1.mean())


def test_warns_when_a_fixed_alignment_term_dwarfs_the_lm_loss():
    import warnings

    from controlllm import ControlConfig, get_control_model

    from conftest import make_model, perturb_trainable

    def first_step_warnings(**config):
        model = make_model("llama")
        with torch.no_grad():  # MLP outputs ~1000x larger, as on models with a few huge hidden dimensions
            for layer in model.model.layers:
                layer.mlp.down_proj.weight.mul_(1000.0)
        control = get_control_model(model, ControlConfig(expanded_layers=[1, 3], **config))
        control.train()
        ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            control(input_ids=ids, labels=ids)  # step 0: the copies are exact, the term is zero
            perturb_trainable(control, scale=0.05)  # as a first optimizer step would
            for _ in range(3):
                control(input_ids=ids, labels=ids)
        return [str(w.message) for w in caught if "alignment term" in str(w.message)]

    found = first_step_warnings(alignment_loss="mse")
    assert len(found) == 1 and "'nmse'" in found[0] and "alignment_budget" in found[0]  # once, naming the fix
    assert first_step_warnings(alignment_loss="nmse") == []


def _copy_grad(block) -> float:
    return max(float(p.grad.abs().max()) for p in block.expanded_layer.parameters() if p.grad is not None)


@pytest.mark.parametrize("loss", ["mse", "nmse"])
def test_alignment_sends_no_gradient_below_where_the_branches_respond_alike(loss):
    """The upper copy differs from its original only by a constant output offset (its MLP bias), so
    both branches have the same Jacobian: the gradient its alignment sends to the block input, and
    so to the lower copy, is (J_e - J_p)^T (h_e - h_p) = 0. With the frozen branch detached it
    would be (I + J_e)^T (h_e - h_p): as large as the gradient on the upper copy itself."""
    from conftest import batch, make_model

    from controlllm import ControlConfig, get_control_model

    model = get_control_model(make_model("llama", mlp_bias=True),
                              ControlConfig(expanded_layers=[1, 3], alignment_loss=loss))
    lower, upper = model.blocks[1], model.blocks[3]
    with torch.no_grad():
        upper.expanded_layer.mlp.down_proj.bias.add_(0.5)
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask)
    assert float(out.alignment_loss) > 0
    out.alignment_loss.backward()
    upper_grad, lower_grad = _copy_grad(upper), _copy_grad(lower)
    assert upper_grad > 1e-4
    assert lower_grad < 1e-5 * upper_grad, (lower_grad, upper_grad)  # zero up to rounding


def test_alignment_gradient_below_is_the_gap_between_the_branch_jacobians():
    """Away from the special case, the alignment still reaches the lower copy (both branches are
    functions of its output), so the layers below are aligned too, not just the copy."""
    from conftest import batch, make_model, perturb_trainable

    from controlllm import ControlConfig, get_control_model

    model = get_control_model(make_model("llama"), ControlConfig(expanded_layers=[1, 3], alignment_loss="nmse"))
    perturb_trainable(model)
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask).alignment_loss.backward()
    grads = {i: _copy_grad(b) for i, b in model.blocks.items()}
    assert grads[1] > 0 and grads[3] > 0


@pytest.mark.parametrize("kind", ["mse", "nmse", "cosine"])
def test_what_each_alignment_loss_pushes_below(kind):
    """A copy that differs from the frozen layer by a constant offset responds to its input exactly as the frozen
    layer does (same Jacobian). A loss of the gap h_e - h_p alone (mse; nmse, whose normaliser is a constant)
    then sends the layers below nothing; cosine, which is not translation-invariant, sends them a push of the
    order of the copy's own gradient and lowers its value by growing the hidden states (as block.py says)."""
    from controlllm.alignment import alignment_per_token

    torch.manual_seed(0)
    width = 64
    weight = torch.randn(width, width) / width ** 0.5
    x = torch.randn(32, width, requires_grad=True)
    h_p = x + x @ weight.T  # a residual layer, as decoder layers are
    h_e = x + x @ weight.T + 2.0  # the copy: the same function plus an offset
    loss = alignment_per_token(kind, h_p, h_e).mean()
    below, own = torch.autograd.grad(loss, (x, h_e), retain_graph=True)
    ratio = float(below.norm() / own.norm())
    growth = float((below * x).sum())  # d loss / d log(scale of x): negative means growing x lowers the loss
    print(kind, "push below / copy's own gradient", round(ratio, 4), "d loss / d log scale", round(growth, 6))
    if kind == "cosine":
        assert ratio > 0.5 and growth < 0
    else:
        assert ratio < 1e-5 and abs(growth) < 1e-6
