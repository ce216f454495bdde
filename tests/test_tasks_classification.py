"""Sentiment recipe: run_classification's CSV format, errors naming the file, learning at smoke size."""

import csv
import json

import pytest

from modeling_sparse_moe.tasks import classification
from modeling_sparse_moe.tasks.common import DataFileError

COMMON = ["--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", "--per_device_train_batch_size",
          "16", "--per_device_eval_batch_size", "32", "--tokenizer_vocab_size", "300", "--logging_steps", "20"]


def _write_csv(path, rows, fields=("sentence", "label")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def test_accuracy_f1():
    scores = classification.accuracy_f1([1, 1, 0, 0], [1, 0, 0, 0])
    assert scores["accuracy"] == 0.75
    assert scores["f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_offline_sentiment_set_is_vader_polarity():
    pytest.importorskip("vaderSentiment")
    from modeling_sparse_moe.tasks.data import sentiment_dataset

    data = sentiment_dataset()
    rows = {r["sentence"]: r["label"] for split in data.values() for r in split}
    assert rows["good"] == 1 and rows["terrible"] == 0
    assert 3000 < len(rows) < 7600 and 0.3 < sum(rows.values()) / len(rows) < 0.7


def test_missing_label_column_and_unknown_labels_name_the_file(tmp_path):
    train = _write_csv(tmp_path / "train.csv", [{"sentence": "fine"}], fields=("sentence",))
    with pytest.raises(DataFileError, match=r"train\.csv: missing column\(s\) \['label'\]"):
        classification.main(["--config_name", "configs/tiny", "--train_file", train, "--output_dir",
                             str(tmp_path / "o"), "--do_train", *COMMON])
    train = _write_csv(tmp_path / "t2.csv", [{"sentence": "good", "label": "pos"}, {"sentence": "bad", "label": "neg"}])
    dev = _write_csv(tmp_path / "dev.csv", [{"sentence": "meh", "label": "neutral"}])
    with pytest.raises(DataFileError, match=r"dev\.csv: labels \['neutral'\] do not occur in training"):
        classification.main(["--config_name", "configs/tiny", "--train_file", train, "--validation_file", dev,
                             "--output_dir", str(tmp_path / "o2"), "--do_train", "--do_eval", *COMMON])
    notext = _write_csv(tmp_path / "x.csv", [{"review": "good", "label": 1}], fields=("review", "label"))
    with pytest.raises(DataFileError, match=r"x\.csv: no text column"):
        classification.main(["--config_name", "configs/tiny", "--train_file", notext, "--output_dir",
                             str(tmp_path / "o3"), "--do_train", *COMMON])


@pytest.mark.slow
def test_smoke_finetune_beats_untuned_model(tmp_path):
    """32 VADER-rated words as a CSV with string labels; accuracy on them after 60 steps beats the untrained model."""
    pytest.importorskip("vaderSentiment")
    from modeling_sparse_moe.tasks.data import sentiment_dataset

    train = sentiment_dataset()["train"]
    pos = [r for r in train if r["label"] == 1 and r["sentence"].isalpha()][:16]
    neg = [r for r in train if r["label"] == 0 and r["sentence"].isalpha()][:16]
    rows = [{"sentence": r["sentence"], "label": "positive" if r["label"] else "negative"} for r in pos + neg]
    path = _write_csv(tmp_path / "train.csv", rows)
    result = classification.main([
        "--config_name", "configs/tiny", "--train_file", path, "--validation_file", path, "--test_file", path,
        "--output_dir", str(tmp_path / "cls"), "--do_train", "--do_eval", "--do_predict", "--max_steps", "60",
        "--learning_rate", "1e-2", *COMMON,
    ])
    assert result["labels"] == ["negative", "positive"]
    assert result["eval_accuracy"] >= result["eval_accuracy_before"] + 0.2, result
    assert result["eval_accuracy"] >= 0.8
    lines = (tmp_path / "cls" / "predict_results.txt").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 33
    assert json.loads((tmp_path / "cls" / "all_results.json").read_text())["eval_accuracy"] == result["eval_accuracy"]
