import pytest

from controlllm import ControlConfig


def test_even_spacing_matches_paper():
    assert ControlConfig(num_expanded_layers=8).resolve_layers(32) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert ControlConfig(num_expanded_layers=16).resolve_layers(32) == list(range(1, 32, 2))


def test_count_is_exact_when_not_divisible():
    # 30 layers, k = 7: split 4 would give 7 layers; 30 layers, k = 8: split 3 gives 10 candidates.
    assert len(ControlConfig(num_expanded_layers=7).resolve_layers(30)) == 7
    assert ControlConfig(num_expanded_layers=8).resolve_layers(30) == [2, 5, 8, 11, 14, 17, 20, 23]
    assert ControlConfig(num_expanded_layers=4).resolve_layers(4) == [0, 1, 2, 3]


def test_explicit_layers_sorted():
    assert ControlConfig(num_expanded_layers=None, expanded_layers=[5, 0, 2]).resolve_layers(6) == [0, 2, 5]


@pytest.mark.parametrize("kwargs, words", [
    (dict(interpolation="cubic"), ["interpolation", "'cubic'", "'lerp'"]),
    (dict(alignment_loss="kl"), ["alignment_loss", "'kl'", "'mse'"]),
    (dict(expand_type="parallel"), ["expand_type", "'parallel'", "'concat'"]),
    (dict(num_expanded_layers=2, expanded_layers=[1]), ["exactly one", "num_expanded_layers", "expanded_layers"]),
    (dict(num_expanded_layers=None), ["exactly one"]),
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
