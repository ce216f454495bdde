"""The benchmark and GPU-check scripts run as a user runs them, at tiny sizes. Timings are not judged here (they
belong to the scripts' own reports); what is exact is: identical logits for identical weights, the dense baseline's
ratio of 1, every cell present, a training step's peak memory holding at least the experts' weight gradients, the
compiled benchmark timing its four contestants, and the correctness checks of `gpu_check.py` passing on its CPU dry
run."""

import json
import subprocess
import sys
from pathlib import Path

from modeling_sparse_moe import SparseMoEConfig


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from bench_moe import BLOCKS, SHAPES  # noqa: E402


def run_script(name: str, *args: str, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_bench_moe_reports_every_cell(tmp_path):
    out = tmp_path / "moe.json"
    run_script(
        "bench_moe.py", "--tokens", "1", "33", "--repeats", "1", "--min-sample-s", "0", "--json", str(out), cwd=tmp_path
    )
    report = json.loads(out.read_text())
    cells = {(r["shape"], r["tokens"], r["mode"], r["block"]): r for r in report["records"]}
    assert set(cells) == {(s, t, m, b) for s in "AB" for t in (1, 33) for m in ("infer", "train") for b in BLOCKS}
    for (shape, _, mode, block), record in cells.items():
        assert record["ms"] > 0
        if block == "dense":
            assert record["ratio"] == 1.0
        if mode == "train" and block == "ours":
            config = SparseMoEConfig(**SHAPES[shape], num_attention_heads=8, num_key_value_heads=8)
            weight_grads_mb = 3 * config.num_experts * config.moe_intermediate_size * config.hidden_size * 4 / 2**20
            assert record["peak_mb"] >= weight_grads_mb, (shape, record["peak_mb"], weight_grads_mb)


def test_bench_model_same_logits_and_breakdown(tmp_path):
    out = tmp_path / "model.json"
    run_script("bench_model.py", "--quick", "--no-rss", "--json", str(out), cwd=tmp_path)
    report = json.loads(out.read_text())
    # Same weights and numerics as Mixtral, in separately allocated tensors: equal up to fp32 rounding (BLAS kernels
    # differ by CPU and alignment; 1e-6 was seen on an AMD EPYC), far below what a wrong weight would give.
    assert report["max_logit_diff"] <= 1e-5
    results = report["results"]
    for model in ("ours", "mixtral"):
        for measure in ("train_step", "prefill", "decode"):
            assert results[measure][model]["tokens_per_s"] > 0
        assert all(results["train_breakdown_ms"][model][part] > 0 for part in ("forward", "backward", "optimizer"))
        assert 0 < results["moe_share_of_decode"][model] < 1


def test_bench_compile_runs_every_contestant(tmp_path):
    """The compiled benchmark's smoke size, prefill only (two compiles): same logits, the four contestants timed."""
    out = tmp_path / "compile.json"
    run_script("bench_compile.py", "--quick", "--measures", "prefill", "--repeats", "1", "--json", str(out), cwd=tmp_path)
    report = json.loads(out.read_text())
    assert report["max_logit_diff"] <= 1e-5  # same weights, separately allocated (see the test above)
    prefill = report["results"]["prefill"]
    assert set(prefill) == {"ours_eager", "ours_compiled", "mixtral_eager", "mixtral_compiled"}
    assert all(prefill[name]["tokens_per_s"] > 0 for name in prefill)
    assert all(prefill[name]["compile_s"] >= 0 for name in ("ours_compiled", "mixtral_compiled"))


def test_gpu_check_cpu_dry_run_passes(tmp_path):
    out = tmp_path / "gpu_check.json"
    stdout = run_script("gpu_check.py", "--device", "cpu", "--quick", "--skip-bench", "--json", str(out), cwd=tmp_path)
    assert "correctness: all passed" in stdout
    report = json.loads(out.read_text())
    assert report["ok"] is True and len(report["checks"]) == 7  # 2 shapes x 3 token counts, plus the whole model


def test_bench_prune_translation_quick_scores_every_criterion(tmp_path):
    """scripts/bench_prune_translation.py --quick on a tiny translation-shaped model: the unpruned score, then every
    criterion x calibration at 2 of 4 experts, each row a chrF/BLEU from the recipe's scorer."""
    import torch

    import bench_prune_translation as bench
    from conftest import tiny_config
    from modeling_sparse_moe import SparseMoEForCausalLM
    from modeling_sparse_moe.recipes.data import load_text_corpus, train_tokenizer

    tokenizer = train_tokenizer(load_text_corpus(max_chars=6000), vocab_size=300)
    torch.manual_seed(0)
    model = SparseMoEForCausalLM(tiny_config(vocab_size=320, max_position_embeddings=256,
                                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                             pad_token_id=tokenizer.pad_token_id))
    model.generation_config.max_new_tokens = 8
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    report = bench.main([str(tmp_path / "model"), "--quick", "--threads", "1", "--json", str(tmp_path / "r.json")])
    assert report["num_experts"] == 4 and report["eval_samples"] == 8
    assert set(report["pruning"]) == {"reap (task)", "frequency (task)", "activation_norm (task)", "random",
                                      "reap (generic)", "frequency (generic)", "activation_norm (generic)"}
    for rows in report["pruning"].values():
        assert list(rows) == [2]  # experts kept
        (row,) = rows.values()
        assert 0 <= row["chrf"] <= 100 and row["vs_base_chrf"] == row["chrf"] - report["base"]["chrf"]
    assert json.loads((tmp_path / "r.json").read_text())["base"] == report["base"]
