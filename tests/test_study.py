"""The multilingual corpus and the MoE-vs-dense study protocol: six Bibles with the same whole chapters held out in
every language (deterministic), arms that read identical batches and start from identical shared weights, the
language-by-expert counts and their heatmap, and a smoke-size multilingual study."""

import matplotlib.image as mpimg
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, set_seed

import modeling_sparse_moe  # noqa: F401
from modeling_sparse_moe.configuration_sparse_moe import SparseMoEConfig
from modeling_sparse_moe.recipes import data, plotting, pretraining, study


@pytest.fixture(scope="module")
def corpus():
    return data.load_multilingual_bible("en,fr,de,es,it,pt", validation_fraction=0.15, max_chapters=40)


def test_multilingual_corpus_holds_out_the_same_chapters_in_every_language(corpus):
    languages = ["en", "fr", "de", "es", "it", "pt"]
    for split in ("train", "validation"):
        assert sorted({row["language"] for row in corpus[split]}) == sorted(languages)
    chapters = {split: {lang: {r["chapter"] for r in corpus[split] if r["language"] == lang} for lang in languages}
                for split in ("train", "validation")}
    held = chapters["validation"]["en"]
    assert 0 < len(held) < 40
    for lang in languages:
        assert chapters["validation"][lang] == held  # the same chapters held out in every language ...
        assert not chapters["train"][lang] & held  # ... and none of them trained on, in any language
        assert len(chapters["train"][lang]) + len(held) == 40
    assert held == {f"{b}:{c}" for b, c in ((1, c) for c in range(1, 41)) if data.held_out_chapter(b, c, 0.15)}
    # real text of each language, not empty rows: Genesis 1 opens differently in each version
    first = {r["language"]: r["text"] for r in corpus["train"] if r["chapter"] == "1:1"}
    assert first["en"].startswith("In the beginning God created the heavens and the earth.")
    assert first["fr"].startswith("Au commencement, Dieu créa les cieux et la terre.")
    assert len(set(first.values())) == 6 and all(len(text) > 2000 for text in first.values())
    assert not any("`" in r["text"] or "\xad" in r["text"] for r in corpus["train"])


def test_multilingual_corpus_is_deterministic(corpus):
    again = data.load_multilingual_bible("en,fr,de,es,it,pt", validation_fraction=0.15, max_chapters=40)
    assert again == corpus


def test_multilingual_corpus_rejects_bad_languages():
    with pytest.raises(ValueError, match="unknown or empty.*xx.*choose from"):
        data.parse_languages("en,xx")
    with pytest.raises(ValueError, match="twice"):
        data.parse_languages("en,en")
    with pytest.raises(ValueError, match="applies to --dataset_name bible-multilingual"):
        pretraining.load_raw_datasets(pretraining.DataTrainingArguments(languages="en,fr"))


def test_pretraining_reads_bible_multilingual_by_name(tmp_path):
    data_args = pretraining.DataTrainingArguments(dataset_name="bible-multilingual", languages="en,de",
                                                  validation_split_percentage=5)
    raw = pretraining.load_raw_datasets(data_args, pretraining.ModelArguments(cache_dir=str(tmp_path)))
    assert set(raw) == {"train", "validation"}
    for split in raw.values():
        assert sorted(set(split["language"])) == ["de", "en"]
    held = set(raw["validation"]["chapter"])
    assert not held & set(raw["train"]["chapter"])
    assert len(raw["train"]) + len(raw["validation"]) == 2 * 1189  # every chapter of both Bibles, once
    assert held == {f"{b}:{c}" for b, c in (map(int, key.split(":")) for key in held)
                    if data.held_out_chapter(b, c, 0.05)}


def _smoke_args(**overrides):
    return study.StudyArguments(**{"smoke": True, "dataset_name": "bible-multilingual", "arms": "main", **overrides})


def test_arms_share_initialisation_of_every_shared_part():
    args = _smoke_args()
    configs, _, options = study._study_configs(args)
    names = list(configs)
    set_seed(0)
    reference = AutoModelForCausalLM.from_config(configs[names[0]])
    runs = {name: study._StudyRun(name, configs[name], args, 0, options[name], shared_from=reference)
            for name in names}
    dense, moe = dict(runs[names[0]].model.named_parameters()), dict(runs[names[1]].model.named_parameters())
    shared = study.shared_parameter_names(runs[names[0]].model)
    assert "model.embed_tokens.weight" in shared and "lm_head.weight" in shared
    assert "model.layers.1.self_attn.q_proj.weight" in shared and not any(".mlp." in n for n in shared)
    assert runs[names[1]].shared == shared  # every shared parameter of the MoE arm was copied
    for name in shared:
        assert torch.equal(dense[name], moe[name]), name
    # without the copy, the MoE's expert initialisation shifts the seeded stream and later layers start elsewhere
    set_seed(0)
    plain = dict(study._StudyRun(names[1], configs[names[1]], args, 0, options[names[1]]).model.named_parameters())
    assert not torch.equal(plain["model.layers.1.self_attn.q_proj.weight"],
                           dense["model.layers.1.self_attn.q_proj.weight"])


def test_batch_order_is_shared_and_seeded():
    first = study.study_batch_order(num_blocks=10, steps=7, batch_size=3, seed=0)
    assert first.shape == (21,)
    assert sorted(first[:10].tolist()) == list(range(10))  # one pass is a permutation of the blocks
    assert torch.equal(first, study.study_batch_order(10, 7, 3, seed=0))
    assert not torch.equal(first, study.study_batch_order(10, 7, 3, seed=1))


def test_language_counts_and_shares_on_a_tiny_model():
    set_seed(0)
    config = SparseMoEConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # a router with real preferences
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 1.0)
    blocks = torch.randint(0, 64, (5, 8), generator=torch.Generator().manual_seed(0))
    languages = ["en", "fr", "en", "de", "fr"]
    counts = study.language_expert_counts(model, blocks, languages, ["en", "fr", "de"], max_blocks_per_language=1)
    assert len(counts) == 2 and len(counts[0]) == 4 and len(counts[0][0]) == 3
    for layer in counts:  # one block of 8 tokens per language (max_blocks_per_language=1), two choices per token
        assert [sum(expert[j] for expert in layer) for j in range(3)] == [16, 16, 16]
    shares = study.language_shares([[[2, 0], [1, 1]], [[0, 0], [3, 1]]])
    # expert 1 of layer 0: rates 1/3 of en and 1/1 of fr, normalised to 1/4 and 3/4
    assert shares == [[[1.0, 0.0], [0.25, 0.75]], [[0.0, 0.0], [0.5, 0.5]]]
    assert study.language_specialisation([[[1.0, 0.0], [0.25, 0.75]]]) == 0.875


def test_language_heatmap_png(tmp_path):
    shares = [[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], [[1 / 3, 1 / 3, 1 / 3], [0.2, 0.6, 0.2]]]
    path = plotting.plot_language_experts(shares, ["en", "fr", "de"], tmp_path / "lang.png")
    pixels = mpimg.imread(path)[..., :3]
    assert pixels.std() > 0.05
    with pytest.raises(ValueError, match="do not match 2 languages"):
        plotting.plot_language_experts(shares, ["en", "fr"], tmp_path / "bad.png")


def test_lr_sweep_names_each_arm_and_rate():
    args = _smoke_args(lr_sweep="1e-3,4e-3")
    configs, variants, options = study._study_configs(args)
    assert list(configs)[:2] == ["dense-active@lr=0.001", "dense-active@lr=0.004"]
    assert options["moe-8x32-top2@lr=0.004"]["learning_rate"] == 4e-3
    run = study._StudyRun("x", configs["moe-8x32-top2@lr=0.004"], args, 0, options["moe-8x32-top2@lr=0.004"])
    assert {group["initial_lr"] for group in run.optimizer.param_groups} == {4e-3}  # the schedule's peak
    with pytest.raises(ValueError, match="--lr_sweep"):
        study._study_configs(_smoke_args(lr_sweep="fast"))
    with pytest.raises(ValueError, match="--arms 'nope'"):
        study._study_configs(_smoke_args(arms="nope"))


@pytest.mark.slow
def test_multilingual_study_smoke(tmp_path):
    """Three arms on six languages at smoke size: identical batches, the final figure the mean of the last three
    whole-split evaluations, paired differences, falling losses, and the pictures."""
    result = study.run_dense_comparison(_smoke_args(output_dir=str(tmp_path), seeds="0,1", threads=1,
                                                    save_models=True))
    assert result["corpus"]["languages"] == ["en", "fr", "de", "es", "it", "pt"]
    for seed in result["seeds"]:
        models = seed["models"]
        assert len({m["data_digest"] for m in models.values()}) == 1  # every arm read the same batches
        for name, m in models.items():
            assert [step for step, _ in m["final_evals"]] == [10, 15, 20]
            assert m["final_eval_loss"] == pytest.approx(sum(v for _, v in m["final_evals"]) / 3, rel=1e-12)
            assert m["eval_loss"][-1][1] < m["eval_loss"][0][1]  # learning
        assert set(models["moe-8x32-top2"]) >= {"language_counts"}
    digests = [s["models"]["dense-active"]["data_digest"] for s in result["seeds"]]
    assert digests[0] != digests[1]  # seeds differ in data order
    paired = [s["models"]["dense-total"]["final_eval_loss"] - s["models"]["dense-active"]["final_eval_loss"]
              for s in result["seeds"]]
    mean, std = study.mean_std(paired)
    assert "| dense-total | " in result["table"] and f"{mean:.3f} ± {std:.3f}" in result["table"]
    assert set(result["plots"]) == {"loss_curves", "language_experts"}
    assert (tmp_path / "language_experts.png").stat().st_size > 10_000
    # --save_models: every arm's final model with the study's tokenizer, ready for the fine-tuning recipes
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(result["seeds"][1]["models"]["moe-8x32-top2"]["model_dir"])
    assert folder == tmp_path / "models" / "seed1" / "moe-8x32-top2"
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = AutoTokenizer.from_pretrained(folder)("In the beginning", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = reloaded(ids).logits
    assert logits.shape[-1] == reloaded.config.vocab_size and reloaded.config.num_experts == 8
