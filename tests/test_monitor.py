"""Console lines of a run: compact records instead of the Trainer's raw dicts."""

from controlllm.training.monitor import format_record, per_layer
from controlllm.training.train import TrainConfig, train

from conftest import make_model, make_tokenizer

RECORD = {"loss": 2.8712, "lm_loss": 2.8611, "alignment_loss": 0.00213, "w/3": 0.5, "w/7": 0.52, "w_std/3": 0.0,
          "drift/3": 3e-4, "drift/7": 1e-4, "grad_norm": 1.93, "learning_rate": 9.5e-05}


def test_training_record_is_one_compact_line():
    line = format_record(RECORD, 20, 100)
    assert line == "step 20/100 | loss 2.871 | lm 2.861 | align 0.0021 | w 0.51 | drift 0.0002 | grad 1.9 | lr 9.5e-05"


def test_per_layer_reads_indexed_keys_only():
    assert per_layer(RECORD, "w") == {3: 0.5, 7: 0.52}
    assert per_layer(RECORD, "w_std") == {3: 0.0}
    assert per_layer({"multiplier/11": 2.0, "multiplier": 1.0}, "multiplier") == {11: 2.0}


def test_eval_summary_and_other_records():
    assert format_record({"eval_loss": 2.95, "eval_perplexity": 19.12}, 50, 100) == "step 50/100 | eval loss 2.95 | ppl 19.1"
    assert format_record({"train_runtime": 312.2, "train_loss": 2.95}, 100, 100) == "done | 100 steps in 312 s | train loss 2.95"
    assert format_record({"loss": 3.0, "w_mean": 0.5, "multiplier/3": 1.25}, 5) == "step 5 | loss 3 | w 0.50 | mult 1.2"
    assert format_record({"epoch": 1.0}, 5) is None


def test_training_prints_compact_lines_not_dicts(tmp_path, text_file, capsys):
    tokenizer = make_tokenizer()
    model = make_model("llama", vocab_size=len(tokenizer))
    train(TrainConfig(data=str(text_file), output=str(tmp_path / "run"), max_steps=2, batch_size=2, seq_len=32,
                      logging_steps=1, save_steps=2, progress=True), model=model, tokenizer=tokenizer)
    captured = capsys.readouterr()
    out = captured.out
    assert "writing checkpoint-2" in captured.err  # the bar says what it is doing while the checkpoint is written
    assert "step 1/2 | loss " in out and "| lm " in out and "| align " in out and "| w 0.50" in out
    assert "{'loss'" not in out and "done | 2 steps in" in out
