"""The wheel users install: built from the tracked sources, it carries the shipped configs (found by name after a
plain `pip install`) and every Hub-facing file; installed in a fresh virtual environment, the quickstart's smoke run
works from it (engine check: it installs the dependencies from the package index)."""

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from modeling_sparse_moe.configs import CONFIGS_DIR, available_configs
from modeling_sparse_moe.interop.hub import hub_facing_files

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "modeling_sparse_moe"


def build_wheel(out: Path) -> Path:
    """`python -m build --wheel --no-isolation` on a copy of the sources a wheel is built from (pyproject, README and
    the package), so the build neither writes into the checkout nor sees untracked files outside the package."""
    src = out / "src"
    src.mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    shutil.copytree(PACKAGE, src / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    done = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (wheel,) = out.glob("sparse_moe-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_carries_the_configs_and_the_hub_facing_files(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        shipped = sorted(p for p in CONFIGS_DIR.rglob("*") if p.is_file() and p.suffix in (".json", ".yaml"))
        assert len(shipped) >= 10 and {"tiny", "demo"} <= set(available_configs())
        for path in shipped:  # every shipped config, byte for byte
            inside = f"{PACKAGE.name}/{path.relative_to(PACKAGE).as_posix()}"
            assert inside in names, f"{inside} missing from the wheel"
            assert archive.read(inside) == path.read_bytes()
        hub_files = hub_facing_files()
        assert {p.name for p in hub_files} >= {"configuration_sparse_moe.py", "modeling_sparse_moe.py", "moe_dispatch.py"}
        for path in hub_files:
            assert archive.read(f"{PACKAGE.name}/{path.name}") == path.read_bytes()
        assert f"{PACKAGE.name}/model_card_template.md" in names
        assert not [n for n in names if n.startswith(("tests/", "scripts/", "configs/")) or "__pycache__" in n]


def test_configs_resolve_inside_the_package_and_through_the_top_level_link():
    assert CONFIGS_DIR.parent == PACKAGE
    top = ROOT / "configs"
    if top.exists():  # a source checkout: the top-level folder is the package's, not a second copy
        assert top.resolve() == CONFIGS_DIR.resolve()


@pytest.mark.engines
def test_wheel_installs_in_a_fresh_venv_and_runs_the_quickstart_smoke(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"

    def run(*args, cwd=tmp_path, timeout=1800):
        done = subprocess.run([python, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, " ".join(args) + "\n" + done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    # NOTE: torch first, pinned: a bare `torch` requirement resolves to a multi-GB CUDA build on Linux.
    torch_version = __import__("torch").__version__.split("+")[0]
    run("-m", "pip", "install", "-q", f"torch=={torch_version}")
    run("-m", "pip", "install", "-q", f"{wheel}[demo]")
    where = run("-c", "import modeling_sparse_moe, sys; print(modeling_sparse_moe.__file__)")
    assert str(env_dir) in where  # the installed copy, not the checkout
    names = run("-c", "from modeling_sparse_moe.configs import available_configs, config_path; "
                      "from transformers import AutoConfig; import modeling_sparse_moe; "
                      "print(AutoConfig.from_pretrained(config_path('tiny')).num_experts, *available_configs())")
    assert names.split()[1:] == available_configs()
    out = run("-m", "modeling_sparse_moe.quickstart", "--smoke", "--output_dir", str(tmp_path / "qs"))
    assert "hub folder" in out and (tmp_path / "qs" / "summary.txt").is_file()
