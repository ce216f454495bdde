"""Engine checks (marked `engines`, skipped unless SPARSE_MOE_ENGINE_CHECKS=1): a Hub folder of ours on the lowest
transformers we support, and the engine-check script at smoke size (vLLM, llama.cpp, our generate()). They build
their environments under $SPARSE_MOE_ENGINE_VENVS on first use (`ensure_venv` in scripts/engine_harness.py): minutes to tens of
minutes. The first test (not marked) keeps pyproject's lower bound and the checked floor the same version."""

import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_fp32_close, tiny_config
from modeling_sparse_moe import SparseMoEForCausalLM
from modeling_sparse_moe.interop.hub import save_for_hub

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # the engine-check harness is a script, outside the package
from engine_harness import TRANSFORMERS_FLOOR, ensure_venv, run_worker  # noqa: E402


def test_pyproject_lower_bound_is_the_checked_floor():
    pyproject = (ROOT / "pyproject.toml").read_text()
    (bound,) = re.findall(r'"transformers>=([0-9.]+),<6"', pyproject)
    assert bound == TRANSFORMERS_FLOOR


@pytest.mark.engines
@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 6, "qk_norm": "head"}], ids=["default", "sliding-qknorm"])
def test_hub_folder_on_the_oldest_supported_transformers(tmp_path, overrides):
    torch.manual_seed(0)
    model = SparseMoEForCausalLM(tiny_config(**overrides)).eval()
    folder = save_for_hub(model, tmp_path / "hub")
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
        generated = model.generate(ids[:1], max_new_tokens=8, do_sample=False)

    python = ensure_venv("tf-floor")
    out = run_worker(python, "hf", {"model": str(folder), "input_ids": ids.tolist(), "max_new_tokens": 8,
                                    "logits_path": str(tmp_path / "logits.safetensors")}, tmp_path / "work", timeout=900)
    assert out["transformers"] == TRANSFORMERS_FLOOR
    assert_fp32_close(load_file(tmp_path / "logits.safetensors")["logits"], expected)
    assert out["generated"] == generated[0].tolist()


@pytest.mark.engines
def test_engine_checks_script_at_smoke_size(tmp_path):
    """llama.cpp only: vLLM's CPU attention refuses the smoke model's head_dim=8 ("Unsupported CPU attention
    configuration"); vLLM is checked on the quickstart's real models (docs/serving.md)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import engine_checks as script  # noqa: E402

    # f16 only: llama-cpp-python 0.3.36 built with GGML_NATIVE dies on Q8_0 on CPUs that advertise AMX (SIGILL or
    # SIGSEGV on an Intel Xeon VM, for our q8_0 file and llama.cpp's own quantization alike; docs/serving.md)
    report = script.main(["--smoke", "--engines", "ours,llama", "--gguf_types", "f16",
                          "--output_dir", str(tmp_path / "checks")])
    rows = {row["engine"]: row for row in report["agreement"]}
    assert rows["llama.cpp f16"]["identical"] == rows["llama.cpp f16"]["prompts"] == 4, rows["llama.cpp f16"]


def test_engine_checks_refuses_unknown_gguf_types(capsys):
    import engine_checks as script

    for bad in ("q8_0", "f16,q5_0"):  # f16 must come first (the tokenizer check reads it); only known types
        with pytest.raises(SystemExit):
            script.parse_args(["--smoke", "--gguf_types", bad])
        assert "--gguf_types" in capsys.readouterr().err
    assert script.parse_args(["--smoke", "--gguf_types", "f16,Q4_K_M"]).gguf_types == "f16,Q4_K_M"
