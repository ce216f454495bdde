"""The pretraining recipe through its `main()`: loss falls, checkpoints, exact resume, results files, a Hub-ready
folder that reloads, clear errors on bad input; the World English Bible loader; the MoE-vs-dense study at smoke size."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import modeling_sparse_moe  # noqa: F401
from modeling_sparse_moe.recipes.data import load_bible_corpus, load_text_corpus
from modeling_sparse_moe.recipes.pretraining import apply_config_overrides, main, parse_config_overrides
from modeling_sparse_moe.recipes.study import StudyArguments, run_dense_comparison, steps_to_reach
from modeling_sparse_moe.recipes.training import is_complete_checkpoint


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n".join(load_text_corpus(max_chars=40_000)))
    return path


def _argv(train_file, output_dir, *extra, steps=24):
    return [
        "--config_name", "tiny", "--train_file", str(train_file), "--output_dir", str(output_dir),
        "--max_steps", str(steps), "--per_device_train_batch_size", "8", "--block_size", "32",
        "--learning_rate", "5e-3", "--warmup_steps", "2", "--logging_steps", "1", "--save_steps", "12",
        "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", "--dataloader_pin_memory", "false", *extra,
    ]


def _losses(log_history):
    return {row["step"]: row["loss"] for row in log_history if "loss" in row}


@pytest.fixture(scope="module")
def full_run(train_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    return main(_argv(train_file, out)), out


def test_pretrain_loss_falls_and_writes_a_complete_run(full_run):
    result, out = full_run
    losses = _losses(result["log_history"])
    assert sorted(losses) == list(range(1, 25))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (22, 23, 24)) / 3
    assert last < first - 0.5, (first, last)  # 512-token vocab: ln 512 = 6.24 at the start
    assert is_complete_checkpoint(out / "checkpoint-12") and is_complete_checkpoint(out / "checkpoint-24")
    for name in ("train_results.json", "eval_results.json", "all_results.json", "trainer_state.json",
                 "router_telemetry.json", "README.md", "config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert evaluation["perplexity"] == pytest.approx(math.exp(evaluation["eval_loss"]))
    assert evaluation["eval_loss"] < math.log(512)
    assert result["eval"]["eval_loss"] == pytest.approx(evaluation["eval_loss"])
    assert Path(result["plots"]["loss_curves"]).stat().st_size > 10_000
    assert Path(result["plots"]["expert_load"]).stat().st_size > 10_000
    telemetry = json.loads((out / "router_telemetry.json").read_text())
    assert [row["step"] for row in telemetry["history"]] == list(range(1, 25))


def test_pretrained_folder_reloads_with_its_tokenizer(full_run):
    result, out = full_run
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer("The return statement leaves a function.", return_tensors="pt")["input_ids"]
    assert tokenizer.decode(ids[0]) == "The return statement leaves a function."
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert loss.item() < math.log(512)


def test_eval_loss_is_the_language_model_loss_alone(full_run):
    """The model's own loss adds aux and z losses; eval_loss must not (MoE and dense models compare)."""
    result, out = full_run
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    row = json.loads((out / "eval_results.json").read_text())
    assert row["eval_loss"] > 0
    ids = torch.arange(4, 36).unsqueeze(0)
    with torch.no_grad():
        out_train = model.train()(input_ids=ids, labels=ids)
    assert out_train.aux_loss is not None  # so the recipe's eval must remove it: checked through the trainer below
    from modeling_sparse_moe.recipes.pretraining import PretrainingTrainer

    trainer = PretrainingTrainer(model=model.eval())
    loss = trainer.compute_loss(model, {"input_ids": ids, "labels": ids})
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_resume_continues_with_the_same_losses(full_run, train_file, tmp_path):
    result, out = full_run
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(out / "checkpoint-12", resumed_dir / "checkpoint-12")
    resumed = main(_argv(train_file, resumed_dir, "--resume_from_checkpoint", "True"))
    full, again = _losses(result["log_history"]), _losses(resumed["log_history"])
    assert sorted(again) == list(range(1, 25))
    for step in range(13, 25):
        assert again[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), step
    assert resumed["eval"]["eval_loss"] == pytest.approx(result["eval"]["eval_loss"], rel=1e-5)


def test_bias_updates_are_added_when_the_rate_is_positive(train_file, tmp_path):
    main(_argv(train_file, tmp_path / "bias", "--config_overrides", "router_bias_update_rate=0.01",
               "--save_strategy", "no", "--do_train", steps=4))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bias")
    bias = model.model.layers[0].mlp.gate.e_score_correction_bias
    assert model.config.router_bias_update_rate == 0.01
    # after 4 steps each expert's bias is a sum of four moves of +-0.01 (0 at exactly the mean load)
    assert bias.abs().sum().item() > 0
    assert bias.abs().max().item() <= 0.04 + 1e-6
    assert torch.allclose(bias * 100, (bias * 100).round(), atol=1e-4)


def test_bad_input_names_the_file_or_field(train_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        main(_argv(tmp_path / "missing.txt", tmp_path / "a"))
    no_text = tmp_path / "rows.jsonl"
    no_text.write_text('{"body": "hello there"}\n{"body": "general kenobi"}\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl.*'text'.*body"):
        main(_argv(no_text, tmp_path / "b"))
    with pytest.raises(ValueError, match="num_expertz"):
        main(_argv(train_file, tmp_path / "c", "--config_overrides", "num_expertz=4"))
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        main(_argv(train_file, tmp_path / "d", "--config_overrides", "num_experts_per_tok=9"))
    with pytest.raises(ValueError, match=r"SparseMoEConfig\.hidden_size=.*must be an integer"):
        main(_argv(train_file, tmp_path / "e", "--config_overrides", "hidden_size=wide"))
    with pytest.raises(ValueError, match="unsupported extension"):
        (tmp_path / "x.parquet").write_text("")
        main(_argv(tmp_path / "x.parquet", tmp_path / "f"))


def test_config_overrides_parse_like_run_clm():
    assert parse_config_overrides("num_experts=16,num_experts_per_tok=4,capacity_factor=1.25,qk_norm=head,"
                                  "norm_topk_prob=false,sliding_window=none,mlp_only_layers=[0,1]") == {
        "num_experts": 16, "num_experts_per_tok": 4, "capacity_factor": 1.25, "qk_norm": "head",
        "norm_topk_prob": False, "sliding_window": None, "mlp_only_layers": [0, 1]}
    from transformers import AutoConfig

    config = apply_config_overrides(AutoConfig.from_pretrained("configs/tiny"), "num_experts=8,capacity_factor=1.5")
    assert (config.num_experts, config.capacity_factor, config.hidden_size) == (8, 1.5, 32)


def test_bible_corpus():
    chapters = load_bible_corpus()
    assert len(chapters) == 1189
    assert 3_900_000 < sum(map(len, chapters)) < 4_100_000
    assert chapters[0].startswith("In the beginning God created the heavens and the earth.")
    assert chapters[-1].endswith("The grace of the Lord Jesus be with all the saints. Amen.")
    assert not any("`" in c for c in chapters)
    assert len(load_bible_corpus(max_chars=5_000)) == 2


def test_steps_to_reach_interpolates():
    curve = [(10, 5.0), (20, 4.0), (30, 3.0)]
    assert steps_to_reach(curve, 3.5) == pytest.approx(25.0)
    assert steps_to_reach(curve, 5.5) == 10.0
    assert steps_to_reach(curve, 2.0) is None


@pytest.mark.slow
def test_compare_dense_smoke(tmp_path):
    result = run_dense_comparison(StudyArguments(output_dir=str(tmp_path), smoke=True, steps=10, seeds="0"))
    seed = result["seeds"][0]
    dense, moe = seed["models"]["dense"], seed["models"]["moe-8x32-top2"]
    assert seed["target"] == dense["eval_loss"][-1][1]  # steps-to-target compares curves on the same blocks
    # the final figure: the mean of the last (up to 3) evaluations on every held-out block; 10 steps evaluate twice
    assert [step for step, _ in dense["final_evals"]] == [5, 10]
    finals = [loss for _, loss in dense["final_evals"]]
    assert dense["final_eval_loss"] == pytest.approx(sum(finals) / 2, rel=1e-12)
    assert dense["step_ratio"] == 1.0 and dense["time_ratio"] == pytest.approx(1.0)
    assert dense["final_eval_loss"] < math.log(512)
    assert result["shapes"]["dense"]["active_params"] == pytest.approx(result["shapes"]["moe-8x32-top2"]["active_params"],
                                                                      rel=0.02)
    assert moe["load_imbalance"] and moe["load_imbalance"][-1][1] >= 1.0
    assert (tmp_path / "results.md").read_text().count("| moe-8x32-top2 |") == 1
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000


def test_compare_dense_merge_joins_seeds_run_apart(tmp_path):
    """Seeds run as separate processes merge into one table: the merged per-seed rows are the originals, the table's
    mean is over both seeds, and a folder from a different study is refused by name."""
    from modeling_sparse_moe.recipes.study import merge_dense_comparisons

    folders = []
    for seed in (0, 1):
        folder = tmp_path / f"s{seed}"
        run_dense_comparison(StudyArguments(output_dir=str(folder), smoke=True, steps=6, seeds=str(seed)))
        folders.append(str(folder))
    merged = run_dense_comparison(StudyArguments(output_dir=str(tmp_path / "all"), merge=",".join(folders)))
    originals = [json.loads((Path(f) / "results.json").read_text())["seeds"][0] for f in folders]
    assert [r["seed"] for r in merged["seeds"]] == [0, 1]
    assert merged["seeds"] == originals
    finals = [r["models"]["moe-8x32-top2"]["final_eval_loss"] for r in originals]
    mean = sum(finals) / 2
    std = (sum((f - mean) ** 2 for f in finals)) ** 0.5  # n - 1 = 1
    assert f"| {mean:.3f} ± {std:.3f} |" in (tmp_path / "all" / "results.md").read_text()
    other = tmp_path / "other"
    run_dense_comparison(StudyArguments(output_dir=str(other), smoke=True, steps=4, seeds="2"))
    with pytest.raises(ValueError, match="differs in steps"):
        merge_dense_comparisons([folders[0], str(other)], str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"seed\(s\) \[0\] appear twice"):
        merge_dense_comparisons([folders[0], folders[0]], str(tmp_path / "bad"))


# ------------------------------------------------------------------------------------------------------ --streaming
def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"id": i, "text": text}) + "\n" for i, text in enumerate(texts)))
    return path


@pytest.fixture(scope="module")
def paragraphs():
    """Texts of up to 120 characters (cut from the Python docs' paragraphs), so that thousands fit in a quick test."""
    return [text[i : i + 120] for text in load_text_corpus(max_chars=300_000) for i in range(0, len(text), 120)]


def test_streaming_packs_the_same_blocks_in_the_same_order(paragraphs, tmp_path):
    """Over 2,300 texts (three batches of `map`, the last partial), the stream's blocks are the in-memory blocks."""
    from modeling_sparse_moe.recipes.data import train_tokenizer
    from modeling_sparse_moe.recipes.pretraining import (
        DataTrainingArguments, load_raw_datasets, tokenize_and_pack, training_blocks)
    from transformers import TrainingArguments

    assert len(paragraphs) > 2_400
    train = _jsonl(tmp_path / "train.jsonl", paragraphs[:2_300])
    validation = _jsonl(tmp_path / "val.jsonl", paragraphs[2_300:2_400])
    tokenizer = train_tokenizer(paragraphs[:300], vocab_size=300)
    blocks = {}
    for streaming in (False, True):
        data_args = DataTrainingArguments(train_file=str(train), validation_file=str(validation), streaming=streaming)
        packed = tokenize_and_pack(load_raw_datasets(data_args), tokenizer, 32, data_args)
        blocks[streaming] = {split: [row["input_ids"] for row in packed[split]] for split in ("train", "validation")}
    assert len(blocks[False]["train"]) > 2_000
    assert blocks[True] == blocks[False]
    rows = packed["train"].take(2)
    assert [row["labels"] for row in rows] == [row["input_ids"] for row in rows] == blocks[False]["train"][:2]
    assert set(next(iter(packed["train"]))) == {"input_ids", "attention_mask", "labels"}  # the `id` column is gone
    # what Trainer reads: the same blocks, then the stream again from its start (Trainer stops at --max_steps)
    args = TrainingArguments(output_dir=str(tmp_path / "x"), report_to="none")
    stream, _ = training_blocks(load_raw_datasets(data_args), tokenizer, 32, data_args, args)
    count = len(blocks[False]["train"])
    assert [row["input_ids"] for row in stream.take(count + 3)] == blocks[False]["train"] + blocks[False]["train"][:3]


def test_streaming_holds_out_texts_without_a_validation_split(paragraphs, tmp_path):
    from modeling_sparse_moe.recipes.pretraining import DataTrainingArguments, load_raw_datasets

    texts = paragraphs[:230]
    args = DataTrainingArguments(train_file=str(_jsonl(tmp_path / "t.jsonl", texts)), streaming=True,
                                 validation_split_percentage=5)
    raw = load_raw_datasets(args)
    assert [row["text"] for row in raw["validation"]] == [t for i, t in enumerate(texts) if i % 100 < 5]
    assert [row["text"] for row in raw["train"]] == [t for i, t in enumerate(texts) if i % 100 >= 5]
    # the default corpus cut by --max_corpus_chars: the same chapters streamed or not
    cut = {streaming: load_raw_datasets(DataTrainingArguments(max_corpus_chars=300_000, streaming=streaming))
           for streaming in (False, True)}
    assert sorted(row["text"] for split in cut[True].values() for row in split) == sorted(
        row["text"] for split in cut[False].values() for row in split)
    assert len(load_bible_corpus(max_chars=300_000)) == sum(len(split) for split in cut[False].values()) == 79


def _stream_argv(train, output_dir, *extra):
    return [
        "--config_name", "tiny", "--train_file", str(train), "--output_dir", str(output_dir), "--streaming",
        "--max_steps", "16", "--per_device_train_batch_size", "8", "--block_size", "32", "--learning_rate", "5e-3",
        "--warmup_steps", "2", "--logging_steps", "1", "--save_steps", "12", "--report_to", "none",
        "--disable_tqdm", "true", "--seed", "0", "--dataloader_pin_memory", "false", *extra,
    ]


def test_streaming_run_trains_and_resumes_where_it_stopped(paragraphs, tmp_path):
    """A corpus of 73 blocks (9 batches and 1 block) read almost twice over in 16 steps; resuming at step 12 (in the
    second pass) skips exactly what was consumed: the same losses as the run that never stopped."""
    texts, total = [], 0
    for text in paragraphs:
        texts.append(text)
        total += len(text)
        if total > 6_500:
            break
    train = _jsonl(tmp_path / "small.jsonl", texts)
    full = main(_stream_argv(train, tmp_path / "full"))
    losses = _losses(full["log_history"])
    assert sorted(losses) == list(range(1, 17))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (14, 15, 16)) / 3
    assert last < first - 0.4, (first, last)
    assert full["train"]["train_samples"] == 16 * 8  # blocks consumed
    assert full["eval"]["eval_loss"] < math.log(512)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-12", resumed_dir / "checkpoint-12")
    resumed = _losses(main(_stream_argv(train, resumed_dir, "--resume_from_checkpoint", "True"))["log_history"])
    assert sorted(resumed) == list(range(1, 17))
    for step in range(13, 17):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-5, abs=1e-6), step


def test_streaming_needs_max_steps(train_file, tmp_path):
    argv = [a for a in _argv(train_file, tmp_path / "s", "--streaming") if a not in ("--max_steps", "24")]
    with pytest.raises(ValueError, match="--streaming needs --max_steps"):
        main(argv)
