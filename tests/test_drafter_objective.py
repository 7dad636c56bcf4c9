"""The drafter's training objective, Sequential Temperature Scaling and the draft vocabulary."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dspark.drafters.dspark.calibration import (
    cross_fitted_ece,
    expected_calibration_error,
    fit_sts,
    prefix_ece,
)
from dspark.training.data import Sequence
from dspark.training.losses import drafter_loss, position_weights, target_distribution, total_variation
from dspark.training.train import build_draft_vocab


def test_total_variation_is_half_the_l1_distance():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.2, 0.6])
    assert math.isclose(float(total_variation(q.log(), p)), 0.5 * (0.3 + 0.1 + 0.4), rel_tol=1e-6)
    # target mass outside the known entries (here 0.2) cannot be matched by the drafter: counted in full
    partial = torch.tensor([0.5, 0.3, 0.0])
    assert math.isclose(float(total_variation(q.log(), partial)), 0.5 * (0.3 + 0.1 + 0.6 + 0.2), rel_tol=1e-6)


def test_target_distribution_drops_ids_outside_the_draft_vocabulary():
    dense = target_distribution(torch.tensor([[1, 3, 0]]), torch.tensor([[0.6, 0.3, 0.1]]), vocab=3)
    torch.testing.assert_close(dense, torch.tensor([[0.1, 0.6, 0.0]]))  # id 3 == vocab: outside


def test_loss_terms_follow_the_paper():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    conf = torch.randn(2, 3)
    target = torch.softmax(torch.randn(2, 3, 5), -1)
    labels = target.argmax(-1)
    valid = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss, parts = drafter_loss(logits, conf, labels, target, valid)
    w = position_weights(3) * valid
    log_q = torch.log_softmax(logits, -1)
    ce = -(w * log_q.gather(-1, labels[..., None])[..., 0]).sum() / 2
    tv = 0.5 * (log_q.exp() - target).abs().sum(-1)
    c_star = 1 - tv
    bce = -(
        c_star * torch.nn.functional.logsigmoid(conf) + (1 - c_star) * torch.nn.functional.logsigmoid(-conf)
    )
    assert math.isclose(parts["ce"], float(ce), rel_tol=1e-5)
    assert math.isclose(parts["tv"], float((w * tv).sum() / 2), rel_tol=1e-5)
    assert math.isclose(parts["confidence"], float((w * bce).sum() / 2), rel_tol=1e-5)
    assert math.isclose(
        float(loss), 0.1 * parts["ce"] + 0.9 * parts["tv"] + parts["confidence"], rel_tol=1e-5
    )
    assert torch.allclose(position_weights(7)[1:] / position_weights(7)[:-1], torch.tensor(math.exp(-1 / 7)))


def test_ece_of_a_known_case():
    probs = torch.tensor([0.9, 0.9, 0.1, 0.1])
    outcomes = torch.tensor([1.0, 0.0, 0.0, 0.0])
    # bin 0.9: mean prob 0.9 vs 0.5 observed; bin 0.1: 0.1 vs 0.0 -> 0.5 * 0.4 + 0.5 * 0.1
    assert math.isclose(expected_calibration_error(probs, outcomes), 0.25, rel_tol=1e-6)


def _synthetic_blocks(n: int = 20000, gamma: int = 3):
    torch.manual_seed(0)
    true_logits = torch.randn(n, gamma) * 1.5
    return true_logits, torch.bernoulli(torch.sigmoid(true_logits)), torch.ones(n, gamma)


@pytest.mark.parametrize("objective", ["log_loss", "ece"])
def test_sts_undoes_overconfidence_position_by_position(objective):
    true_logits, survived, valid = _synthetic_blocks()
    overconfident = true_logits * torch.tensor([3.0, 2.0, 0.5])  # temperatures to find: 3, 2, 0.5
    scalings = fit_sts(overconfident, survived, valid, with_offset=False, objective=objective)
    for found, expected in zip(scalings, [3.0, 2.0, 0.5], strict=True):
        assert abs(math.log(found.temperature / expected)) < 0.2 and found.offset == 0
    before = prefix_ece(overconfident, survived, valid)
    after = prefix_ece(overconfident, survived, valid, scalings)
    assert all(a < 0.02 for a in after) and all(b > 0.05 for b in before[:2])


@pytest.mark.parametrize("objective", ["log_loss", "ece"])
def test_offset_fixes_a_shift_that_temperature_cannot(objective):
    true_logits, survived, valid = _synthetic_blocks()
    shifted = true_logits + 1.5  # overestimates every position by the same margin
    temperature_only = prefix_ece(
        shifted, survived, valid, fit_sts(shifted, survived, valid, with_offset=False, objective=objective)
    )
    scalings = fit_sts(shifted, survived, valid, objective=objective)
    assert all(abs(s.offset + 1.5) <= 0.2 for s in scalings)
    assert max(prefix_ece(shifted, survived, valid, scalings)) < 0.02 < max(temperature_only)


def test_cross_fitted_ece_scores_each_fold_with_a_fit_that_never_saw_it():
    """Two folds whose confidences are off by different margins: each is calibrated by its own fit, but
    cross-fitting scores it with the other fold's, which does not transfer."""
    true_logits, survived, valid = _synthetic_blocks()
    half = len(true_logits) // 2
    folds = [
        (true_logits[:half] + 2.0, survived[:half], valid[:half]),
        (true_logits[half:], survived[half:], valid[half:]),
    ]
    for fold in folds:
        assert max(prefix_ece(*fold, fit_sts(*fold))) < 0.02
    assert min(cross_fitted_ece(folds, fit_sts)) > 0.1
    same = [folds[1], (true_logits[:half], survived[:half], valid[:half])]
    assert max(cross_fitted_ece(same, fit_sts)) < 0.02


def test_draft_vocabulary_takes_the_most_produced_tokens():
    seqs = [
        Sequence(
            torch.tensor([9, 9, 5, 5, 5, 7]), 2, torch.zeros(5, 1), torch.zeros(4, 1), torch.zeros(4, 1)
        ),
        Sequence(torch.tensor([9, 3, 3, 5]), 1, torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, 1)),
    ]
    assert build_draft_vocab(seqs, 3, always=[2]).tolist() == [2, 3, 5]  # prompt tokens (9) do not count


def test_train_pipeline_end_to_end_and_resume(tmp_path):
    """A tiny budget through every stage: data from the engine, training, calibration, export, reload."""
    from dspark.drafters.dspark.checkpoint import load_calibration, load_drafter
    from dspark.training.train import TrainConfig, train

    cfg = TrainConfig(
        output=str(tmp_path / "drafter"), data_dir=str(tmp_path / "data"), num_prompts=6,
        max_response_tokens=12, holdout_sequences=2, epochs=1, sequences_per_step=2, anchors_per_sequence=4,
        draft_vocab_size=256, num_hidden_layers=1, markov_rank=8, warmup_steps=1,
    )  # fmt: skip
    out = train(cfg)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["shard-0000.safetensors"]
    history = (out / "train_history.json").read_text()
    assert '"step": 2' in history  # 4 training sequences / 2 per step
    drafter = load_drafter(out)
    assert drafter.cfg.draft_vocab_size == 256 and drafter.cfg.num_hidden_layers == 1
    assert calibration_has_shared(out)
    calibration = load_calibration(out)
    assert calibration is not None and len(calibration.greedy) == cfg.block_size
    assert (out / "train_state.json").exists() and not (out / "train_state.pt").exists()  # no pickle
    train(cfg)  # everything done: resumes at the last step, trains nothing more, re-exports
    assert (out / "train_history.json").read_text() == history


def test_sampled_responses_are_reproducible_and_keep_held_out_prompts_out(tmp_path):
    """Sampled data: several distinct responses per prompt, the same ones when regenerated (a seed per
    response), and none for the held-out prompts in the training split."""
    from dspark.training.data import load_sequences
    from dspark.training.train import SampledResponses, TrainConfig, train, training_data

    cfg = TrainConfig(
        data_dir=str(tmp_path / "greedy"), num_prompts=4, max_response_tokens=10, holdout_sequences=2,
        sampled_responses=SampledResponses(per_prompt=3, temperature=1.0, top_p=1.0, top_k=0),
        output=str(tmp_path / "drafter"), steps=3, sequences_per_step=2, anchors_per_sequence=4,
        draft_vocab_size=256, num_hidden_layers=1, markov_rank=8, warmup_steps=1,
    )  # fmt: skip
    train_set, holdout = training_data(cfg)
    sampled = load_sequences(cfg.sampled_data_dir())
    greedy = load_sequences(cfg.resolved_data_dir())
    assert len(greedy) == 4 and len(sampled) == 12 and len(holdout) == 2
    prompts = [tuple(s.token_ids[: s.prompt_len].tolist()) for s in sampled]
    assert prompts[::3] == [tuple(s.token_ids[: s.prompt_len].tolist()) for s in greedy]
    assert all(prompts[i] == prompts[i + 1] == prompts[i + 2] for i in range(0, 12, 3))
    responses = {tuple(s.token_ids[s.prompt_len :].tolist()) for s in sampled}
    assert len(responses) >= 10  # sampled at temperature 1: the three answers to a prompt differ
    held = {tuple(s.token_ids[: s.prompt_len].tolist()) for s in holdout}
    assert len(train_set) == 2 + 6  # 2 greedy, and 3 sampled for each of their prompts
    assert all(tuple(s.token_ids[: s.prompt_len].tolist()) not in held for s in train_set)

    out = train(cfg)  # on greedy and sampled sequences, for `steps` steps (not 4 epochs of 8 / 2 per step)
    assert [h["step"] for h in json.loads((out / "train_history.json").read_text())] == [1, 2, 3]

    for shard in cfg.sampled_data_dir().iterdir():
        shard.unlink()
    training_data(cfg)  # regenerates the removed shards
    again = load_sequences(cfg.sampled_data_dir())
    assert all(torch.equal(a.token_ids, b.token_ids) for a, b in zip(again, sampled, strict=True))
    with pytest.raises(ValueError, match="temperature"):
        SampledResponses(per_prompt=2, temperature=0.0)

    some = SampledResponses(per_prompt=1, num_prompts=2, temperature=1.0, top_p=1.0, top_k=0)
    limited = cfg.model_copy(update={"data_dir": str(tmp_path / "limited"), "sampled_responses": some})
    train_set, _ = training_data(limited)  # sampled answers for the first 2 of the 4 prompts only
    assert [s.prompt_len for s in load_sequences(limited.sampled_data_dir())] == [
        s.prompt_len for s in greedy[:2]
    ]
    assert len(train_set) == 2 + 2


def calibration_has_shared(out) -> bool:
    from dspark.drafters.dspark.checkpoint import load_calibration

    calibration = load_calibration(out)
    return calibration is not None and calibration.greedy_shared is not None


def _toy_training(model, optimizer, rng, generator, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(4, 3, generator=generator) + rng.random()
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _toy():
    import random

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    return model, optimizer, random.Random(1), torch.Generator().manual_seed(2)


def test_resume_state_is_safetensors_and_json_and_resumes_exactly(tmp_path):
    """Training resumed from the saved state takes the very steps an uninterrupted run takes; the state is
    a safetensors file and validated JSON (no pickle), and a save replaces the previous pair atomically."""
    import pytest
    from safetensors.torch import load_file

    from dspark.training.train import TrainState, load_train_state, save_train_state

    path = tmp_path / "train_state.json"
    model, optimizer, rng, generator = _toy()
    _toy_training(model, optimizer, rng, generator, 3)
    save_train_state(path, model, optimizer, 2, rng, generator)
    save_train_state(path, model, optimizer, 3, rng, generator)
    _toy_training(model, optimizer, rng, generator, 3)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "train_state-0000003.safetensors",
        "train_state.json",
    ]
    state = TrainState.model_validate_json(path.read_text())
    tensors = load_file(tmp_path / state.tensors_file)
    assert "torch_generator" in tensors and any(k.startswith("optimizer.0.") for k in tensors)

    model, optimizer, rng, generator = _toy()  # a fresh process: other initial values
    assert load_train_state(path, model, optimizer, rng, generator) == 3
    _toy_training(model, optimizer, rng, generator, 3)
    for got, want in zip(model.parameters(), uninterrupted, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)

    path.write_text(path.read_text().replace(state.tensors_file, "../elsewhere.safetensors"))
    with pytest.raises(ValueError, match="tensors_file"):
        load_train_state(path, *_toy())


def test_position_decay_sets_the_weight_curve():
    assert torch.allclose(position_weights(7), torch.exp(-torch.arange(7.0) / 7))
    four = position_weights(7, decay=4)
    assert torch.allclose(four, torch.exp(-torch.arange(7.0) / 4))
    assert four[-1] < position_weights(7)[-1]  # a shorter decay weighs late positions less


def test_init_from_target_copies_the_last_layers(default_model):
    from dspark.drafters.dspark.model import DrafterConfig, DSparkDrafter
    from dspark.training.train import copy_target_layers

    cfg = DrafterConfig.for_target(default_model.cfg, target_layer_ids=[2, 29], num_hidden_layers=2,
                                   block_size=4, markov_rank=8, mask_token_id=16)  # fmt: skip
    drafter = DSparkDrafter(cfg)
    copy_target_layers(drafter, default_model)
    t = default_model.cfg
    for layer, source in zip(drafter.layers, default_model.layers[-2:], strict=True):
        q, k, v = source.attn.wqkv.weight.split([t.q_size, t.kv_size, t.kv_size])
        gate, up = source.mlp.w_gate_up.weight.chunk(2)
        attn, mlp = layer.self_attn, layer.mlp
        assert torch.equal(attn.q_proj.weight, q) and torch.equal(attn.k_proj.weight, k)
        assert torch.equal(attn.v_proj.weight, v) and torch.equal(attn.o_proj.weight, source.attn.wo.weight)
        assert torch.equal(mlp.gate_proj.weight, gate) and torch.equal(mlp.up_proj.weight, up)
        assert torch.equal(mlp.down_proj.weight, source.mlp.w_down.weight)
        assert torch.equal(layer.input_layernorm.weight, source.attn_norm)
        assert torch.equal(layer.post_attention_layernorm.weight, source.mlp_norm)


def test_recipe_arms_change_only_their_own_fields(tmp_path):
    from dspark.training.recipe import RecipeConfig, arms_table

    recipe = RecipeConfig(
        base={"num_prompts": 32, "steps": 5}, arms={"ref": {}, "one": {"num_hidden_layers": 1}},
        arms_dir=str(tmp_path), data_name="shared",
    )  # fmt: skip
    ref, one = recipe.arm("ref"), recipe.arm("one")
    assert (ref.num_hidden_layers, one.num_hidden_layers) == (2, 1)
    assert ref.data_dir == one.data_dir and ref.data_dir.endswith("shared")  # one data set for every arm
    assert ref.model_dump(exclude={"output", "num_hidden_layers"}) == one.model_dump(
        exclude={"output", "num_hidden_layers"}
    )
    assert (ref.output, one.output) == (str(tmp_path / "ref"), str(tmp_path / "one"))
    with pytest.raises(ValueError, match="num_hiden_layers"):
        RecipeConfig(base={}, arms={"typo": {"num_hiden_layers": 1}})
    arm = {
        "changes": {"num_hidden_layers": 1}, "steps": 5, "train_minutes": 1.25, "tau_macro_domains": 1.5,
        "tau_by_domain": {"chat": 1.2, "code": 1.8}, "heldout_accuracy_greedy": [0.4, 0.3],
        "worst_ece": {"greedy": 0.021, "sampled": 0.01},
    }  # fmt: skip
    table = arms_table({"arms": {"one": arm}}).splitlines()
    assert table[0].startswith("| arm | changes | steps | train min | chat | code | macro |")
    row = "| one | num_hidden_layers: 1 | 5 | 1.2 | 1.20 | 1.80 | **1.500** | 0.400 / 0.300 | 2.1% |"
    assert table[2] == row
