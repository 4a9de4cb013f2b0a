import pytest

from controlllm import ControlConfig


def test_even_spacing_matches_paper():
    assert ControlConfig(num_expanded_layers=8).resolve_layers(32) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert ControlConfig(num_expanded_layers=16).resolve_layers(32) == list(range(1, 32, 2))


def test_even_spacing_covers_the_whole_depth():
    # round((j + 1) N / k) - 1, halves rounded up: the top layer is always expanded.
    assert ControlConfig(num_expanded_layers=8).resolve_layers(30) == [3, 7, 10, 14, 18, 22, 25, 29]
    assert ControlConfig(num_expanded_layers=16).resolve_layers(30) == [
        1, 3, 5, 7, 8, 10, 12, 14, 16, 18, 20, 22, 23, 25, 27, 29]
    assert ControlConfig(num_expanded_layers=4).resolve_layers(4) == [0, 1, 2, 3]
    for n in range(1, 41):
        for k in range(1, n + 1):
            layers = ControlConfig(num_expanded_layers=k).resolve_layers(n)
            assert len(set(layers)) == k and layers == sorted(layers) and layers[-1] == n - 1 and layers[0] >= 0
            gaps = [b - a for a, b in zip([-1] + layers, layers)]
            assert max(gaps) - min(gaps) <= 1, (n, k, layers)  # as even as integers allow


def test_group_end_placement_is_the_earlier_rule():
    # The rule of earlier releases: (i + 1) % (N // k) == 0, first k; saved configs without the field keep it.
    assert ControlConfig(num_expanded_layers=8, layer_placement="group_end").resolve_layers(30) == [
        2, 5, 8, 11, 14, 17, 20, 23]
    old = ControlConfig(num_expanded_layers=8).to_dict()
    del old["layer_placement"], old["gate_norm"]
    legacy = ControlConfig.from_dict(old)
    assert legacy.layer_placement == "group_end" and legacy.gate_norm is False
    assert legacy.resolve_layers(30) == [2, 5, 8, 11, 14, 17, 20, 23]


def test_default_count_is_a_quarter_and_explicit_list_alone_works():
    assert ControlConfig().resolve_layers(32) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert ControlConfig().resolve_layers(3) == [2]
    assert ControlConfig(expanded_layers=[0, 3]).resolve_layers(4) == [0, 3]


def test_explicit_layers_sorted():
    assert ControlConfig(num_expanded_layers=None, expanded_layers=[5, 0, 2]).resolve_layers(6) == [0, 2, 5]


def test_presets():
    cpt = ControlConfig.from_preset("paper-cpt")
    assert (cpt.interpolation, cpt.alignment_loss, cpt.train_interpolation) == ("dlerp", "cosine", True)
    csft = ControlConfig.from_preset("paper-csft", num_expanded_layers=2)
    assert (csft.interpolation, csft.alignment_loss, csft.train_interpolation, csft.interpolation_init) == (
        "lerp", "mse", False, 0.0)
    assert csft.num_expanded_layers == 2
    assert ControlConfig.from_preset("recommended").alignment_loss == "nmse"
    with pytest.raises(ValueError, match="Unknown Control preset 'fast'.*'recommended'"):
        ControlConfig.from_preset("fast")


@pytest.mark.parametrize("kwargs, words", [
    (dict(interpolation="cubic"), ["interpolation", "'cubic'", "'lerp'"]),
    (dict(alignment_loss="kl"), ["alignment_loss", "'kl'", "'mse'"]),
    (dict(expand_type="parallel"), ["expand_type", "'parallel'", "'concat'"]),
    (dict(num_expanded_layers=2, expanded_layers=[1]), ["at most one", "num_expanded_layers", "expanded_layers"]),
    (dict(layer_placement="top"), ["layer_placement", "'top'", "'even'"]),
    (dict(alignment_weight=float("inf")), ["alignment_weight", "finite"]),
    (dict(alignment_budget=float("inf")), ["alignment_budget", "finite"]),
    (dict(alignment_budget=0.0), ["alignment_budget", "> 0"]),
    (dict(alignment_budget=0.01, alignment_loss="mse"), ["alignment_budget", "scale-free", "'nmse'", "'mse'"]),
    (dict(alignment_budget_lr=0.0), ["alignment_budget_lr", "> 0"]),
    (dict(num_expanded_layers=0), ["num_expanded_layers=0", "positive"]),
    (dict(num_expanded_layers=None, expanded_layers=[1, 1]), ["duplicates"]),
    (dict(num_expanded_layers=None, expanded_layers=[-1]), ["non-negative"]),
    (dict(alignment_weight=-1.0), ["alignment_weight"]),
    (dict(alignment_margin=float("nan")), ["alignment_margin", "finite"]),
])
def test_bad_values_are_named(kwargs, words):
    with pytest.raises(ValueError) as err:
        ControlConfig(**kwargs)
    for w in words:
        assert w in str(err.value)


def test_out_of_range_and_too_many():
    with pytest.raises(ValueError, match=r"out of range .* 4 decoder layers .*0\.\.3"):
        ControlConfig(num_expanded_layers=None, expanded_layers=[1, 4]).resolve_layers(4)
    with pytest.raises(ValueError, match=r"num_expanded_layers=5 is more than the model's 4"):
        ControlConfig(num_expanded_layers=5).resolve_layers(4)


def test_round_trip(tmp_path):
    config = ControlConfig(expand_type="hybrid", num_expanded_layers=None, expanded_layers=[1, 3],
                           interpolation="dlerp", alignment_loss="cosine", alignment_margin=0.1)
    config.save_pretrained(tmp_path)
    assert ControlConfig.from_pretrained(tmp_path) == config
    with pytest.raises(ValueError, match="Unknown ControlConfig fields"):
        ControlConfig.from_dict({**config.to_dict(), "bogus": 1})
