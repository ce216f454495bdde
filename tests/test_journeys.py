"""Journeys a user takes end to end, at smoke size, through the same library calls as the commands:

1. the quickstart's default pretraining (smoke) -> translation fine-tuning (full, and LoRA) ->
   `scripts/export.py --gguf` -> the native-family folder gives our logits, and the GGUF read back with `gguf` holds our tensors (and, in f32,
   runs to our logits in the numpy reference of llama.cpp's graph from tests/test_export.py); the same for the
   other recipes' outputs from that model: generative QA, SFT (full and a LoRA adapter, merged on the way), and a
   QLoRA adapter of the translation recipe (`--load_in_4bit --lora_target attention,experts`) merged into the
   full-precision base;
4. a Mixtral checkpoint (a tiny `MixtralForCausalLM` saved locally) -> convert -> fine-tune with the translation
   recipe's defaults -> export back to Mixtral -> the same logits.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_fp32_close

import gguf
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM

from modeling_sparse_moe import quickstart
from modeling_sparse_moe.interop.conversion import convert_folder
from modeling_sparse_moe.recipes.data import load_text_corpus, train_tokenizer
from modeling_sparse_moe.tasks import translation

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import export as export_cli  # noqa: E402  (scripts/export.py)
from test_export import llama_cpp_reference_logits  # noqa: E402

TEXT = "In the beginning God created the heavens and the earth."


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def smoke_pretrained(tmp_path_factory):
    """The quickstart's tokenizer and pretraining stages at smoke size, with its default router settings."""
    folder = tmp_path_factory.mktemp("quickstart")
    state = quickstart.State(folder, "smoke", restart=False)
    size = quickstart.SIZES["smoke"]
    torch.manual_seed(0)
    for stage in ("tokenizer", "pretrain"):
        state.finish(stage, getattr(quickstart, f"stage_{stage}")(folder, size, state), 0.0)
    return state


def _fine_tune(smoke_pretrained, folder: Path, lora: bool) -> dict:
    state = quickstart.State(folder, "smoke", restart=False)
    state.finish("pretrain", smoke_pretrained.result("pretrain"), 0.0)
    return quickstart.stage_translation(folder, quickstart.SIZES["smoke"], state, lora=lora)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_quickstart_default_model_fine_tuned_exports_with_gguf(smoke_pretrained, tmp_path, lora, capsys):
    pretrain_dir = Path(smoke_pretrained.result("pretrain")["model_dir"])
    config = json.loads((pretrain_dir / "config.json").read_text())
    assert (config["router_type"], config["router_bias_update_rate"]) == ("sigmoid", 0.01)  # the recipes' default
    result = _fine_tune(smoke_pretrained, tmp_path / "run", lora)
    model_dir = Path(result["model_dir"])  # full weights; for LoRA the adapter merged into its base
    ours = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    biases = [m.e_score_correction_bias for m in ours.modules() if hasattr(m, "e_score_correction_bias")]
    assert biases and all(float(b.abs().max()) > 0 for b in biases)  # training moved every router's selection bias

    # LoRA: the merged folder the quickstart writes. The bias is part of the frozen base, so the adapter's training
    # left it alone (RouterBiasUpdateCallback skips PEFT models): adapter + base routes exactly as the trained model.
    src = model_dir
    argv = [str(src), str(tmp_path / "serve"), "--gguf", "f32"]
    if lora:
        assert model_dir.name == "merged" and (model_dir.parent / "adapter_config.json").is_file()
        base = AutoModelForCausalLM.from_pretrained(pretrain_dir)
        assert torch.equal(base.model.layers[0].mlp.gate.e_score_correction_bias, biases[0])
    capsys.readouterr()
    assert export_cli.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "(glm4_moe)" in out
    if not lora:  # the recipe decoded with no_repeat_ngram_size=3 and saved it with the model; the export leaves it out
        assert "leaves out no_repeat_ngram_size=3" in out

    serve = tmp_path / "serve"
    native = AutoModelForCausalLM.from_pretrained(serve)  # transformers' own Glm4MoeForCausalLM, no remote code
    assert type(native).__name__ == "Glm4MoeForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(serve)
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    assert_fp32_close(_logits(native, ids), _logits(ours, ids))
    generation = json.loads((serve / "generation_config.json").read_text())
    assert "no_repeat_ngram_size" not in generation

    reader = gguf.GGUFReader(serve / "model-f32.gguf")
    assert reader.get_field("general.architecture").contents() == "glm4moe"
    tensors = {t.name: t for t in reader.tensors}
    np.testing.assert_array_equal(tensors["blk.1.exp_probs_b.bias"].data,
                                  ours.model.layers[1].mlp.gate.e_score_correction_bias.numpy())
    # fp32 tolerance: numpy's matmuls sum in another order than torch's
    np.testing.assert_allclose(llama_cpp_reference_logits(reader, ids[0].numpy()), _logits(ours, ids)[0].numpy(),
                               rtol=1e-4, atol=1e-4)


def test_mixtral_checkpoint_converts_trains_with_recipe_defaults_and_exports_back(tmp_path, capsys):
    tokenizer = train_tokenizer(load_text_corpus(max_chars=6000), vocab_size=300)
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=320, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    mixtral = MixtralForCausalLM(config).eval()
    mixtral.save_pretrained(tmp_path / "mixtral")
    tokenizer.save_pretrained(tmp_path / "mixtral")
    convert_folder(tmp_path / "mixtral", tmp_path / "sparse")

    translation.main([  # the recipe's defaults, but for a short run on the offline country-name pairs
        "--model_name_or_path", str(tmp_path / "sparse"), "--offline_corpus", "country_names",
        "--output_dir", str(tmp_path / "trained"), "--do_train", "--max_train_samples", "32", "--max_steps", "4",
        "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--report_to", "none",
        "--save_strategy", "no", "--disable_tqdm", "true",
    ])
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "trained").eval()
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    assert (_logits(trained, ids) - _logits(mixtral, ids)).abs().max() > 1e-3  # it did train

    capsys.readouterr()
    assert export_cli.main([str(tmp_path / "trained"), str(tmp_path / "serve"), "--gguf"]) == 0
    assert "(mixtral)" in capsys.readouterr().out  # picked automatically: no selection bias, softmax router
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "serve")
    assert type(native) is MixtralForCausalLM
    assert_fp32_close(_logits(native, ids), _logits(trained, ids))
    reader = gguf.GGUFReader(tmp_path / "serve" / "model-f16.gguf")
    assert reader.get_field("general.architecture").contents() == "llama"
    tensors = {t.name: t for t in reader.tensors}
    np.testing.assert_array_equal(tensors["blk.0.ffn_gate_inp.weight"].data,
                                  trained.model.layers[0].mlp.gate.weight.detach().numpy())


def _export_and_compare(src: Path, out: Path, reference, capsys) -> None:
    """`scripts/export.py SRC OUT --gguf f32` picks glm4_moe for the recipes' default router; transformers' own
    Glm4MoeForCausalLM and the GGUF (numpy reference of llama.cpp's graph) give `reference`'s logits."""
    capsys.readouterr()
    assert export_cli.main([str(src), str(out), "--gguf", "f32"]) == 0, capsys.readouterr().err
    assert "(glm4_moe)" in capsys.readouterr().out
    native = AutoModelForCausalLM.from_pretrained(out)
    assert type(native).__name__ == "Glm4MoeForCausalLM"
    ids = AutoTokenizer.from_pretrained(out)(TEXT, return_tensors="pt")["input_ids"]
    expected = _logits(reference, ids)
    assert_fp32_close(_logits(native, ids), expected)
    reader = gguf.GGUFReader(out / "model-f32.gguf")
    # fp32 tolerance: numpy's matmuls sum in another order than torch's
    np.testing.assert_allclose(llama_cpp_reference_logits(reader, ids[0].numpy()), expected[0].numpy(),
                               rtol=1e-4, atol=1e-4)


def test_generative_qa_from_the_default_model_exports(smoke_pretrained, tmp_path, capsys):
    from modeling_sparse_moe.tasks import qa

    pretrain_dir = smoke_pretrained.result("pretrain")["model_dir"]
    qa.main([  # the recipe's defaults (offline country QA), generative, for a short run
        "--model_name_or_path", pretrain_dir, "--generative", "--output_dir", str(tmp_path / "qa"), "--do_train",
        "--max_train_samples", "16", "--max_steps", "2", "--per_device_train_batch_size", "8", "--learning_rate",
        "1e-2", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--max_seq_length", "128",
    ])
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "qa").eval()
    _export_and_compare(tmp_path / "qa", tmp_path / "serve", trained, capsys)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_from_the_default_model_exports(smoke_pretrained, tmp_path, lora, capsys):
    from modeling_sparse_moe.tasks import sft

    pretrain_dir = smoke_pretrained.result("pretrain")["model_dir"]
    sft.main([  # TRL's SFTTrainer on the offline country chats, the recipe's defaults, a short run
        "--model_name_or_path", pretrain_dir, "--output_dir", str(tmp_path / "sft"), "--do_train",
        "--max_train_samples", "16", "--max_steps", "2", "--per_device_train_batch_size", "8", "--learning_rate",
        "1e-2", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--max_length", "128",
        *(["--lora_r", "4"] if lora else []),
    ])
    if lora:  # the adapter folder: export merges it into the base that adapter_config.json names
        from peft import PeftModel

        assert (tmp_path / "sft" / "adapter_config.json").is_file()
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pretrain_dir),
                                              tmp_path / "sft").eval()
    else:
        reference = AutoModelForCausalLM.from_pretrained(tmp_path / "sft").eval()
    _export_and_compare(tmp_path / "sft", tmp_path / "serve", reference, capsys)


def test_qlora_adapter_from_the_translation_recipe_merges_into_full_precision_and_exports(tmp_path, capsys):
    """`--load_in_4bit --lora_target attention,experts` trains on the 4-bit base; the adapter, merged into the
    full-precision base on the way out, exports to glm4_moe with the adapter model's logits."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel

    from conftest import tiny_config
    from modeling_sparse_moe import SparseMoEForCausalLM
    from modeling_sparse_moe.recipes.pretraining import BALANCED_ROUTER

    tokenizer = train_tokenizer(load_text_corpus(max_chars=6000), vocab_size=300)
    torch.manual_seed(0)
    # widths divisible by bitsandbytes' block size; the recipes' default router, its selection bias moved as training
    # moves it
    config = tiny_config(hidden_size=64, moe_intermediate_size=32, vocab_size=320, initializer_range=0.02,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **BALANCED_ROUTER)
    base = SparseMoEForCausalLM(config)
    for layer in base.model.layers:
        layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    translation.main([
        "--model_name_or_path", str(tmp_path / "base"), "--offline_corpus", "country_names", "--output_dir",
        str(tmp_path / "qlora"), "--do_train", "--max_train_samples", "32", "--max_steps", "3",
        "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--report_to", "none",
        "--save_strategy", "no", "--disable_tqdm", "true", "--load_in_4bit", "--lora_r", "4",
        "--lora_target", "attention,experts",
    ])
    adapter = tmp_path / "qlora"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["target_parameters"]  # the experts' LoRA, trained on packed 4-bit experts
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), adapter).eval()
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with reference.disable_adapter():
        untouched = _logits(reference, ids)
    assert (_logits(reference, ids) - untouched).abs().max() > 1e-4  # the adapter changes the model
    _export_and_compare(adapter, tmp_path / "serve", reference, capsys)
