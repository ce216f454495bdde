"""4-bit journeys end to end, at smoke sizes, through the standard doors only (no helper from this package between
the user and transformers / PEFT):

  QLoRA: save -> 4-bit load -> get_peft_model (attention + experts) -> Trainer with two checkpoints ->
         PeftModel.from_pretrained on a fresh 4-bit base -> merged into the full-precision base -> export_for_serving;
  Hub:   save_for_hub -> a fresh process that cannot import this package, trust_remote_code -> 4-bit load -> generate.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import assert_fp32_close, tiny_config
from modeling_sparse_moe import SparseMoEForCausalLM


bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

PROMPT = "In the beginning"


def bnb_config():
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)


def small_config(vocab_size=97, **overrides):
    # widths divisible by bitsandbytes' block size (64), as in test_quantization.py
    return tiny_config(vocab_size=vocab_size, hidden_size=128, moe_intermediate_size=64, intermediate_size=128,
                       initializer_range=0.02, **overrides)


@pytest.fixture(scope="module")
def tokenizer():
    from modeling_sparse_moe.recipes.data import load_text_corpus, train_tokenizer

    return train_tokenizer(load_text_corpus(max_chars=5_000), vocab_size=300)


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def test_qlora_journey_train_checkpoint_reload_merge_export(tmp_path, tokenizer):
    from modeling_sparse_moe.interop.export import export_for_serving

    # NOTE: router_bias_update_rate=0: a model trained with router bias updates may not export yet (being fixed in
    # export.py); this journey is about the 4-bit doors, not the bias.
    torch.manual_seed(0)
    SparseMoEForCausalLM(small_config(len(tokenizer), router_bias_update_rate=0.0)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb_config())
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
    ))
    rows = torch.stack([(torch.arange(16) + i) % 50 + 3 for i in range(8)])  # counting: each token is the last + 1
    dataset = [{"input_ids": r, "labels": r, "attention_mask": torch.ones_like(r)} for r in rows]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=8, save_steps=4, per_device_train_batch_size=4,
        learning_rate=2e-2, lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True, save_strategy="steps", seed=0,
    )
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator).train()
    checkpoints = sorted((tmp_path / "run").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in checkpoints] == ["checkpoint-4", "checkpoint-8"]
    losses = [e["loss"] for e in json.loads((checkpoints[1] / "trainer_state.json").read_text())["log_history"]
              if "loss" in e]
    assert len(losses) == 8 and sum(losses[-2:]) < 0.9 * sum(losses[:2])
    expert_keys = [k for k in peft.get_peft_model_state_dict(model) if ".experts." in k]
    assert len(expert_keys) == 2 * 2 * 2  # 2 layers x 2 expert parameters x (A, B)

    model.eval()
    trained = _logits(model, rows[:2])
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb_config())
    reloaded = peft.PeftModel.from_pretrained(fresh, checkpoints[-1])
    # NOTE: the same packed weights (deterministic packing of the same checkpoint) and adapter values, same process
    torch.testing.assert_close(_logits(reloaded, rows[:2]), trained, rtol=0, atol=0)

    # Merged into the full-precision base it was quantized from: the adapter carries over.
    full = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), checkpoints[-1])
    unmerged = _logits(full, rows[:2])
    merged = full.merge_and_unload()
    assert_fp32_close(_logits(merged, rows[:2]), unmerged)
    merged.save_pretrained(tmp_path / "merged")
    tokenizer.save_pretrained(tmp_path / "merged")

    exported = export_for_serving(tmp_path / "merged", tmp_path / "served")
    served = AutoModelForCausalLM.from_pretrained(exported.folder)
    assert type(served).__module__.startswith("transformers.models.")  # a native family, no remote code
    assert_fp32_close(_logits(served, rows[:2]), _logits(merged, rows[:2]))


# Runs with `python -I -S` (no site processing: no editable-install finder, no cwd, no PYTHONPATH): the parent's path
# minus every entry that resolves modeling_sparse_moe; a package inside site-packages is refused by a meta-path finder.
FRESH = textwrap.dedent(
    """
    import json, sys
    from importlib.machinery import PathFinder

    spec = json.load(open(sys.argv[1]))

    class RefusePackage:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.split(".")[0] == "modeling_sparse_moe":
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)

    for entry in spec["path"]:
        if PathFinder.find_spec("modeling_sparse_moe", [entry]) is None or entry in spec["site_dirs"]:
            sys.path.append(entry)
    sys.meta_path.insert(0, RefusePackage)
    import torch
    import transformers

    torch.set_num_threads(spec["threads"])
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["folder"], trust_remote_code=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        spec["folder"], trust_remote_code=True, quantization_config=config).eval()
    prompt = tokenizer([spec["prompt"]], return_tensors="pt")
    with torch.no_grad():
        logits = model(**prompt).logits
        generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    json.dump({
        "class_module": type(model).__module__,
        "packed_experts": sum(getattr(m, "quant_spec", None) is not None for m in model.modules()),
        "expert_quantization": model.config.expert_quantization,
        "logits": logits.tolist(),
        "generated": generated.tolist(),
        "package_modules": sorted(m for m in sys.modules if m.split(".")[0] == "modeling_sparse_moe"),
    }, open(spec["out"], "w"))
    """
)


def test_hub_journey_fresh_process_loads_in_4bit_and_generates(tmp_path, tokenizer):
    import site

    from transformers.utils import HF_MODULES_CACHE

    from modeling_sparse_moe.interop.hub import save_for_hub

    torch.manual_seed(0)
    folder = save_for_hub(SparseMoEForCausalLM(small_config(len(tokenizer))), tmp_path / "hub", tokenizer)
    # the same door in this process (through the installed package) is the reference
    local = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config()).eval()
    prompt = tokenizer([PROMPT], return_tensors="pt")
    with torch.no_grad():
        reference_logits = local(**prompt).logits
        reference_generated = local.generate(**prompt, max_new_tokens=6, do_sample=False)

    modules_cache = Path(HF_MODULES_CACHE).resolve()
    spec = {
        "path": [str(Path(p or os.getcwd()).resolve()) for p in sys.path if Path(p or ".").resolve() != modules_cache],
        "site_dirs": site.getsitepackages(), "threads": torch.get_num_threads(),
        "folder": str(folder), "prompt": PROMPT, "out": str(tmp_path / "result.json"),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "fresh.py").write_text(FRESH)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(
        [sys.executable, "-I", "-S", str(tmp_path / "fresh.py"), str(tmp_path / "spec.json")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["package_modules"] == [] and result["class_module"].startswith("transformers_modules.")
    assert result["packed_experts"] == 2 and result["expert_quantization"]["quant_type"] == "nf4"
    # NOTE: the fresh process reads the weights memory-mapped at other offsets: equal up to fp32 rounding (conftest)
    assert_fp32_close(torch.tensor(result["logits"]), reference_logits)
    assert result["generated"] == reference_generated.tolist()
    assert len(result["generated"][0]) == prompt["input_ids"].shape[1] + 6
