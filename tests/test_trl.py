"""TRL's SFTTrainer and DPOTrainer on a tiny ControlModel: the alignment term in the optimised loss, frozen
weights untouched, and the base model (disable_control) as the DPO reference without a second copy."""

import os

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import DPOConfig, SFTConfig  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from controlllm import ControlConfig, ControlModel, get_control_model  # noqa: E402
from controlllm.integrations.trl import BaseModelReference, ControlDPOTrainer, ControlSFTTrainer  # noqa: E402

from conftest import TOKENIZER_CORPUS, clone, make_model, make_tokenizer, perturb_trainable  # noqa: E402

COMMON = dict(per_device_train_batch_size=2, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
              disable_tqdm=True, max_length=32, seed=0)


def control(weight=1.0, **config):
    tokenizer = make_tokenizer()
    base = make_model("llama", vocab_size=len(tokenizer))
    return base, get_control_model(base, ControlConfig(num_expanded_layers=None, expanded_layers=[1, 3], alignment_weight=weight,
                                                       **config)), tokenizer


def sft(model, tokenizer, tmp_path, **overrides):
    args = SFTConfig(output_dir=str(tmp_path / "sft"), **{**COMMON, "max_steps": 3, "learning_rate": 1e-3, **overrides})
    return ControlSFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": TOKENIZER_CORPUS * 4}),
                             processing_class=tokenizer)


def preference_data():
    return Dataset.from_dict({"prompt": ["Hello there,", "Paris is"] * 4, "chosen": [" how are you", " the capital"] * 4,
                              "rejected": [" dog lazy", " fox brown"] * 4})


def test_sft_loss_is_lm_loss_plus_weighted_alignment(tmp_path):
    _, model, tokenizer = control(weight=10.0)
    perturb_trainable(model)  # the branches differ, so the alignment loss is not zero
    trainer = sft(model, tokenizer, tmp_path, bf16=False, gradient_checkpointing=False)
    model.train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(model, dict(inputs))
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"])
    assert float(out.alignment_loss) > 1e-4
    # ControlModel's own loss (logits and cross-entropy) = LM loss + 10 * alignment: TRL's fused loss plus our term.
    assert float(loss) == pytest.approx(float(out.loss), rel=1e-5)
    assert float(loss) - float(out.lm_loss) == pytest.approx(10 * float(out.alignment_loss), rel=1e-4)


def test_sft_loss_under_gradient_accumulation_sums_to_the_whole_batch(tmp_path):
    _, model, tokenizer = control(weight=10.0)
    perturb_trainable(model)
    trainer = sft(model, tokenizer, tmp_path, bf16=False, gradient_checkpointing=False, gradient_accumulation_steps=2,
                  per_device_train_batch_size=3)
    model.train()
    loader = iter(trainer.get_train_dataloader())
    micro = [trainer._prepare_inputs(next(loader)) for _ in range(2)]
    tokens = [int((m["labels"][..., 1:] != -100).sum()) for m in micro]
    assert tokens[0] != tokens[1]  # uneven micro-batches: each one's share of the accumulated batch matters
    total = sum(tokens)  # what the Trainer passes as num_items_in_batch
    assert trainer._loss_is_scaled_for_ga(total)  # the Trainer adds these losses up unscaled
    losses = [float(trainer.compute_loss(model, dict(m), num_items_in_batch=total)) for m in micro]
    # The whole accumulated batch: its mean LM loss plus 10 x its mean alignment, both over its label tokens.
    outs = [model(input_ids=m["input_ids"], attention_mask=m["attention_mask"], labels=m["labels"]) for m in micro]
    whole_lm = sum(float(o.lm_loss) * n for o, n in zip(outs, tokens)) / total
    whole_align = sum(float(o.alignment_loss) * n for o, n in zip(outs, tokens)) / total
    print("micro-batch tokens", tokens, "summed loss", sum(losses), "whole batch", whole_lm + 10 * whole_align)
    assert whole_align > 1e-4
    assert sum(losses) == pytest.approx(whole_lm + 10 * whole_align, rel=1e-5)


def test_sft_under_a_drift_budget_adds_the_budget_term_and_adapts_multipliers(tmp_path):
    _, model, tokenizer = control(alignment_budget=1e-6)  # far below any drift: the multipliers must grow
    trainer = sft(model, tokenizer, tmp_path, bf16=False, gradient_checkpointing=False, max_steps=4)
    trainer.train()
    multipliers = [float(b.budget_multiplier) for b in model.control_blocks.values()]
    assert all(m > 0 for m in multipliers), multipliers
    perturb_trainable(model)
    model.train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(model, dict(inputs))
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"])
    assert float(loss) == pytest.approx(float(out.loss), rel=1e-4)  # the same budget term as ControlModel's own loss


def test_sft_trains_the_copies_only_and_saves_the_delta(tmp_path):
    _, model, tokenizer = control()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = sft(model, tokenizer, tmp_path)  # TRL's defaults: bf16 autocast, gradient checkpointing
    trainer.train()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert any(not torch.equal(params[n], v) for n, v in trained.items())
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 3 and all("alignment_loss" in r and "w/1" in r and "w/3" in r for r in logs)
    assert logs[-1]["alignment_loss"] > 0
    trainer.save_model(str(tmp_path / "out"))
    assert (tmp_path / "out" / "control_model.safetensors").is_file()
    reloaded = ControlModel.from_pretrained(clone(model).unload(), tmp_path / "out")
    saved = reloaded.trainable_state_dict()
    assert all(torch.equal(saved[k], v) for k, v in model.trainable_state_dict().items())


def test_dpo_reference_is_the_base_model_without_a_copy(tmp_path):
    base, model, tokenizer = control()
    perturb_trainable(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), **{**COMMON, "max_steps": 2, "learning_rate": 1e-3})
    trainer = ControlDPOTrainer(model=model, args=args, train_dataset=preference_data(), processing_class=tokenizer)
    assert isinstance(trainer.ref_model, BaseModelReference)
    assert not list(trainer.ref_model.parameters())  # no second copy of the weights
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    ref = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    plain = clone(model).unload()
    add_fused_lm_head(plain)
    expected = trainer.compute_ref_log_probs(plain, batch)
    for got, want in zip(ref, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    trainer.train()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 2 and all(r["alignment_loss"] > 0 for r in logs)


def test_dpo_reference_is_the_base_in_eval_mode_with_dropout_after_the_policy_moved(tmp_path):
    tokenizer = make_tokenizer()
    base = make_model("llama", vocab_size=len(tokenizer), attention_dropout=0.3)
    model = get_control_model(base, ControlConfig(num_expanded_layers=None, expanded_layers=[1, 3]))
    plain = clone(model).unload().eval()  # the base model in eval mode
    add_fused_lm_head(plain)
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), **{**COMMON, "max_steps": 2, "learning_rate": 1e-2})
    trainer = ControlDPOTrainer(model=model, args=args, train_dataset=preference_data(), processing_class=tokenizer)
    trainer.train()
    assert any(not torch.equal(v, before[k]) for k, v in model.trainable_state_dict().items())  # the policy moved
    model.train()
    modes = [m.training for m in model.modules()]
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    first = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    second = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    expected = trainer.compute_ref_log_probs(plain, batch)
    print("reference log-probs:", [round(float(x), 4) for x in first[0]], [round(float(x), 4) for x in second[0]],
          "base in eval mode:", [round(float(x), 4) for x in expected[0]])
    for a, b, want in zip(first, second, expected):
        assert torch.equal(a, b)  # deterministic: no dropout in the reference pass
        torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-5)
    assert [m.training for m in model.modules()] == modes  # the policy's mode is left as it was


class RecordingSFTTrainer(ControlSFTTrainer):
    """Records where each save writes (a subclass, so the trainer's own code runs unchanged)."""

    saved_to: list
    run_dir: str

    def _save(self, output_dir=None, state_dict=None):
        self.saved_to.append(os.path.relpath(output_dir, self.run_dir))
        return super()._save(output_dir, state_dict)


def test_trl_checkpoints_are_staged_use_the_given_state_and_load_with_validation(tmp_path):
    from controlllm.errors import CheckpointError

    _, model, tokenizer = control()
    out = tmp_path / "sft"
    args = SFTConfig(output_dir=str(out), **{**COMMON, "max_steps": 2, "learning_rate": 1e-3, "save_strategy": "steps",
                                             "save_steps": 1, "save_total_limit": 1, "bf16": False})
    trainer = RecordingSFTTrainer(model=model, args=args, processing_class=tokenizer,
                                  train_dataset=Dataset.from_dict({"text": TOKENIZER_CORPUS * 4}))
    trainer.saved_to, trainer.run_dir = [], str(out)
    trainer.train()
    print("checkpoint saves went to", trainer.saved_to, "; run folder:", sorted(os.listdir(out)))
    assert trainer.saved_to == [os.path.join(".staging", "checkpoint-1"), os.path.join(".staging", "checkpoint-2")]
    assert sorted(os.listdir(out)) == ["README.md", "checkpoint-2"]  # TRL's model card, the last checkpoint
    # Under FSDP the Trainer passes the gathered state: that is what is saved, not the model's own (sharded) tensors.
    gathered = {"base_model." + k: v + 1.0 if v.is_floating_point() else v for k, v in model.base_model.state_dict().items()}
    trainer._save(str(tmp_path / "given"), state_dict=gathered)
    saved = load_file(tmp_path / "given" / "control_model.safetensors")
    assert saved.keys() == model.trainable_state_dict().keys()
    assert all(torch.equal(v, gathered["base_model." + k]) for k, v in saved.items())
    # A corrupt checkpoint is refused with the library's error, naming the file.
    delta = out / "checkpoint-2" / "control_model.safetensors"
    delta.write_bytes(delta.read_bytes()[:-64])
    again = sft(control()[1], tokenizer, tmp_path / "again", bf16=False, max_steps=3)
    with pytest.raises(CheckpointError, match="control_model.safetensors.*truncated"):
        again.train(resume_from_checkpoint=str(out / "checkpoint-2"))


def test_trainers_refuse_a_plain_model(tmp_path):
    tokenizer = make_tokenizer()
    with pytest.raises(TypeError, match="ControlModel"):
        sft(make_model("llama", vocab_size=len(tokenizer)), tokenizer, tmp_path)


def test_dpo_with_precomputed_reference_log_probs(tmp_path):
    _, model, tokenizer = control()
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), precompute_ref_log_probs=True,
                     **{**COMMON, "max_steps": 1, "learning_rate": 1e-3})
    trainer = ControlDPOTrainer(model=model, args=args, train_dataset=preference_data(), processing_class=tokenizer)
    assert "ref_chosen_logps" in trainer.train_dataset.column_names
    trainer.train()
    # At step 0 the policy is the base model: the precomputed reference log-probs give zero rewards.
    first = [r for r in trainer.state.log_history if "loss" in r][0]
    assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4


def test_load_best_model_at_end_reloads_the_best_delta_and_rotation_keeps_it(tmp_path):
    """load_best_model_at_end with save_total_limit=1: the best checkpoint (here the worst eval loss, so an early
    one) survives every rotation (at the end the Trainer keeps it alone, as it does for any model), the state
    points at it in the run folder (not the staging folder), and the model ends with its delta; a resumed run
    reads the same path from trainer_state.json."""
    import json

    from controlllm.model import read_delta

    _, model, tokenizer = control()
    out = tmp_path / "sft"
    data = Dataset.from_dict({"text": TOKENIZER_CORPUS * 4})
    args = SFTConfig(output_dir=str(out), **{**COMMON, "max_steps": 4, "learning_rate": 3e-3, "save_strategy": "steps",
                                             "save_steps": 1, "save_total_limit": 1, "bf16": False,
                                             "eval_strategy": "steps", "eval_steps": 1, "load_best_model_at_end": True,
                                             "metric_for_best_model": "eval_loss", "greater_is_better": True})
    trainer = ControlSFTTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=data,
                                eval_dataset=data)
    trainer.train()
    losses = {r["step"]: r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r}
    best_step = max(losses, key=losses.get)
    print("eval losses", losses, "best", trainer.state.best_model_checkpoint, "kept", sorted(os.listdir(out)))
    assert best_step != 4  # the test needs a best that is not the last checkpoint
    best = out / f"checkpoint-{best_step}"
    assert trainer.state.best_model_checkpoint == str(best)
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint-")) == [f"checkpoint-{best_step}"]
    own = model.trainable_state_dict()
    assert all(torch.equal(own[k], v) for k, v in read_delta(best).items())
    state = json.loads((best / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(best)
