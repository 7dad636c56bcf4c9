"""The repository is self-contained: a copy of its files alone, with nothing beside it, runs the product.

The tracked and untracked-but-not-ignored files (what a commit of the working tree holds) are copied into an
empty `isolated/repo` folder, so that no `../shared` or other sibling exists, and `dspark bench`,
`dspark eval` and the gRPC load generator's default prompt loading run there on their default prompt files.
The model cache (DSPARK_CACHE) is reused: it is a cache, not part of the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _repo_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout
    names = sorted({name for name in out.decode().split("\0") if name})
    # a tracked file deleted in the working tree is still listed by --cached
    return [name for name in names if (REPO / name).is_file() or (REPO / name).is_symlink()]


@pytest.fixture(scope="module")
def isolated(tmp_path_factory) -> Path:
    """A copy of the repository's files in an otherwise empty folder: `<tmp>/isolated/repo`."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    root = tmp_path_factory.mktemp("fresh_clone") / "isolated"
    copy = root / "repo"
    for name in _repo_files():
        dest = copy / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest, follow_symlinks=False)
    assert sorted(p.name for p in root.iterdir()) == ["repo"]  # nothing beside the copy
    return copy


def _env(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy)
    # The native kernels build in the cache folder; from the copy's sources torch would rebuild them there
    # (new source paths) and the checkout would rebuild them again afterwards. Their PyTorch fallback serves.
    env["DSPARK_NATIVE_KERNELS"] = "0"
    return env


def _run(copy: Path, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, *args], cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def test_copy_imports_itself_and_loads_default_prompts(isolated):
    """The copy's own packages are imported (not the checkout's), and the load generator's default prompts
    (its `_prompts`, as `main` uses them with no --prompts) come from the copy's data/."""
    script = """
import json
from pathlib import Path

import dspark
import dspark.cli
import dspark.prompts
import load_tests.grpc_load as grpc_load

config = grpc_load.LoadConfig(num_requests=1)
prompts = grpc_load._prompts(config)
print(json.dumps({
    "dspark": str(Path(dspark.__file__).resolve()),
    "cli": str(Path(dspark.cli.__file__).resolve()),
    "grpc_load": str(Path(grpc_load.__file__).resolve()),
    "data_dir": str(dspark.prompts.data_dir().resolve()),
    "prompts": len(prompts),
    "first": prompts[0][1] if prompts else "",
}))
"""
    out = json.loads(_run(isolated, ["-c", script], timeout=120).stdout.strip().splitlines()[-1])
    copy = isolated.resolve()
    for key in ("dspark", "cli", "grpc_load", "data_dir"):
        assert Path(out[key]).is_relative_to(copy), f"{key} resolved to {out[key]}, outside the copy {copy}"
    assert out["prompts"] > 0 and out["first"]


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        ("bench", ["--no-compare-transformers", "--no-cost-curve"]),
        ("eval", ["--temperatures", "0"]),
    ],
)
def test_command_runs_in_copy(isolated, tmp_path, command, flags):
    """`dspark bench` and `dspark eval` on their default prompt set, from the copy alone."""
    output = tmp_path / f"{command}.json"
    _run(isolated, ["-m", "dspark.cli", command, "--num-prompts", "1", "--max-tokens", "4", *flags,
                    "--output", str(output)])  # fmt: skip
    assert json.loads(output.read_text())
