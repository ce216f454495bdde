"""Translation recipe: run_translation's data format, errors that name the file, learning at smoke size, LoRA
adapters (merge equality, reload with identical outputs)."""

import json

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM

from modeling_sparse_moe.recipes.data import train_tokenizer
from modeling_sparse_moe.tasks import translation
from modeling_sparse_moe.tasks.common import DataFileError
from modeling_sparse_moe.tasks.data import bible_translation_dataset, country_name_pairs

from conftest import tiny_config

COMMON = ["--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", "--per_device_train_batch_size",
          "16", "--val_max_target_length", "16", "--tokenizer_vocab_size", "300", "--logging_steps", "10"]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_bible_corpus_is_aligned_and_split_by_chapter():
    data = bible_translation_dataset("en", "fr")
    assert len(data["train"]) > 15000 and len(data["validation"]) > 200 and len(data["test"]) > 200
    chapters = {s: {r["id"].rsplit(":", 1)[0] for r in data[s]} for s in data}
    assert not chapters["train"] & chapters["test"] and not chapters["train"] & chapters["validation"]
    john_3_16 = [r for r in bible_translation_dataset("en", "fr", max_chars=None)["train"] if r["id"] == "43:3:16"]
    if john_3_16:  # the verse lands in train by its chapter's hash; its alignment is what is checked
        assert "Dieu a tant aimé le monde" in john_3_16[0]["translation"]["fr"]
    de = bible_translation_dataset("en", "de", max_chars=80)
    assert all(set(r["translation"]) == {"en", "de"} for r in de["test"])


@pytest.mark.slow
def test_smoke_finetune_beats_untuned_model(tmp_path):
    """From scratch on 16 country-name pairs: chrF on those pairs after 40 steps beats the untrained model's."""
    result = translation.main([
        "--config_name", "configs/tiny", "--offline_corpus", "country_names", "--output_dir", str(tmp_path / "mt"),
        "--do_train", "--do_eval", "--do_predict", "--predict_with_generate", "--max_train_samples", "16",
        "--max_eval_samples", "16", "--max_predict_samples", "4", "--max_steps", "40", "--learning_rate", "1e-2",
        *COMMON,
    ])
    assert result["eval_chrf"] > result["eval_chrf_before"] + 30, result
    assert result["eval_chrf"] > 60
    saved = json.loads((tmp_path / "mt" / "all_results.json").read_text())
    assert saved["eval_chrf"] == pytest.approx(result["eval_chrf"])
    lines = (tmp_path / "mt" / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4
    assert (tmp_path / "mt" / "tokenizer.json").exists()  # tokenizer trained from scratch is saved with the model
    # Nothing saved is overwritten silently.
    with pytest.raises(ValueError, match="already exists and is not empty"):
        translation.main(["--config_name", "configs/tiny", "--offline_corpus", "country_names", "--output_dir",
                          str(tmp_path / "mt"), "--do_train", "--max_steps", "1", *COMMON])


@pytest.fixture(scope="module")
def pretrained_folder(tmp_path_factory):
    """A saved tiny model + tokenizer, as a pretraining stage would leave it."""
    folder = tmp_path_factory.mktemp("base")
    pairs = country_name_pairs("en", "fr")
    tokenizer = train_tokenizer([t for r in pairs["translation"] for t in r.values()], vocab_size=300)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(vocab_size=len(tokenizer)))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_lora_on_pretrained_folder_with_jsonl_files(tmp_path, pretrained_folder):
    rows = [{"translation": r} for r in country_name_pairs("en", "fr")["translation"][:16]]
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    result = translation.main([
        "--model_name_or_path", pretrained_folder, "--train_file", train, "--validation_file", train,
        "--source_lang", "en", "--target_lang", "fr", "--output_dir", str(tmp_path / "lora"), "--do_train",
        "--do_eval", "--predict_with_generate", "--max_steps", "30", "--learning_rate", "3e-2", "--lora_r", "8",
        "--lora_target", "attention,router,experts", *COMMON,
    ])
    assert result["eval_chrf"] > result["eval_chrf_before"] + 10, result
    adapter = result["adapter"]
    assert 0 < adapter["trainable_parameters"] < adapter["base_parameters"]
    assert adapter["adapter_bytes"] < adapter["base_model_bytes_fp32"]
    trained = result["model"].eval()
    names = [n for n, p in trained.named_parameters() if p.requires_grad]
    assert any("experts" in n for n in names) and any("mlp.gate" in n for n in names) and any("q_proj" in n for n in names)

    ids = torch.tensor([[1, 40, 50, 60, 70, 80]])
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(pretrained_folder).eval()
        base_logits = base(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(base, str(tmp_path / "lora")).eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=1e-6)
        assert (expected - base_logits).abs().max() > 1e-2  # the adapter changes the model
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_unknown_language_code_names_the_file(tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", [{"translation": {"en": "Hello", "fr": "Bonjour"}}])
    with pytest.raises(DataFileError, match=r"train\.jsonl.*no 'de' text.*\['en', 'fr'\]"):
        translation.main(["--config_name", "configs/tiny", "--train_file", train, "--target_lang", "de",
                          "--output_dir", str(tmp_path / "o"), "--do_train", *COMMON])


def test_missing_column_names_the_file(tmp_path):
    train = _write_jsonl(tmp_path / "bad.jsonl", [{"en": "Hello", "fr": "Bonjour"}])
    with pytest.raises(DataFileError, match=r"bad\.jsonl: missing column\(s\) \['translation'\]"):
        translation.main(["--config_name", "configs/tiny", "--train_file", train, "--output_dir",
                          str(tmp_path / "o"), "--do_train", *COMMON])


def spy_generate(monkeypatch) -> list[tuple[dict, torch.Tensor]]:
    """Record the keyword arguments and output of every `SparseMoEForCausalLM.generate` call (which still runs)."""
    from modeling_sparse_moe.modeling_sparse_moe import SparseMoEForCausalLM

    calls, original = [], SparseMoEForCausalLM.generate

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append((kwargs, out[:, kwargs["input_ids"].shape[1]:]))
        return out

    monkeypatch.setattr(SparseMoEForCausalLM, "generate", spy)
    return calls


def _repeats(new_tokens: torch.Tensor, eos: int) -> int:
    """How many rows of generated tokens repeat a token before their first EOS."""
    rows = [row[: row.index(eos)] if eos in row else row for row in new_tokens.tolist()]
    return sum(len(set(row)) < len(row) for row in rows)


FLAGS = ["--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", "--per_device_train_batch_size", "4"]


def test_generation_flags_reach_generate_and_the_saved_model(tmp_path, pretrained_folder, monkeypatch):
    rows = [{"translation": r} for r in country_name_pairs("en", "fr")["translation"][:6]]
    data = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    run = ["--model_name_or_path", pretrained_folder, "--train_file", data, "--validation_file", data,
           "--do_eval", "--predict_with_generate", *FLAGS]
    calls = spy_generate(monkeypatch)
    greedy = translation.main([*run, "--output_dir", str(tmp_path / "greedy"), "--generation_max_length", "12"])
    assert greedy["generation"] == "greedy, max_new_tokens=12"
    assert _repeats(calls[-1][1], 2) > 0  # the untrained model loops: the control for the check below

    calls.clear()
    result = translation.main([
        *run, "--output_dir", str(tmp_path / "set"), "--do_train", "--max_steps", "1", "--generation_num_beams", "3",
        "--generation_max_length", "12", "--no_repeat_ngram_size", "1", "--repetition_penalty", "1.5",
    ])
    assert len(calls) == 2  # before and after training, 6 prompts in one batch each
    for kwargs, new_tokens in calls:
        config = kwargs["generation_config"]
        assert (config.num_beams, config.max_new_tokens, config.no_repeat_ngram_size, config.repetition_penalty) == (
            3, 12, 1, 1.5)
        assert _repeats(new_tokens, 2) == 0  # no 1-gram occurs twice: the setting took effect
    assert result["generation"] == "beam search (3 beams), no_repeat_ngram_size=1, repetition_penalty=1.5, " \
                                   "max_new_tokens=12"
    saved = json.loads((tmp_path / "set" / "generation_config.json").read_text())
    assert (saved["num_beams"], saved["no_repeat_ngram_size"], saved["repetition_penalty"]) == (3, 1, 1.5)


def test_recipe_flags_beat_the_generation_config_file(tmp_path, pretrained_folder, monkeypatch):
    """run_translation's precedence: --num_beams / --val_max_target_length over --generation_num_beams /
    --generation_max_length; flags over the --generation_config file; the file over the model's config."""
    from transformers import GenerationConfig

    GenerationConfig(num_beams=4, no_repeat_ngram_size=2, repetition_penalty=1.2, max_new_tokens=9).save_pretrained(
        tmp_path / "gen")
    data = _write_jsonl(tmp_path / "pairs.jsonl", [{"translation": r} for r in country_name_pairs()["translation"][:3]])
    run = ["--model_name_or_path", pretrained_folder, "--validation_file", data, "--do_eval", "--predict_with_generate",
           *FLAGS]
    calls = spy_generate(monkeypatch)
    translation.main([*run, "--output_dir", str(tmp_path / "a"), "--generation_config",
                      str(tmp_path / "gen" / "generation_config.json"), "--generation_num_beams", "3", "--num_beams",
                      "2", "--repetition_penalty", "1.1"])
    config = calls[-1][0]["generation_config"]
    assert (config.num_beams, config.no_repeat_ngram_size, config.repetition_penalty, config.max_new_tokens) == (
        2, 2, 1.1, 9)
    translation.main([*run, "--output_dir", str(tmp_path / "b"), "--generation_config", str(tmp_path / "gen"),
                      "--generation_max_length", "7", "--val_max_target_length", "5"])
    config = calls[-1][0]["generation_config"]
    assert (config.num_beams, config.max_new_tokens) == (4, 5)
    with pytest.raises(ValueError, match=r"--generation_config .*missing\.json: no such file"):
        translation.main([*run, "--output_dir", str(tmp_path / "c"), "--generation_config",
                          str(tmp_path / "missing.json")])


def test_examples_come_from_different_chapters_across_the_set():
    validation = bible_translation_dataset("en", "fr")["validation"].select(range(100))
    picked = translation.pick_translation_examples(validation, 3)
    chapters = [validation[i]["id"].rsplit(":", 1)[0] for i in picked]
    assert len(set(chapters)) == 3
    first_chapter = validation[0]["id"].rsplit(":", 1)[0]
    assert first_chapter not in chapters  # not the first rows: spread over the set
    assert picked == sorted(picked) and picked[-1] >= 50
    # Rows without a verse id: one per stretch of the set.
    no_ids = Dataset.from_list([{"translation": {"en": str(i), "fr": str(i)}} for i in range(9)])
    assert translation.pick_translation_examples(no_ids, 3) == [1, 4, 7]
