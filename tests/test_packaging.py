"""Packaging: the engine installs and runs without the optional extras (serve, bench, dev).

The core dependency list in pyproject.toml stays free of serving and plotting packages, the engine imports
and generates with those packages unimportable, and nothing under dspark/ (but the CLI) imports Ray or the
deployments/ application.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Modules that only the extras bring: setting sys.modules[name] = None makes `import name` raise ImportError.
EXTRA_MODULES = [
    "ray",
    "fastapi",
    "uvicorn",
    "grpc",
    "grpc_reflection",
    "google.protobuf",
    "matplotlib",
    "openai",
    "scipy",
]
CORE_MODULES = [
    "dspark",
    "dspark.engine",
    "dspark.models",
    "dspark.scheduling",
    "dspark.proposers",
    "dspark.verify",
    "dspark.sampling",
    "dspark.drafters.dspark.proposer",
    "dspark.assembly",
    "dspark.training.train",  # `dspark train`: the train extra is empty
]
SERVING_DISTRIBUTIONS = {"ray", "fastapi", "uvicorn", "grpcio", "grpcio-reflection", "protobuf", "matplotlib"}


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_core_dependencies_exclude_serving_and_plotting():
    project = _pyproject()["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    assert not core & SERVING_DISTRIBUTIONS, core & SERVING_DISTRIBUTIONS
    assert {"torch", "transformers", "gguf", "ninja"} <= core
    extras = project["optional-dependencies"]
    serve = {_requirement_name(r) for r in extras["serve"]}
    assert {"ray", "grpcio", "grpcio-reflection", "protobuf", "fastapi", "uvicorn"} <= serve
    assert "matplotlib" in {_requirement_name(r) for r in extras["bench"]}
    # dev pulls in every other extra, so that scripts/setup.sh (`-e ".[dev]"`) installs everything.
    self_refs = [r for r in extras["dev"] if _requirement_name(r) == project["name"]]
    assert len(self_refs) == 1, extras["dev"]
    referenced = set(re.search(r"\[(.*)\]", self_refs[0]).group(1).replace(" ", "").split(","))
    assert referenced == set(extras) - {"dev"}, referenced


GUARDED_ENGINE = textwrap.dedent(
    """
    import importlib, os, sys

    for name in {blocked!r}:
        sys.modules[name] = None  # `import name` now raises ImportError
    for name in {core!r}:
        importlib.import_module(name)

    import torch

    torch.set_num_threads(int(os.environ.get("DSPARK_TEST_THREADS", "2")))

    from dspark.assembly import build_engine
    from dspark.engine import EngineConfig
    from dspark.sampling import SamplingParams

    engine = build_engine(EngineConfig(proposer="none", max_batch_size=1))
    [completion] = engine.generate(
        ["The capital of France is"], SamplingParams(max_tokens=4, ignore_eos=True)
    )
    assert len(completion.token_ids) == 4, completion
    print("generated:", completion.token_ids)
    """
).format(blocked=EXTRA_MODULES, core=CORE_MODULES)


def test_engine_imports_and_generates_without_extras():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", GUARDED_ENGINE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "generated:" in proc.stdout


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):  # function bodies included
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_dspark_package_never_imports_ray_or_deployments():
    """Ray and the deployments/ application sit on top of dspark, never under it (only the CLI reaches up)."""
    offenders = {
        str(path.relative_to(ROOT)): sorted(roots)
        for path in sorted((ROOT / "dspark").rglob("*.py"))
        if path != ROOT / "dspark" / "cli.py" and (roots := _imported_roots(path) & {"ray", "deployments"})
    }
    assert not offenders, offenders
