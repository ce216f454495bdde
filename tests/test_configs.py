"""The shipped model configs load by name from any folder, and their parameter counts are what README says."""

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoConfig

from modeling_sparse_moe import SparseMoEForCausalLM
from modeling_sparse_moe.configs import CONFIGS_DIR, available_configs, config_path, resolve_config_name


def test_every_shipped_config_loads_by_name():
    names = available_configs()
    assert {"tiny", "demo", "mixtral-8x7b", "olmoe-1b-7b", "deepseek-style"} <= set(names)
    for name in names:
        assert AutoConfig.from_pretrained(config_path(name)).model_type == "sparse_moe"


def test_config_path_works_from_another_folder(tmp_path):
    code = (
        "import modeling_sparse_moe\n"
        "from transformers import AutoConfig\n"
        "from modeling_sparse_moe.configs import config_path\n"
        "print(AutoConfig.from_pretrained(config_path('tiny')).num_experts)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(json.loads((CONFIGS_DIR / "tiny" / "config.json").read_text())
                                                      ["num_experts"])


def test_unknown_config_name_lists_the_shipped_ones():
    with pytest.raises(ValueError, match=r"Unknown model config 'nope'; shipped configs: .*tiny"):
        config_path("nope")


def test_resolve_config_name_leaves_paths_and_hub_names_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository root
    assert resolve_config_name("tiny") == str(CONFIGS_DIR / "tiny")
    assert resolve_config_name("configs/tiny") == str(CONFIGS_DIR / "tiny")
    assert resolve_config_name("org/some-model") == "org/some-model"
    assert resolve_config_name(str(tmp_path)) == str(tmp_path)


def test_demo_config_parameter_counts_match_the_model():
    config = AutoConfig.from_pretrained(config_path("demo"))
    model = SparseMoEForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()
