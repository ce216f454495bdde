"""Every command in README runs: its Python blocks as written, in a fresh folder outside the repository, and each
shell command either here at smoke size (the README command itself, smoke flags appended: argparse keeps the last
value of a repeated flag), or by the test / CI step that the registry below names. A README command missing from
the registry fails the test, so README cannot gain an untested command."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# Placeholders a reader replaces; the test runs the blocks with a local stand-in.
SUBSTITUTIONS = {'"USER/tiny-moe"': '"outputs/tiny-moe"'}

# README shell command (as written, continuation lines joined) -> how it is run.
#   ("ci", text)       .ci/run runs it, or its equivalent here (text must appear in .ci/run)
#   ("test", id)       that test runs it (the test must exist)
#   ("run", [flags])   this file runs it at smoke size, flags appended, in README order, in one fresh folder
RECIPE_SMOKE = {
    "pretrain.py": ["--config_name", "tiny", "--max_corpus_chars", "20000", "--max_steps", "2", "--block_size", "32",
                    "--logging_steps", "1", "--max_eval_samples", "4", "--report_to", "none"],
    "finetune_translation.py": ["--max_steps", "2", "--max_train_samples", "16", "--max_eval_samples", "4",
                                "--val_max_target_length", "8", "--report_to", "none"],
    "finetune_qa.py": ["--max_steps", "2", "--max_train_samples", "16", "--max_eval_samples", "8",
                       "--max_seq_length", "96", "--doc_stride", "32", "--report_to", "none"],
    "finetune_classification.py": ["--max_steps", "2", "--max_train_samples", "32", "--max_eval_samples", "16",
                                   "--report_to", "none"],
    "sft.py": ["--max_steps", "2", "--max_train_samples", "8", "--max_eval_samples", "4", "--report_to", "none"],
    "plot_routing.py": ["--num_texts", "2"],
    "push_to_hub.py": [],
    "plan_memory.py": [],
}
COVERED = {
    "pip install torch --index-url https://download.pytorch.org/whl/cpu":
        ("ci", 'pip install -q "torch==2.13.0"'),  # CI takes the CPU build that lies on disk; no other index here
    'pip install -e ".[dev]"': ("ci", 'pip install -q -e ".[dev]"'),
    "python -m pytest -q": ("ci", "python -m pytest -q"),
    "python -m modeling_sparse_moe.quickstart": ("test", "tests/test_quickstart.py::test_smoke_run_tells_the_whole_story"),
    "python scripts/push_to_hub.py outputs/tiny-moe --repo-id USER/tiny-moe":
        ("test", "tests/test_hub.py::test_readme_share_commands_work_as_written"),  # real client, HTTP replaced
    "python scripts/convert.py --from auto path/to/Mixtral-8x7B-v0.1 out/sparse-mixtral":
        ("test", "tests/test_conversion.py::test_cli_converts_both_ways_and_upcycles"),
    "python scripts/convert.py --to mixtral out/sparse-mixtral out/mixtral-again":
        ("test", "tests/test_conversion.py::test_cli_converts_both_ways_and_upcycles"),
    "python scripts/convert.py --upcycle --num-experts 8 --top-k 2 path/to/Llama-3.2-1B out/llama-8x1b":
        ("test", "tests/test_conversion.py::test_cli_converts_both_ways_and_upcycles"),
    "torchrun --nproc_per_node 2 scripts/pretrain.py --config_name tiny --output_dir out/ddp --max_steps 20":
        ("test", "tests/test_distributed.py::test_pretraining_recipe_runs_unchanged_under_torchrun"),
    "python scripts/bench_moe.py --quick": ("test", "tests/test_scripts.py::test_bench_moe_reports_every_cell"),
    "python scripts/bench_model.py --quick": ("test", "tests/test_scripts.py::test_bench_model_same_logits_and_breakdown"),
    "python scripts/gpu_check.py --device cpu --quick": ("test", "tests/test_scripts.py::test_gpu_check_cpu_dry_run_passes"),
    "python scripts/prune.py out/quickstart/pretrain out/pruned6 --num_experts 6 --criterion reap --calibration generic":
        ("test", "tests/test_pruning.py::test_prune_script_end_to_end"),
    "python scripts/export.py out/quickstart/pretrain out/serve --gguf":
        ("test", "tests/test_export.py::test_readme_serve_commands_work_as_written"),
    "python scripts/export.py out/quickstart/translation out/serve-mt --gguf q8_0":
        ("test", "tests/test_export.py::test_readme_serve_commands_work_as_written"),
}


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _commands() -> list[str]:
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONUNBUFFERED="1")
    return env


def _how(command: str):
    if command in COVERED:
        return COVERED[command]
    words = shlex.split(command)
    if words[:1] == ["python"] and len(words) > 1 and words[1].startswith("scripts/"):
        name = words[1].removeprefix("scripts/")
        if name in RECIPE_SMOKE and "--repo-id" not in words or "--dry-run" in words:
            return ("run", RECIPE_SMOKE[name])
    return None


def test_every_readme_command_is_run_somewhere():
    commands = _commands()
    assert len(commands) >= 10
    unknown = [c for c in commands if _how(c) is None]
    assert not unknown, f"README commands that no test or CI step runs (add them to the registry): {unknown}"
    ci = (ROOT / ".ci" / "run").read_text()
    for command in commands:
        kind, what = _how(command)
        if kind == "ci":
            assert what in ci, (command, what)
        elif kind == "test":
            path, name = what.split("::")
            assert f"def {name}(" in (ROOT / path).read_text(), what


def test_readme_python_blocks_run_as_written_in_a_fresh_folder(tmp_path):
    """All Python blocks, in README order, each in a new process, from a folder outside the repository."""
    blocks = _blocks("python")
    assert len(blocks) >= 6
    for number, block in enumerate(blocks, start=1):
        for placeholder, stand_in in SUBSTITUTIONS.items():
            block = block.replace(placeholder, stand_in)
        result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=_env(), capture_output=True,
                                text=True, timeout=600, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, f"README python block {number} failed:\n{block}\n{result.stderr[-3000:]}"
        if number == 1:  # the Auto-classes snippet: real numbers, right shapes
            lines = result.stdout.strip().splitlines()
            loss, aux = map(float, lines[0].split())
            assert loss > 0 and aux > 0 and lines[1] == "torch.Size([2, 12])"
    assert (tmp_path / "outputs" / "tiny-moe" / "config.json").is_file()


@pytest.mark.slow
def test_readme_recipe_commands_run_at_smoke_size(tmp_path):
    """The recipe commands, as README writes them plus smoke-size flags, one after the other in one fresh folder (the
    fine-tuning commands start from the model the pretraining command saved)."""
    env = _env()
    share = next(block for block in _blocks("python") if "save_for_hub(" in block)
    hub = subprocess.run([sys.executable, "-c", share.replace("# ... train ...", "")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    assert hub.returncode == 0, hub.stderr[-2000:]  # the folder push_to_hub --dry-run checks
    ran = []
    for command in _commands():
        kind, extra = _how(command)
        if kind != "run":
            continue
        words = shlex.split(command)
        argv = [sys.executable, str(ROOT / words[1]), *words[2:], *extra]
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
        ran.append(words[1])
    assert {"scripts/pretrain.py", "scripts/finetune_translation.py", "scripts/finetune_qa.py"} <= set(ran)
    assert (tmp_path / "out" / "pretrain" / "config.json").is_file()
    assert (tmp_path / "out" / "mt" / "all_results.json").is_file()
