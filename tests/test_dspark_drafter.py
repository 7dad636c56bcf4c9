"""The DSpark drafter: masking, the Markov head, checkpoints, the engine path, and losslessness.

Structural tests use a small random drafter on the real target (its shapes); the end-to-end tests use the
shipped drafter, whose drafts are often accepted, so verification's accept and reject paths both run.
"""

from __future__ import annotations

import copy

import pytest
import torch
from sampling_checks import first_two_token_probs, first_two_token_pvalue

from dspark.assembly import build_engine
from dspark.drafters.dspark.checkpoint import SHIPPED_DRAFTER, load_drafter, save_drafter
from dspark.drafters.dspark.model import DRAW_CANDIDATES, DrafterConfig, DSparkDrafter, draw_candidates
from dspark.drafters.dspark.proposer import DSparkProposer
from dspark.engine import EngineConfig
from dspark.sampling import SamplingParams, params_tensors, processed_probs
from dspark.scheduling import VerificationConfig
from dspark.training.blocks import block_mask, make_blocks, sample_anchors, score_blocks
from dspark.training.data import FeatureRecorder, Sequence

LAYERS = [3, 29]
GAMMA = 4


@pytest.fixture(scope="module")
def random_drafter(default_model) -> DSparkDrafter:
    torch.manual_seed(0)
    cfg = DrafterConfig.for_target(
        default_model.cfg, target_layer_ids=LAYERS, num_hidden_layers=1, block_size=GAMMA, markov_rank=8,
        draft_vocab_size=512, mask_token_id=16,
    )  # fmt: skip
    drafter = DSparkDrafter(cfg)
    drafter.set_draft_vocab(torch.arange(512) * 3)  # a non-trivial d2t
    drafter.attach_target(default_model.embed, default_model.lm_head.weight)
    drafter.init_norm_for_training()
    with torch.no_grad():  # a non-zero Markov head and q/k norms, as after training
        drafter.markov_head.markov_w2.weight.normal_(0, 0.5)
        for layer in drafter.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return drafter.eval()


@pytest.fixture(scope="module")
def recorded(default_model, tokenizer, to_chat_ids) -> Sequence:
    """A short greedy response with the target features the engine showed its observers."""
    recorder = FeatureRecorder(tuple(LAYERS))
    config = EngineConfig(proposer="none", max_model_len=512)
    engine = build_engine(config, model=default_model, tokenizer=tokenizer, observers=[recorder])
    prompt = to_chat_ids("Name three colors.")
    response = [t for out in engine.stream(prompt, SamplingParams(max_tokens=24)) for t in out.token_ids]
    features = next(iter(recorder.finished.values()))
    topk_ids, topk_probs = torch.zeros(len(response), 1, dtype=torch.long), torch.ones(len(response), 1)
    return Sequence(torch.tensor(prompt + response), len(prompt), features, topk_ids, topk_probs)


def test_observers_see_every_committed_position_once(default_model, recorded: Sequence):
    """Recorded rows equal the target's hidden states of the whole sequence in one forward (position t's
    row comes from positions <= t only), every position but the last."""
    n = len(recorded.token_ids)
    assert recorded.features.shape == (n - 1, len(LAYERS) * default_model.cfg.hidden_size)
    cache = default_model.new_cache(1, 512)
    ids = recorded.token_ids[:-1]
    out = default_model(ids, default_model.layout([0], [0], [n - 1]), cache, hidden_layers=LAYERS)
    reference = torch.cat([out.hidden[layer] for layer in LAYERS], dim=-1)
    torch.testing.assert_close(recorded.features.float(), reference, atol=2e-3, rtol=2e-3)


def test_block_mask_hides_the_future_and_other_blocks():
    mask = block_mask(torch.tensor([2, 5]), num_context=6, rows=3)
    assert mask.shape == (6, 6 + 6)
    assert mask[:3, :6].tolist() == [[True, True, False, False, False, False]] * 3
    assert mask[3:, :6].tolist() == [[True] * 5 + [False]] * 3
    assert mask[:3, 6:9].all() and not mask[:3, 9:].any()  # bidirectional inside the own block only


def _scores(drafter, seq, anchors):
    with torch.no_grad():
        return score_blocks(drafter, seq, make_blocks(seq, anchors, drafter))


def test_blocks_never_see_context_at_or_after_their_anchor(random_drafter, recorded: Sequence):
    anchor = recorded.prompt_len + 5
    before = _scores(random_drafter, recorded, torch.tensor([anchor]))
    perturbed = Sequence(**{**recorded.__dict__, "features": recorded.features.clone()})
    perturbed.features[anchor:] += torch.randn_like(perturbed.features[anchor:].float()).half()
    after = _scores(random_drafter, perturbed, torch.tensor([anchor]))
    torch.testing.assert_close(before.logits, after.logits)
    perturbed.features[anchor - 1] += 1.0  # the last visible position does matter
    assert not torch.allclose(
        before.logits, _scores(random_drafter, perturbed, torch.tensor([anchor])).logits
    )


def test_blocks_scored_together_equal_blocks_scored_alone(random_drafter, recorded: Sequence):
    anchors = sample_anchors(recorded, 6, torch.Generator().manual_seed(1))
    together = _scores(random_drafter, recorded, anchors)
    for i, anchor in enumerate(anchors.tolist()):
        alone = _scores(random_drafter, recorded, torch.tensor([anchor]))
        torch.testing.assert_close(together.logits[i], alone.logits[0], atol=1e-4, rtol=1e-4)


def test_markov_head_changes_position_k_only_through_token_k_minus_1(random_drafter, recorded: Sequence):
    anchors = torch.tensor([recorded.prompt_len + 3])
    batch = make_blocks(recorded, anchors, random_drafter)
    with torch.no_grad():
        reference = score_blocks(random_drafter, recorded, batch)
        for j in range(GAMMA):
            changed = batch.prev_tokens.clone()
            changed[0, j] = (changed[0, j] + 17) % 1536
            other = score_blocks(
                random_drafter, recorded, type(batch)(**{**batch.__dict__, "prev_tokens": changed})
            )
            torch.testing.assert_close(other.base_logits, reference.base_logits)  # the backbone ignores it
            differs = [not torch.allclose(other.logits[0, k], reference.logits[0, k]) for k in range(GAMMA)]
            assert differs == [k == j for k in range(GAMMA)]


def test_engine_path_matches_the_training_path(random_drafter, recorded: Sequence):
    """Drafting from incrementally observed context gives the logits training scored for that anchor."""
    proposer = DSparkProposer(copy.deepcopy(random_drafter))  # it packs its drafter for inference
    anchor = recorded.prompt_len + 7

    class Req:
        request_id, params, generator = "r", SamplingParams(), None
        token_ids = recorded.token_ids[: anchor + 1].tolist()

    for chunk in recorded.features[:anchor].split(5):  # as prefill chunks and verification blocks
        proposer.observe(Req, chunk)
    draft = proposer.propose([Req], [GAMMA])[0]
    scores = _scores(random_drafter, recorded, torch.tensor([anchor]))
    # Greedy drafting feeds its own argmax to the Markov head: replay it through the training path, choosing
    # among each position's DRAW_CANDIDATES best base logits (half of this drafter's 512 draft tokens).
    expected, prev = [], recorded.token_ids[anchor]
    base = scores.base_logits[0]
    floor = base.sort(dim=-1, descending=True).values[:, DRAW_CANDIDATES - 1 : DRAW_CANDIDATES]
    with torch.no_grad():
        for k in range(GAMMA):
            e = random_drafter.markov_embedding(prev[None])
            logits = base[k] + random_drafter.transition_bias(e)[0]
            logits = logits.masked_fill(base[k] < floor[k], float("-inf"))
            prev = random_drafter.draft_to_target[logits.argmax()]
            expected.append(int(prev))
    assert draft.tokens == expected
    assert draft.probs is None and draft.confidences.shape == (GAMMA,)


def test_sampled_drafts_carry_the_distribution_they_were_drawn_from(random_drafter, recorded: Sequence):
    """A sampled draft's probs are what temperature, top-k and top-p make of its logits over the target's
    whole vocabulary (processed_probs on the draw candidates' logits scattered among -inf), though the
    proposer filters the candidates alone; every drafted token lies in its position's support."""
    proposer = DSparkProposer(copy.deepcopy(random_drafter))
    anchor = recorded.prompt_len + 7
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, seed=5)

    class Req:
        request_id, generator = "r", torch.Generator().manual_seed(5)
        token_ids = recorded.token_ids[: anchor + 1].tolist()

    Req.params = params
    for chunk in recorded.features[:anchor].split(5):
        proposer.observe(Req, chunk)
    draft = proposer.propose([Req], [GAMMA])[0]
    base = _scores(random_drafter, recorded, torch.tensor([anchor])).base_logits[0]
    prev = recorded.token_ids[anchor]
    assert draft.probs.shape == (GAMMA, random_drafter.cfg.vocab_size)
    for k, token in enumerate(draft.tokens):
        with torch.no_grad():
            logits = base[k] + random_drafter.transition_bias(random_drafter.markov_embedding(prev[None]))[0]
        logits = logits.masked_fill(~draw_candidates(base[k]), float("-inf"))
        full = torch.full((1, random_drafter.cfg.vocab_size), float("-inf"))
        full[0, random_drafter.draft_to_target] = logits
        expected = processed_probs(full, *params_tensors([params], [1]))[0]
        torch.testing.assert_close(draft.probs[k], expected, rtol=1e-4, atol=1e-6)
        assert expected[token] > 0 and int((expected > 0).sum()) <= 20
        prev = torch.tensor(token)


SAMPLED = SamplingParams(temperature=0.8, top_p=0.9)


@pytest.mark.parametrize(
    ("shipped", "contexts", "sampled"),
    [
        (False, (5, 40, 300), False),
        (True, (5, 40, 300), False),
        (True, (5, 40, 300, *range(9, 90, 9)), False),
        (False, (5, 40, 300, 17), True),
        (True, (5, 40, 300, 17), True),
    ],
)
def test_fused_draft_step_matches_the_pytorch_path(
    random_drafter, default_model, shipped: bool, contexts, sampled: bool
):
    """The native draft step (context append, block layers, Markov draw) gives the PyTorch path's drafts,
    confidences and (sampling requests) draft distributions for a batch of requests with contexts of
    different lengths, over several steps. 12 requests are 84 block rows: past the 64 rows where the target's
    layers leave the block kernel, which the drafter's fp16 weights keep. With `sampled`, every other request
    samples (one with top-k as well), seeded, and both paths get the same generator states."""

    def drafter() -> DSparkDrafter:  # a copy each: proposers pack their drafter
        return load_drafter(SHIPPED_DRAFTER, default_model) if shipped else copy.deepcopy(random_drafter)

    fused, plain = DSparkProposer(drafter()), DSparkProposer(drafter())
    if fused.drafter.fused is None:
        pytest.skip("native kernels unavailable on this machine")
    plain.drafter.fused = None
    width = default_model.cfg.hidden_size * len(fused.hidden_layers)
    gen = torch.Generator().manual_seed(1)

    class Req:
        def __init__(self, i: int, length: int) -> None:
            self.request_id, self.params, self.generator = f"r{i}", SamplingParams(), None
            if sampled and i % 2:
                self.params = SAMPLED.model_copy(update={"top_k": 20 * (i == 3)})
                self.generator = torch.Generator().manual_seed(i)
            self.token_ids = torch.randint(0, default_model.cfg.vocab_size, (length,), generator=gen).tolist()

    requests = [Req(i, length) for i, length in enumerate(contexts)]
    for r in requests:
        for chunk in torch.randn(len(r.token_ids) - 1, width, generator=gen).split(17):
            fused.observe(r, chunk)
            plain.observe(r, chunk)
    for _ in range(3):
        lengths = [(7, 3, 5)[i % 3] for i in range(len(requests))]
        states = [None if r.generator is None else r.generator.get_state() for r in requests]
        drafts = fused.propose(requests, lengths)
        for r, state in zip(requests, states, strict=True):
            if state is not None:
                r.generator.set_state(state)
        for a, b in zip(drafts, plain.propose(requests, lengths), strict=True):
            assert a.tokens == b.tokens
            torch.testing.assert_close(a.confidences, b.confidences, rtol=1e-4, atol=1e-5)
            assert (a.probs is None) == (b.probs is None)
            if a.probs is not None:
                torch.testing.assert_close(a.probs, b.probs, rtol=1e-4, atol=1e-6)
        for r in requests:  # the next step commits two tokens
            r.token_ids += [3, 7]
            rows = torch.randn(2, width, generator=gen)
            fused.observe(r, rows)
            plain.observe(r, rows)
    fused.propose(requests, [1] * len(requests))  # computes the keys/values of the rows observed since then
    plain.propose(requests, [1] * len(requests))
    for r in requests:
        pair = fused.contexts[r.request_id].buffers, plain.contexts[r.request_id].buffers
        for a, b in zip(*pair, strict=True):
            assert a.length == b.length == len(r.token_ids) - 1
            torch.testing.assert_close(a.keys[:, : a.length], b.keys[:, : b.length], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(a.values[:, : a.length], b.values[:, : b.length], rtol=1e-4, atol=1e-4)


def test_checkpoint_round_trips(random_drafter, default_model, tmp_path):
    """Both flavours of the standard folder load back to the same tensors; the project's own omits the
    reduced LM head (the target's rows, rebuilt from d2t), the vLLM one carries it."""
    for fmt in ("dspark", "vllm"):
        save_drafter(random_drafter, tmp_path / fmt, fmt=fmt)
        loaded = load_drafter(tmp_path / fmt, default_model)
        expected = random_drafter.state_dict()
        assert loaded.state_dict().keys() == expected.keys()
        for name, tensor in loaded.state_dict().items():
            assert torch.equal(tensor, expected[name]), (fmt, name)
        assert loaded.cfg == random_drafter.cfg
    assert "lm_head.weight" not in safe_open_keys(tmp_path / "dspark")
    assert "lm_head.weight" in safe_open_keys(tmp_path / "vllm")
    save_drafter(random_drafter, tmp_path / "half", dtype=torch.float16)  # the shipped format
    half = load_drafter(tmp_path / "half", default_model)
    torch.testing.assert_close(
        half.markov_head.markov_w2.weight, random_drafter.markov_head.markov_w2.weight, atol=1e-3, rtol=1e-3
    )


def safe_open_keys(directory) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return set(f.keys())


# ---- the shipped drafter, end to end -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped_proposer(default_model) -> DSparkProposer:
    return DSparkProposer.load(SHIPPED_DRAFTER, default_model)


def test_shipped_drafter_is_small_and_calibrated():
    size = sum(f.stat().st_size for f in SHIPPED_DRAFTER.iterdir())
    assert size <= 48 * 2**20  # fp16; v6's rank-256 Markov table (49,152 x 256) is 24 MiB of it
    assert (SHIPPED_DRAFTER / "calibration.json").exists()


def test_greedy_output_is_the_targets_own(
    default_model, tokenizer, shipped_proposer, to_chat_ids, dev_prompts
):
    plain = build_engine(
        EngineConfig(proposer="none", max_batch_size=4), model=default_model, tokenizer=tokenizer
    )
    config = EngineConfig(
        proposer="dspark", max_batch_size=4, verification=VerificationConfig(policy="fixed")
    )
    spec = build_engine(config, model=default_model, tokenizer=tokenizer, proposer=shipped_proposer)
    prompts = [to_chat_ids(p) for p in dev_prompts[:: len(dev_prompts) // 6][:6]]
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    expected = [c.token_ids for c in plain.generate(prompts, params)]
    got = spec.generate(prompts, params)
    assert [c.token_ids for c in got] == expected
    assert spec.stats.accepted > 0  # the drafts were really used
    assert not shipped_proposer.contexts  # released with their requests


def test_sampled_output_follows_the_targets_distribution(
    default_model, tokenizer, shipped_proposer, hf_model
):
    """Chi-square on (t1, t2): t1 comes from the prompt's forward, t2 from verifying the first draft."""
    prompt = tokenizer.encode("The most important thing in life is")
    config = EngineConfig(
        proposer="dspark", max_batch_size=8, verification=VerificationConfig(policy="fixed")
    )
    spec = build_engine(config, model=default_model, tokenizer=tokenizer, proposer=shipped_proposer)
    # 2,400 draws: with 600, drafter v6's first 600 seeds gave p = 2e-4 (a fixed draw: with each new drafter a
    # correct sampler fails at alpha 1e-3 one time in a thousand), while 8,400 other draws gave p 0.26, 0.32.
    n = 2400
    # max_tokens 3: after t1 two tokens remain, so the engine drafts (a lone last token needs no draft)
    params = [SamplingParams(temperature=1.0, max_tokens=3, seed=i, ignore_eos=True) for i in range(n)]
    completions = []
    for start in range(0, n, 100):
        batch = params[start : start + 100]
        ids = [spec.add_request(prompt, p) for p in batch]
        outs: dict[str, list[int]] = {i: [] for i in ids}
        for out in spec.run_until_done():
            outs[out.request_id] += out.token_ids
        completions += [tuple(outs[i][:2]) for i in ids]
    assert spec.stats.accepted > 0 and spec.stats.drafted > spec.stats.accepted

    p1, p2 = first_two_token_probs(hf_model, prompt)
    assert first_two_token_pvalue(completions, p1, p2) > 1e-3


def test_calibrated_confidences_apply_each_requests_own_scalings(random_drafter, recorded: Sequence):
    """Greedy and sampled requests in one call get their own per-position STS scalings: sigmoid(l / T_k + b_k)
    of the confidence head's logit, as PositionScaling.apply computes it."""
    from dspark.drafters.dspark.calibration import Calibration, PositionScaling

    scalings = [PositionScaling(temperature=0.5 + k / 4, offset=k / 10 - 0.3) for k in range(GAMMA)]
    calibration = Calibration(greedy=scalings, sampled=[PositionScaling(temperature=2.0)] * GAMMA)
    proposer = DSparkProposer(copy.deepcopy(random_drafter), calibration)
    anchor = recorded.prompt_len + 4

    def request(rid: str, params: SamplingParams):
        return type("Req", (), {"request_id": rid, "params": params, "generator": torch.Generator(),
                                "token_ids": recorded.token_ids[: anchor + 1].tolist()})  # fmt: skip

    greedy, sampled = request("g", SamplingParams()), request("s", SamplingParams(temperature=1.0))
    for req in (greedy, sampled):
        proposer.observe(req, recorded.features[:anchor])
    drafts = proposer.propose([greedy, sampled], [GAMMA, GAMMA])
    raw = random_drafter  # same weights, unpacked, no calibration
    with torch.no_grad():
        features = raw.context_features(recorded.features[:anchor])
        context = [raw.context_keys_values(features, torch.arange(anchor))]
        anchors, positions = recorded.token_ids[anchor : anchor + 1], torch.tensor([anchor])
        hidden = raw.backbone(anchors, positions, context, [GAMMA], [None])[0]
        prev, expected = recorded.token_ids[anchor], []
        for k, token in enumerate(drafts[0].tokens):
            logit = raw.confidence_logit(hidden[k : k + 1], raw.markov_embedding(torch.tensor([prev])))
            expected.append(scalings[k].apply(logit[0]))
            prev = token
    torch.testing.assert_close(drafts[0].confidences, torch.stack(expected), atol=1e-5, rtol=1e-5)
    assert drafts[1].confidences.shape == (GAMMA,)
    assert not torch.allclose(drafts[1].confidences, drafts[0].confidences)  # the sampled scalings differ


def test_widening_the_markov_rank_keeps_every_draft_and_confidence(
    random_drafter, default_model, recorded: Sequence, tmp_path
):
    """A warm start at a larger Markov rank (`init_from`) drafts exactly as the checkpoint did, and the
    added rank learns from the first step (W2's new rows get gradients); a config that differs in anything
    else is refused by field."""
    from dspark.training.train import TrainConfig, warm_start

    save_drafter(random_drafter, tmp_path / "small")
    fields = dict(target_layer_ids=LAYERS, num_hidden_layers=1, block_size=GAMMA, draft_vocab_size=512)
    wide = warm_start(TrainConfig(init_from=str(tmp_path / "small"), markov_rank=16, **fields), default_model)
    assert wide.cfg.markov_rank == 16 and wide.markov_head.markov_w1.weight.shape[1] == 16
    batch = make_blocks(recorded, sample_anchors(recorded, 5, torch.Generator().manual_seed(2)), wide)
    with torch.no_grad():
        before = score_blocks(random_drafter, recorded, batch)
    after = score_blocks(wide, recorded, batch)
    torch.testing.assert_close(after.logits, before.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after.confidence_logits, before.confidence_logits, atol=1e-5, rtol=1e-5)
    after.logits.logsumexp(-1).sum().backward()
    assert wide.markov_head.markov_w2.weight.grad[:, 8:].abs().sum() > 0
    with pytest.raises(ValueError, match="num_hidden_layers"):
        warm_start(TrainConfig(init_from=str(tmp_path / "small"), **{**fields, "num_hidden_layers": 2}),
                   default_model)  # fmt: skip
    with pytest.raises(ValueError, match="widened, not cut"):
        warm_start(TrainConfig(init_from=str(tmp_path / "small"), markov_rank=4, **fields), default_model)
