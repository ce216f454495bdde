"""QA recipe: SQuAD-format files (a `data` field, unanswerable questions), errors that name the file, n-best span
post-processing across doc-stride windows, the country-held-out offline set, and learning at smoke size."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from datasets import Dataset

from modeling_sparse_moe.recipes.data import train_tokenizer
from modeling_sparse_moe.tasks import qa
from modeling_sparse_moe.tasks.common import DataFileError, load_data_file, pick_examples
from modeling_sparse_moe.tasks.data import country_qa_dataset
from modeling_sparse_moe.tasks.metrics import squad_scores

COMMON = ["--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", "--per_device_train_batch_size",
          "16", "--tokenizer_vocab_size", "400", "--max_seq_length", "96", "--logging_steps", "20"]


def _squad_file(path, records):
    """SQuAD's own layout: {"version", "data": [records]} (flattened records, as run_qa's JSON loader reads)."""
    path.write_text(json.dumps({"version": "v2.0", "data": records}), encoding="utf-8")
    return str(path)


def test_country_qa_holds_out_countries_and_spans_match():
    data = country_qa_dataset(with_negatives=True)
    countries = {s: set(data[s]["title"]) for s in data}
    assert len(countries["test"]) >= 20 and len(countries["validation"]) >= 20 and len(countries["train"]) >= 150
    assert not countries["train"] & countries["test"] and not countries["train"] & countries["validation"]
    unanswerable = sum(not a["text"] for a in data["train"]["answers"])
    assert 0.15 < unanswerable / len(data["train"]) < 0.35
    for row in data["test"]:
        for text, start in zip(row["answers"]["text"], row["answers"]["answer_start"]):
            assert row["context"][start : start + len(text)] == text
    assert len({q.split(" of ")[0] for q in data["train"]["question"]}) > 6  # varied templates


def test_squad_metric_official_rules():
    refs = [{"id": "a", "answers": {"text": ["the Euro"], "answer_start": [0]}},
            {"id": "b", "answers": {"text": [], "answer_start": []}}]
    assert squad_scores({"a": "Euro", "b": ""}, refs)["exact_match"] == 100.0  # articles dropped; empty == no answer
    scores = squad_scores({"a": "Euro coins", "b": "Paris"}, refs)
    assert scores["exact_match"] == 0.0 and scores["HasAns_f1"] == pytest.approx(200 / 3) and scores["NoAns_f1"] == 0.0


def test_postprocessing_finds_gold_span_across_doc_stride_windows():
    tokenizer = train_tokenizer(
        ["filler words more filler", "The capital is Port Louis City.", "What is the capital?"] * 20, 300
    )
    args = SimpleNamespace(max_seq_length=24, doc_stride=6)
    answer = "Port Louis City"
    for n in range(4, 40):
        context = " ".join(["filler words"] * n) + f" The capital is {answer}. " + " ".join(["more filler"] * 10)
        start_char = context.index(answer)
        end_char = start_char + len(answer)
        examples = Dataset.from_list([{"id": "q1", "question": "What is the capital?", "context": context}])
        feats = qa.prepare_validation_features(examples[:], tokenizer, args)
        spans = []
        for offsets in feats["offset_mapping"]:
            ctx = [o for o in offsets if o is not None]
            spans.append((ctx[0][0], ctx[-1][1]))
        cut = [i for i, (a, b) in enumerate(spans) if a <= start_char < b < end_char]
        full = [i for i, (a, b) in enumerate(spans) if a <= start_char and end_char <= b]
        if cut and full:
            break
    else:
        pytest.fail("no context length puts the answer across a window boundary")
    with pytest.raises(ValueError, match="raise --max_seq_length or lower --doc_stride"):
        qa.prepare_validation_features(examples[:], tokenizer, SimpleNamespace(max_seq_length=12, doc_stride=6))
    length = len(feats["input_ids"][0])
    start_logits = np.zeros((len(spans), length), dtype=np.float32)
    end_logits = np.zeros_like(start_logits)
    features = {"example_id": feats["example_id"], "offset_mapping": feats["offset_mapping"]}
    for i in cut:  # the window that cuts the answer: a truncated span scores 5 + 4 = 9
        offsets = feats["offset_mapping"][i]
        first = next(k for k, o in enumerate(offsets) if o is not None and o[1] > start_char)
        last = max(k for k, o in enumerate(offsets) if o is not None)
        start_logits[i, first], end_logits[i, last] = 5.0, 4.0
    i = full[0]  # the window holding the whole answer: the gold span scores 5 + 5.5
    offsets = feats["offset_mapping"][i]
    first = next(k for k, o in enumerate(offsets) if o is not None and o[1] > start_char)
    last = max(k for k, o in enumerate(offsets) if o is not None and o[0] < end_char)
    start_logits[i, first], end_logits[i, last] = 5.0, 5.5
    preds, diffs = qa.postprocess_qa_predictions(examples, features, start_logits, end_logits, n_best_size=5)
    assert preds == {"q1": answer}
    # v2: a null score above the best span predicts no answer.
    start_logits[:, 0] = end_logits[:, 0] = 20.0
    preds, _ = qa.postprocess_qa_predictions(examples, features, start_logits, end_logits, version_2_with_negative=True)
    assert preds == {"q1": ""}


def test_train_features_label_the_answer_tokens():
    data = country_qa_dataset()["train"].select(range(8))
    tokenizer = train_tokenizer(list(data["context"]) + list(data["question"]), 400)
    feats = qa.prepare_train_features(data[:], tokenizer, SimpleNamespace(max_seq_length=96, doc_stride=32))
    for i, (s, e) in enumerate(zip(feats["start_positions"], feats["end_positions"])):
        gold = data[i]["answers"]["text"][0]
        assert tokenizer.decode(feats["input_ids"][i][s : e + 1]).strip() == gold


def test_squad_json_with_data_field_and_unanswerable_loads(tmp_path):
    records = list(country_qa_dataset(with_negatives=True)["train"].select(range(12)))
    path = _squad_file(tmp_path / "train.json", records)
    ds = load_data_file(path)
    assert len(ds) == 12 and set(ds.column_names) >= {"id", "context", "question", "answers"}
    qa.validate_squad_split(ds, path)
    assert any(not a["text"] for a in ds["answers"])
    with pytest.raises(DataFileError, match=r"train\.json.*--version_2_with_negative"):
        qa.main(["--config_name", "configs/tiny", "--train_file", path, "--output_dir", str(tmp_path / "o"),
                 "--do_train", *COMMON])


def test_bad_answer_start_names_file_and_id(tmp_path):
    record = {"id": "x1", "context": "Its capital is Paris.", "question": "Capital?",
              "answers": {"text": ["Paris"], "answer_start": [3]}}
    path = _squad_file(tmp_path / "bad.json", [record])
    with pytest.raises(DataFileError, match=r"bad\.json: id x1: answer_start 3 does not match .*'Paris'"):
        qa.main(["--config_name", "configs/tiny", "--train_file", path, "--output_dir", str(tmp_path / "o"),
                 "--do_train", *COMMON])
    no_context = tmp_path / "cols.jsonl"
    no_context.write_text(json.dumps({"id": "1", "question": "q", "answers": {"text": [], "answer_start": []}}) + "\n")
    with pytest.raises(DataFileError, match=r"cols\.jsonl: missing column\(s\) \['context'\]"):
        qa.main(["--config_name", "configs/tiny", "--train_file", str(no_context), "--output_dir",
                 str(tmp_path / "o"), "--do_train", *COMMON])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["extractive", "generative"])
def test_smoke_finetune_beats_untuned_model(tmp_path, mode):
    """16 training questions in a SQuAD JSON file, scored on the same file: after 60 steps EM and F1 beat the
    untrained model's by a wide margin (a run measured EM 0 -> 100 in both modes)."""
    path = _squad_file(tmp_path / "train.json", list(country_qa_dataset()["train"].select(range(16))))
    result = qa.main([
        "--config_name", "configs/tiny", "--output_dir", str(tmp_path / mode), "--do_train", "--do_eval",
        "--train_file", path, "--validation_file", path, "--max_steps", "60", "--learning_rate", "1e-2",
        *COMMON, *(["--generative"] if mode == "generative" else []),
    ])
    assert result["mode"] == mode
    assert result["eval_f1"] > result["eval_f1_before"] + 40, result
    assert result["eval_exact_match"] >= 50, result
    saved = json.loads((tmp_path / mode / "all_results.json").read_text())
    assert saved["eval_f1"] == pytest.approx(result["eval_f1"])
    preds = json.loads((tmp_path / mode / "eval_predictions.json").read_text())
    assert len(preds) == 16


def test_pick_examples_spreads_groups_and_alternates_right_and_wrong():
    groups = [g for g in "abcdef" for _ in range(5)]  # 6 groups of 5 rows, in order
    assert pick_examples(groups, 3) == [5, 15, 25]  # the middle group of each third, not the first rows
    correct = [i % 3 == 0 for i in range(30)]
    picked = pick_examples(groups, 3, correct)
    assert [correct[i] for i in picked] == [True, False, True]
    assert len({groups[i] for i in picked}) == 3
    all_right = pick_examples(groups, 4, [True] * 30)  # no wrong answer to show: right ones, still one per group
    assert len(all_right) == 4 and len({groups[i] for i in all_right}) == 4
    assert pick_examples(["x", "x"], 3) == [0, 1]  # fewer rows than asked
    assert pick_examples(list("aab"), 3, [False] * 3) == [0, 2, 1]  # a group is reused only when the others ran out
    with pytest.raises(ValueError, match="2 correctness flags for 3 rows"):
        pick_examples(list("abc"), 2, [True, False])


def test_qa_examples_are_from_different_countries_and_labelled():
    validation = country_qa_dataset()["validation"]
    # A model that gets every capital right and everything else wrong.
    predictions = {r["id"]: r["answers"]["text"][0] if r["id"].endswith("/capital") else "Atlantis"
                   for r in validation}
    examples = qa.pick_qa_examples(predictions, validation, 3)
    assert [e["correct"] for e in examples] == [True, False, True]
    assert len({e["title"] for e in examples}) == 3
    assert validation[0]["title"] not in {e["title"] for e in examples}  # spread over the set
    for e in examples:
        assert e["correct"] == (e["prediction"] in e["gold"]) and e["gold"]
    assert qa.is_correct("", []) and not qa.is_correct("Paris", []) and qa.is_correct("the Paris.", ["Paris"])


@pytest.fixture(scope="module")
def causal_lm_folder(tmp_path_factory):
    """A saved tiny causal LM + a tokenizer trained on the country questions, as a pretraining stage leaves them."""
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    folder = tmp_path_factory.mktemp("lm")
    rows = country_qa_dataset()["train"].select(range(40))
    tokenizer = train_tokenizer(list(rows["question"]) + list(rows["context"]), vocab_size=400)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_generative_qa_generation_flags_reach_generate(tmp_path, causal_lm_folder, monkeypatch):
    from test_tasks_translation import spy_generate

    path = _squad_file(tmp_path / "qa.json", list(country_qa_dataset()["validation"].select(range(5))))
    calls = spy_generate(monkeypatch)
    result = qa.main([
        "--model_name_or_path", causal_lm_folder, "--generative", "--train_file", path, "--validation_file", path,
        "--output_dir", str(tmp_path / "gen"), "--do_train", "--max_steps", "1", "--do_eval",
        "--generation_num_beams", "2", "--generation_max_length", "6", "--no_repeat_ngram_size", "2",
        "--repetition_penalty", "1.3", *COMMON,
    ])
    assert len(calls) == 2  # before and after training
    for kwargs, _ in calls:
        config = kwargs["generation_config"]
        assert (config.num_beams, config.max_new_tokens, config.no_repeat_ngram_size, config.repetition_penalty) == (
            2, 6, 2, 1.3)
    assert result["generation"].startswith("beam search (2 beams), no_repeat_ngram_size=2")
    saved = json.loads((tmp_path / "gen" / "generation_config.json").read_text())
    assert (saved["num_beams"], saved["max_new_tokens"]) == (2, 6)
    # --num_beams (the recipe's own flag) wins over --generation_num_beams; the default length is max_answer_tokens
    qa.main(["--model_name_or_path", causal_lm_folder, "--generative", "--validation_file", path, "--output_dir",
             str(tmp_path / "beams"), "--do_eval", "--generation_num_beams", "3", "--num_beams", "1",
             "--max_answer_tokens", "4", *COMMON])
    config = calls[-1][0]["generation_config"]
    assert (config.num_beams, config.max_new_tokens) == (1, 4)
