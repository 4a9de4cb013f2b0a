"""YAML recipes (controlllm.training.recipe): TrainConfig values from a file, checked before anything loads."""

import pytest

from controlllm.errors import UserError
from controlllm.training.options import TrainConfig
from controlllm.training.recipe import RecipeError, load_recipe


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_a_recipe_gives_train_config_values(tmp_path):
    path = write(tmp_path, """
model: models/tiny
data: train.jsonl
task: sft
max-steps: 20
lr: 1e-4            # YAML 1.1 reads this as a string: converted
mix_ratio: 0.25
bf16: false
control:
  preset: recommended
  expanded_layers: [1, 3]
  alignment_loss: nmse
  alignment_weight: 1
""")
    values = load_recipe(path)
    assert values == {"model": "models/tiny", "data": "train.jsonl", "task": "sft", "max_steps": 20, "lr": 1e-4,
                      "mix_ratio": 0.25, "bf16": False, "preset": "recommended", "expanded_layers": [1, 3],
                      "alignment_loss": "nmse", "alignment_weight": 1.0}
    assert isinstance(values["lr"], float)
    config = TrainConfig(**{**values, "lr": 3e-4})  # a flag given on the command line overrides the file
    assert config.lr == 3e-4 and config.max_steps == 20 and config.expanded_layers == [1, 3]


def test_unknown_keys_are_refused_with_the_allowed_names(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown key 'learning_rate'; allowed: .*\blr\b") as err:
        load_recipe(write(tmp_path, "learning_rate: 1e-4\n"))
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    with pytest.raises(RecipeError, match=r"control: unknown key 'max_steps'; allowed: .*alignment_loss"):
        load_recipe(write(tmp_path, "control:\n  max_steps: 3\n"))


@pytest.mark.parametrize("text, message", [
    ("max_steps: ten\n", "max_steps must be an integer, got 'ten'"),
    ("max_steps: 2.5\n", "max_steps must be an integer"),
    ("lr: fast\n", "lr must be a number, got 'fast'"),
    ("bf16: 1\n", "bf16 must be true or false"),
    ("control:\n  expanded_layers: 3\n", "expanded_layers must be a list of integers"),
    ("max_steps:\n", "max_steps cannot be empty"),
    ("- lr\n", "must hold a mapping"),
    ("lr: [1\n", "not valid YAML"),
    ("preset: recommended\ncontrol:\n  preset: paper-cpt\n", "preset is given twice"),
])
def test_bad_values_name_the_key_and_what_is_allowed(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, text))


def test_a_missing_or_empty_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    assert load_recipe(write(tmp_path, "# nothing set\n")) == {}
