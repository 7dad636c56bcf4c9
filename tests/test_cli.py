"""The CLI is generated from the pydantic configs: every field has its flag, flags override YAML, nested
defaults survive a partial override, and the engine builder owns draft length and policy defaults."""

from __future__ import annotations

import argparse

import pytest
import yaml
from pydantic import BaseModel

from dspark.assembly import build_engine
from dspark.bench import BenchConfig
from dspark.cli import ExportConfig, GenerateConfig, ProfileConfig, build_parser, main
from dspark.config_cli import _unwrap, config_from_args
from dspark.engine import EngineConfig
from dspark.evaluate import EvalConfig
from dspark.load_bench import LoadBenchConfig
from dspark.scheduling import VerificationConfig
from dspark.serving.config import ServeConfig
from dspark.training.train import TrainConfig

COMMANDS = {
    "generate": GenerateConfig,
    "bench": BenchConfig,
    "bench-load": LoadBenchConfig,
    "profile": ProfileConfig,
    "serve": ServeConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "export": ExportConfig,
}
POSITIONAL = {("prompt",), ("drafter",), ("output",)}  # generate's prompt, export's folders


def leaf_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for name, field in model.model_fields.items():
        annotation = _unwrap(field.annotation)  # an optional section (grpc_tls) has its fields' flags
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths += leaf_paths(annotation, (*prefix, name))
        else:
            paths.append((*prefix, name))
    return paths


def subparser(command: str) -> argparse.ArgumentParser:
    actions = build_parser()._subparsers._group_actions  # type: ignore[union-attr]
    return actions[0].choices[command]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_config_field_has_its_flag(command):
    model = COMMANDS[command]
    dests = {a.dest for a in subparser(command)._actions}
    missing = [
        ".".join(path)
        for path in leaf_paths(model)
        if f"config:{'.'.join(path)}" not in dests and path not in POSITIONAL
    ]
    assert not missing, f"fields without a flag: {missing}"


def test_flags_override_yaml_and_keep_nested_defaults(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({"max_tokens": 7, "engine": {"max_batch_size": 3}}))
    args = build_parser().parse_args(
        [
            "eval",
            "--config",
            str(path),
            "--proposer",
            "ngram",
            "--temperatures",
            "0",
            "--no-verification-draft-gate",
        ]
    )
    config = config_from_args(EvalConfig, args)
    assert config.max_tokens == 7  # from the file
    assert config.engine.max_batch_size == 3  # from the file, nested
    assert config.engine.proposer == "ngram" and config.temperatures == [0.0]  # from the flags
    assert config.engine.verification.draft_gate is False
    # a partial override keeps the command's own nested defaults (eval verifies whole drafts)
    assert config.engine.verification.policy == "fixed" and config.engine.max_model_len == 4096


def test_generate_defaults_and_one_name_for_the_draft_length():
    args = build_parser().parse_args(["generate", "hi", "--num-speculative-tokens", "3", "--max-tokens", "5"])
    config = config_from_args(GenerateConfig, args, prompt=args.prompt)
    assert config.engine.num_speculative_tokens == 3 and config.sampling.max_tokens == 5
    assert config.engine.verification.policy == "scheduler"  # one default policy everywhere
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "hi", "--gamma", "3"])


def test_bad_values_are_refused_naming_the_field(capsys):
    assert main(["bench", "--num-prompts", "0"]) == 2
    assert "num_prompts" in capsys.readouterr().err


@pytest.mark.parametrize(("proposer", "expected"), [("ngram", 4), ("dspark", 7)])
def test_draft_length_defaults_to_the_proposers_own(default_model, tokenizer, proposer, expected):
    config = EngineConfig(
        proposer=proposer, max_batch_size=1, verification=VerificationConfig(policy="fixed")
    )
    engine = build_engine(config, model=default_model, tokenizer=tokenizer)
    assert engine.num_speculative_tokens == engine.config.num_speculative_tokens == expected
    set_explicitly = config.model_copy(update={"num_speculative_tokens": 2})
    assert build_engine(set_explicitly, model=default_model, tokenizer=tokenizer).num_speculative_tokens == 2


def test_a_first_start_answers_then_profiles(default_model, tokenizer, tmp_path, monkeypatch):
    """No cached profile: with defer_profile the engine serves at once (whole drafts), then measures in idle
    time, one timed run per call, and the scheduler takes the profile over once it is complete."""
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path))
    config = EngineConfig(proposer="ngram", max_batch_size=1)
    engine = build_engine(config, model=default_model, tokenizer=tokenizer, defer_profile=True)
    assert engine.profile_pending and engine.policy.profile is None
    (completion,) = engine.generate(["Repeat: one two three, one two three, one two"])
    assert completion.token_ids
    runs = 0
    while engine.profile_pending:
        engine.advance_profile()
        runs += 1
    assert engine.policy.profile is not None and runs > 1
    assert list((tmp_path / "profiles").glob("*.json"))  # cached for the next start
    again = build_engine(config, model=default_model, tokenizer=tokenizer, defer_profile=True)
    assert not again.profile_pending and again.policy.profile == engine.policy.profile


def test_export_writes_a_vllm_folder_and_refuses_a_foreign_drafter(tmp_path, default_model, capsys):
    """`dspark export` of a drafter for the default target writes the standard folder with the reduced head;
    a drafter whose target layers the default model does not have is refused naming the field."""
    import json

    import torch

    from dspark.drafters.dspark.checkpoint import load_drafter, save_drafter
    from dspark.drafters.dspark.model import DrafterConfig, DSparkDrafter

    cfg = DrafterConfig.for_target(
        default_model.cfg, target_layer_ids=[3, 29], num_hidden_layers=1, block_size=3, markov_rank=4,
        draft_vocab_size=64, mask_token_id=16,
    )  # fmt: skip
    drafter = DSparkDrafter(cfg)
    drafter.set_draft_vocab(torch.arange(64) * 5)
    drafter.attach_target(default_model.embed, default_model.lm_head.weight)
    save_drafter(drafter, tmp_path / "own")
    assert main(["export", str(tmp_path / "own"), str(tmp_path / "vllm"), "--format", "vllm"]) == 0
    exported = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert exported["architectures"] == ["Qwen3DSparkModel"] and exported["draft_vocab_size"] == 64
    torch.testing.assert_close(load_drafter(tmp_path / "vllm").lm_head.weight, drafter.lm_head.weight)

    foreign = json.loads((tmp_path / "own" / "config.json").read_text()) | {"target_layer_ids": [3, 40]}
    (tmp_path / "own" / "config.json").write_text(json.dumps(foreign))
    assert main(["export", str(tmp_path / "own"), str(tmp_path / "again")]) == 2
    assert "target_layer_ids" in capsys.readouterr().err
