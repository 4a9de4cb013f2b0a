import torch
import pytest

from controlllm.interpolators import DLerp, DLerpIn, Lerp, Slerp, build_interpolator, lerp, slerp


def test_lerp_bit_exact_when_branches_equal():
    h = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    for w in (0.0, 0.3, 0.5, 0.77, 1.0):
        assert torch.equal(lerp(h, h.clone(), torch.tensor(w)), h)


def test_lerp_endpoints():
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    assert torch.equal(lerp(a, b, torch.tensor(0.0)), a)
    assert torch.allclose(lerp(a, b, torch.tensor(1.0)), b)


def test_slerp_matches_formula_and_is_exact_at_coincidence():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    w = torch.tensor(0.3)
    theta = torch.acos(torch.nn.functional.cosine_similarity(a, b, dim=-1)).unsqueeze(-1)
    expected = torch.sin(0.7 * theta) / torch.sin(theta) * a + torch.sin(0.3 * theta) / torch.sin(theta) * b
    assert torch.allclose(slerp(a, b, w), expected, atol=1e-5)
    assert torch.equal(slerp(a, a.clone(), w), a)


def test_slerp_finite_gradients_at_initialisation():
    interp = Slerp(0.0)
    h_p = torch.randn(2, 3, 8)
    h_e = h_p.clone().requires_grad_(True)
    h, _ = interp(h_p, h_e)
    h.sum().backward()
    assert torch.isfinite(h_e.grad).all()
    assert torch.isfinite(interp.logit.grad).all()
    assert interp.logit.grad == 0  # dh/dw = h_e - h_p = 0 at init


def test_slerp_fallback_is_per_token():
    # Row 0's tokens coincide (lerp fallback); row 1 differs. Row 1 must get the same output alone
    # as in the batch: the fallback of one sequence never changes another's.
    torch.manual_seed(0)
    h_p = torch.randn(2, 4, 8)
    h_e = torch.randn(2, 4, 8)
    h_e[0] = h_p[0]
    w = torch.tensor(0.4)
    together = slerp(h_p, h_e, w)
    alone = slerp(h_p[1:], h_e[1:], w)
    assert torch.equal(together[1:], alone)
    assert torch.equal(together[0], h_p[0])
    # and row 1 really is spherical, not linear
    assert not torch.allclose(together[1], lerp(h_p[1], h_e[1], w), atol=1e-4)


def test_dynamic_gradients_zero_at_init():
    for cls in (DLerp, DLerpIn, Lerp):
        interp = cls(8) if cls is not Lerp else cls(0.0)
        h_p = torch.randn(2, 3, 8)
        h_e = h_p.clone().requires_grad_(True)
        h, w = interp(h_p, h_e, torch.randn(2, 3, 8))
        assert torch.equal(h, h_p)
        h.pow(2).sum().backward()
        for p in interp.parameters():
            assert torch.count_nonzero(p.grad) == 0


def test_dynamic_weight_per_token_and_init():
    interp = build_interpolator("dlerp", 8, init=1.0)
    _, w = interp(torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    assert w.shape == (2, 3, 1)
    assert torch.allclose(w, torch.sigmoid(torch.tensor(1.0)).expand(2, 3, 1))
    assert abs(interp.nominal_weight() - float(torch.sigmoid(torch.tensor(1.0)))) < 1e-7


@pytest.mark.parametrize("cls", [DLerp, DLerpIn])
def test_normalised_gate_moves_by_order_lr_whatever_the_hidden_scale(cls):
    # One Adam step on a zero-initialised gate: with raw input the logit shift grows with the
    # hidden-state scale (real models: norms in the hundreds, so the gate saturates in a few
    # steps); with the normalised input it is at most lr x sqrt(dim).
    hidden, lr = 64, 1e-3
    shifts = {}
    for normalize in (False, True):
        for scale in (1.0, 100.0):
            torch.manual_seed(0)
            gate = cls(hidden, normalize=normalize)
            h_p, h_e = scale * torch.randn(2, 8, hidden), scale * torch.randn(2, 8, hidden)
            x = scale * torch.randn(2, 8, hidden)
            opt = torch.optim.Adam(gate.parameters(), lr=lr)
            h, w = gate(h_p, h_e, x)
            (h * torch.randn_like(h)).sum().backward()
            opt.step()
            with torch.no_grad():
                _, w_after = gate(h_p, h_e, x)
                logit = lambda v: torch.log(v / (1 - v))
                shifts[normalize, scale] = float((logit(w_after) - logit(w)).abs().max())
    dim = 2 * hidden if cls is DLerp else hidden
    assert shifts[True, 1.0] <= 2 * lr * dim ** 0.5 and shifts[True, 100.0] <= 2 * lr * dim ** 0.5
    assert shifts[False, 100.0] > 50 * shifts[True, 100.0]
