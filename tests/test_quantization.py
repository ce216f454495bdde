"""4-bit experts (quantization.py): the standard loading door, the CPU state_dict trap, the expert path against the
dequantize-then-reference model, QLoRA on the experts, save/reload and Hub folders, bad input."""

import copy
import json
import os

import pytest
import torch

from conftest import assert_fp32_close, tiny_config
from modeling_sparse_moe import SparseMoEForCausalLM
from modeling_sparse_moe.quantization import (
    dequantize_experts,
    dequantize_model,
    disable_cpu_weight_repacking,
    expert_bytes,
    is_quantized_experts,
    quantize_experts,
    quantize_model,
    with_quantized_experts,
)


bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments  # noqa: E402


def small_config(**overrides):
    # widths divisible by bitsandbytes' block size (64); hidden 128 gives 2 blocks per row, which the CPU trap needs
    kwargs = dict(hidden_size=128, moe_intermediate_size=64, intermediate_size=128, initializer_range=0.02)
    kwargs.update(overrides)
    return tiny_config(**kwargs)


def bnb_config(**overrides):
    kwargs = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    kwargs.update(overrides)
    return BitsAndBytesConfig(**kwargs)


@pytest.fixture(scope="module")
def fp_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = SparseMoEForCausalLM(small_config())
    folder = tmp_path_factory.mktemp("fp")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def fp_model(fp_folder):
    return AutoModelForCausalLM.from_pretrained(fp_folder).eval()


def ids(batch=2, seq=12, seed=0):
    return torch.randint(3, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, input_ids=None):
    with torch.no_grad():
        return model(input_ids if input_ids is not None else ids()).logits


def experts_modules(model):
    return [m for n, m in model.named_modules() if n.endswith("mlp.experts") and hasattr(m, "num_experts")]


# ---------------------------------------------------------------------------------------------------- the CPU trap
def test_bitsandbytes_repacking_switch_is_off(fp_folder):
    """The switch bitsandbytes reads on every forward is off on every Linear4bit of our 4-bit models, whatever this
    CPU has: the lossy repack (disable_cpu_weight_repacking) can never run, so nothing is left for a save to undo."""
    model = AutoModelForCausalLM.from_pretrained(fp_folder, quantization_config=bnb_config())
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) >= 8 and all(m.support_avx512bf16_for_cpu is False for m in linears)
    logits(model)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in linears)


@pytest.mark.parametrize("double_quant", [False, True])
def test_logits_unchanged_by_state_dict_save_and_trainer_checkpoint(fp_folder, tmp_path, double_quant):
    quantization_config = bnb_config(bnb_4bit_use_double_quant=double_quant)
    model = AutoModelForCausalLM.from_pretrained(fp_folder, quantization_config=quantization_config)
    before = logits(model)
    # NOTE: bitwise is guaranteed here: the same model in the same memory runs the same kernels; the trap changed the
    # stored 4-bit data itself, so any difference at all means a save mutated the model.
    model.state_dict()
    model.state_dict()
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "saved")
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)
    if double_quant:  # the Trainer part once: the switch, not the format, is what keeps the logits
        return
    peft_model = peft.get_peft_model(
        model,
        peft.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["experts.down_proj"]),
    ).eval()
    before = logits(peft_model)
    # learning rate 0: the two steps leave the adapters as they were, so only the checkpoint saves could move the logits
    args = TrainingArguments(tmp_path / "run", max_steps=2, save_steps=1, learning_rate=0.0, report_to=[], use_cpu=True,
                             per_device_train_batch_size=2, disable_tqdm=True)
    batch = ids(batch=2, seq=12, seed=5)
    data = [{"input_ids": row, "labels": row} for row in batch]
    Trainer(model=peft_model, args=args, train_dataset=data).train()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    torch.testing.assert_close(logits(peft_model.eval()), before, rtol=0, atol=0)


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="bitsandbytes repacks only on AVX512-BF16 CPUs")
def test_trap_exists_without_the_switch(fp_folder):
    """Control: with bitsandbytes' own choice restored, state_dict() changes the logits on this CPU (the cause,
    see quantization.disable_cpu_weight_repacking); our models never run that way."""
    quantization_config = bnb_config(bnb_4bit_use_double_quant=False)
    model = AutoModelForCausalLM.from_pretrained(fp_folder, quantization_config=quantization_config)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True
    before = logits(model)
    model.state_dict()
    assert (logits(model) - before).abs().max() > 1e-2
    assert disable_cpu_weight_repacking(model) > 0


# ------------------------------------------------------------------------------------------------- standard door
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_load_in_4bit_quantizes_every_expert(fp_folder, fp_model, quant_type):
    model = AutoModelForCausalLM.from_pretrained(
        fp_folder, quantization_config=bnb_config(bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=torch.bfloat16)
    )
    for experts in experts_modules(model):
        assert is_quantized_experts(experts) and experts.quant_spec["quant_type"] == quant_type
        assert experts.quant_spec["compute_dtype"] == "bfloat16"
        tensors = list(experts.named_parameters(recurse=False)) + list(experts.named_buffers(recurse=False))
        assert not [n for n, t in tensors if t.is_floating_point() and t.dim() == 3]
        assert all(not p.requires_grad and p.dtype == torch.uint8 for p in experts.parameters(recurse=False))
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, bnb.nn.Linear4bit)
    assert layer.mlp.gate.weight.dtype == torch.float32 and layer.input_layernorm.weight.dtype == torch.float32
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    # NF4 with fp32 block scales every 64 weights: 0.5 + 4/64 bytes per weight against 2 in bf16, plus double-quant
    # savings: at most 0.30x
    fp_experts = experts_modules(fp_model)[0]
    bf16_bytes = 2 * (fp_experts.gate_up_proj.numel() + fp_experts.down_proj.numel())
    ratio = expert_bytes(experts_modules(model)[0]) / bf16_bytes
    assert 0.25 <= ratio <= 0.30
    assert model.get_memory_footprint() < 0.5 * fp_model.get_memory_footprint()


def test_skip_modules_and_compute_dtype_are_honoured(fp_folder):
    model = AutoModelForCausalLM.from_pretrained(
        fp_folder, quantization_config=bnb_config(llm_int8_skip_modules=["lm_head", "model.layers.1.mlp.experts"])
    )
    quantized = [is_quantized_experts(m) for m in experts_modules(model)]
    assert quantized == [True, False]
    assert model.config.expert_quantization["modules"] == ["model.layers.0.mlp.experts"]


def test_nf4_weight_error_within_the_code_book_bound(fp_model):
    """Each dequantized weight is within half the widest gap of the NF4 code book times its block's absmax."""
    code = bnb.functional.get_4bit_type("nf4", device="cpu")
    half_gap = (code.sort().values.diff().max() / 2).item()
    model = quantize_experts(copy.deepcopy(fp_model), bnb_config(bnb_4bit_use_double_quant=False))
    for fp, q in zip(experts_modules(fp_model), experts_modules(model)):
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(fp, name).detach()
            blocks = w.reshape(-1, 64)
            bound = blocks.abs().amax(dim=1, keepdim=True) * half_gap * (1 + 1e-5)
            error = (dequantize_experts(q, name) - w).reshape(-1, 64).abs()
            assert (error <= bound).all()


def test_logits_close_to_full_precision(fp_folder, fp_model):
    """Tolerance from the format: every quantized weight matrix carries a relative RMS error eps (measured here on
    the model's own weights: ~0.09 for NF4 on Gaussian weights), errors of the independent blocks add in quadrature,
    and a logit passes through at most 4 quantized products per layer (v, o, gate_up, down): relative logit error
    <= sqrt(4 * layers) * eps."""
    model = AutoModelForCausalLM.from_pretrained(fp_folder, quantization_config=bnb_config())
    squared_error, squared_norm = 0.0, 0.0
    fp_weights = dict(fp_model.named_parameters())
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            dequantized = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            pairs = [(dequantized, fp_weights[f"{name}.weight"])]
        elif name.endswith("mlp.experts"):
            pairs = [(dequantize_experts(module, p), fp_weights[f"{name}.{p}"]) for p in ("gate_up_proj", "down_proj")]
        else:
            continue
        for quantized, full in pairs:
            squared_error += (quantized.float() - full).square().sum().item()
            squared_norm += full.square().sum().item()
    eps = (squared_error / squared_norm) ** 0.5
    assert 0.05 < eps < 0.12
    reference = logits(fp_model)
    relative = ((logits(model) - reference).norm() / reference.norm()).item()
    assert 0 < relative <= (4 * model.config.num_hidden_layers) ** 0.5 * eps


def test_from_config_and_quantize_model_equals_the_standard_door(fp_folder, fp_model):
    loaded = AutoModelForCausalLM.from_pretrained(fp_folder, quantization_config=bnb_config())
    quantized = quantize_model(copy.deepcopy(fp_model), bnb_config())
    assert quantized.is_loaded_in_4bit and quantized.config.expert_quantization == loaded.config.expert_quantization
    assert_fp32_close(logits(quantized), logits(loaded))


FAMILIES = {  # one MoE layer of width 64 each; Qwen2-MoE adds a gated shared expert
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=64, num_local_experts=4)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=128, num_experts=4)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=64, num_experts=4)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_converted_checkpoint_loads_quantized(tmp_path, family):
    """A Mixtral / Qwen2-MoE / OLMoE checkpoint converted by conversion.from_hf, loaded with a 4-bit config: experts
    (and the shared expert) quantized, logits within NF4's error of the source model's."""
    import transformers

    from modeling_sparse_moe.interop.conversion import from_hf

    config_name, model_name, extra = FAMILIES[family]
    torch.manual_seed(0)
    source = getattr(transformers, model_name)(getattr(transformers, config_name)(
        vocab_size=97, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        num_experts_per_tok=2, initializer_range=0.02, **extra,
    )).eval()
    from_hf(source).save_pretrained(tmp_path / "converted")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "converted", quantization_config=bnb_config())
    assert all(is_quantized_experts(m) for m in experts_modules(model))
    shared = model.model.layers[0].mlp.shared_experts
    assert shared is None or isinstance(shared.up_proj, bnb.nn.Linear4bit)
    reference = logits(source)
    assert (logits(model) - reference).norm() / reference.norm() < 0.15


# ------------------------------------------------------------------------------------- expert path vs reference
def _routed_models(num_experts, capacity_factor, implementation):
    torch.manual_seed(1)
    config = small_config(num_experts=num_experts, capacity_factor=capacity_factor, hidden_size=64)
    config._experts_implementation = implementation
    fp = SparseMoEForCausalLM(config)
    quantized = quantize_experts(copy.deepcopy(fp), bnb_config())
    reference = copy.deepcopy(fp)
    for ref, q in zip(experts_modules(reference), experts_modules(quantized)):
        for name in ("gate_up_proj", "down_proj"):
            getattr(ref, name).data.copy_(dequantize_experts(q, name))
    return quantized, reference


LORA_ON_EXPERTS = dict(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False,
                      target_parameters=["experts.gate_up_proj", "experts.down_proj"])


def _lora_pair(implementation):
    quantized, reference = _routed_models(num_experts=8, capacity_factor=0.5, implementation=implementation)
    torch.manual_seed(2)
    q_peft = peft.get_peft_model(quantized, peft.LoraConfig(**LORA_ON_EXPERTS))
    r_peft = peft.get_peft_model(reference, peft.LoraConfig(**LORA_ON_EXPERTS))
    peft.set_peft_model_state_dict(r_peft, peft.get_peft_model_state_dict(q_peft))
    return q_peft.train(), r_peft.train()


def _assert_same_lora_grads(q_model, r_model, expected: int):
    q_grads = {n: p.grad for n, p in q_model.named_parameters() if "experts" in n and p.grad is not None}
    r_grads = {n: p.grad for n, p in r_model.named_parameters() if "experts" in n and p.grad is not None}
    assert q_grads.keys() == r_grads.keys() and len(q_grads) == expected
    for name in q_grads:
        assert q_grads[name].abs().sum() > 0
        assert_fp32_close(q_grads[name], r_grads[name])


@pytest.mark.parametrize("implementation", ["sparse_moe", "eager"])
def test_expert_path_equals_dequantized_reference_with_lora_gradients(implementation):
    """Forward and LoRA gradients of the 4-bit path against the full-precision model holding the dequantized
    weights under PEFT's own ParamWrapper, with 8 experts (some idle) and capacity-dropped assignments (training)."""
    q_peft, r_peft = _lora_pair(implementation)
    input_ids = ids(batch=1, seq=5)  # 10 assignments over 8 experts: some idle; capacity 1 per expert drops some
    dropped = []
    for name, module in q_peft.named_modules():
        if name.endswith("mlp.gate"):
            module.register_forward_hook(lambda m, args, out: dropped.append(out[3]))
    outputs = []
    for model in (q_peft, r_peft):
        out = model(input_ids)
        out.logits.square().mean().backward()
        outputs.append(out)
    assert any(d is not None and d.any() for d in dropped)
    assert_fp32_close(outputs[0].logits, outputs[1].logits)
    _assert_same_lora_grads(q_peft, r_peft, expected=8)


def test_compiled_expert_block_equals_dequantized_reference():
    """Under torch.compile the 4-bit experts run as an opaque region (graph break) with the same numbers and LoRA
    gradients as the eager full-precision reference block (whose compiled path is the custom-op planned path)."""
    q_peft, r_peft = _lora_pair("sparse_moe")
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(4))
    results = []
    for model in (q_peft, r_peft):
        block = model.base_model.model.model.layers[0].mlp
        x_in = x.clone().requires_grad_(True)
        y = torch.compile(block, backend="eager")(x_in)
        y.square().mean().backward()
        results.append((y, x_in.grad))
    assert_fp32_close(results[0][0], results[1][0])
    assert_fp32_close(results[0][1], results[1][1])
    _assert_same_lora_grads(q_peft, r_peft, expected=4)


def test_only_experts_with_rows_are_dequantized(monkeypatch):
    from transformers.integrations.moe import ExpertsInterface

    from modeling_sparse_moe import moe_dispatch, quantization

    # NOTE: the registry is global: a Hub folder loaded through remote code earlier in this process registered its own
    # copy of the implementation (calling its own copy of quantization.py); count through this package's copy.
    monkeypatch.setitem(ExpertsInterface._global_mapping, moe_dispatch.SPARSE_MOE_EXPERTS,
                        moe_dispatch.sparse_moe_experts_forward)
    quantized, _ = _routed_models(num_experts=8, capacity_factor=None, implementation="sparse_moe")
    calls = []
    original = quantization.dequantize_expert
    counting = lambda m, n, e, d=None: calls.append(e) or original(m, n, e, d)  # noqa: E731
    monkeypatch.setattr(quantization, "dequantize_expert", counting)
    logits(quantized, ids(batch=1, seq=1))  # one token, top-2: two experts per layer
    assert len(calls) == 2 * 2 * 2  # 2 layers x 2 experts x 2 projections


# ------------------------------------------------------------------------------------------------------- QLoRA
def test_qlora_trains_saves_reloads_and_merges(fp_folder, fp_model, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(fp_folder, quantization_config=bnb_config())
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
    )
    model = peft.get_peft_model(model, config)
    packed_before = {n: p.clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = ids(batch=2, seq=16, seed=3)
    losses = []
    model.train()
    for step in range(8):
        loss = model(batch, labels=batch).loss
        loss.backward()
        if step < 2:  # B starts at zero (PEFT's init), so A's gradient is zero until B has moved once
            expert_grads = {n: p.grad for n, p in model.named_parameters() if "experts" in n and "lora_" in n}
            assert len(expert_grads) == 8
            assert all(g.abs().sum() > 0 for n, g in expert_grads.items() if step == 1 or "lora_B" in n)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0]
    for name, p in model.named_parameters():
        if p.dtype == torch.uint8:
            assert not p.requires_grad and torch.equal(p, packed_before[name])
    model.eval()
    trained = logits(model)
    model.save_pretrained(tmp_path / "adapter")

    base = AutoModelForCausalLM.from_pretrained(fp_folder, quantization_config=bnb_config())
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded), trained, rtol=0, atol=0)

    # Merged into the full-precision copy of the base it trained on (the dequantized 4-bit weights): the same model.
    dequantized = dequantize_model(AutoModelForCausalLM.from_pretrained(fp_folder, quantization_config=bnb_config()))
    merged = peft.PeftModel.from_pretrained(dequantized, tmp_path / "adapter").merge_and_unload()
    assert_fp32_close(logits(merged), trained)
    # Merged into the original full-precision base: the adapter carries over (its training loss stays below the base's).
    full = peft.PeftModel.from_pretrained(copy.deepcopy(fp_model), tmp_path / "adapter")
    unmerged = logits(full)
    merged = full.merge_and_unload()
    assert_fp32_close(logits(merged), unmerged)
    with torch.no_grad():
        assert merged(batch, labels=batch).loss < 0.9 * fp_model(batch, labels=batch).loss
    with pytest.raises(ValueError, match="full precision"):
        model.base_model.model.model.layers[0].mlp.experts.merge()


# ---------------------------------------------------------------------------------------------- streaming load
def test_load_in_4bit_packs_each_stack_as_it_loads(tmp_path, monkeypatch):
    """A sharded bf16 checkpoint under load_in_4bit: every expert stack is packed when the loader sets it (the
    after-load pass is switched off here), and the logits and state equal those of quantizing the fully loaded
    model. (Peak memory: scripts/bench_load_4bit.py.)"""
    from modeling_sparse_moe import quantization

    torch.manual_seed(0)
    SparseMoEForCausalLM(small_config(num_hidden_layers=3)).to(torch.bfloat16).save_pretrained(
        tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    packed_by_loader = []
    original = quantization.pack_on_arrival

    def watching(experts, name, value):
        taken = original(experts, name, value)
        if taken:  # a float stack set by transformers' loader, packed before the next one loads
            packed_by_loader.append(name)
        return taken

    released = []
    release = quantization._release_checkpoint_pages
    monkeypatch.setattr(quantization, "_release_checkpoint_pages", lambda t: released.append(release(t)) or released[-1])
    monkeypatch.setattr("modeling_sparse_moe.modeling_sparse_moe.pack_on_arrival", watching)  # the loader's setattr
    monkeypatch.setattr(quantization, "quantize_experts_module", None)  # the after-load pass must not run
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_config())
    monkeypatch.undo()
    assert sorted(packed_by_loader) == sorted(["gate_up_proj", "down_proj"] * 3)
    if os.path.exists("/proc/self/maps"):  # Linux: each packed stack's mapped checkpoint pages were dropped
        assert released == [True] * 6
    assert len(experts_modules(streamed)) == 3 and all(is_quantized_experts(m) for m in experts_modules(streamed))
    assert streamed.config.expert_quantization["modules"] == [f"model.layers.{i}.mlp.experts" for i in range(3)]
    # the loader sets down_proj first; the parameter order (PEFT's wrapper nesting, so adapter names) is kept
    assert [n for n, _ in experts_modules(streamed)[0].named_parameters()] == ["gate_up_proj", "down_proj"]
    after_full_load = quantize_model(AutoModelForCausalLM.from_pretrained(tmp_path), bnb_config())
    # NOTE: the same packing of the same bf16 values by the same kernels in one process: bitwise equal
    assert torch.equal(logits(streamed), logits(after_full_load))
    for key, value in after_full_load.state_dict().items():
        assert torch.equal(streamed.state_dict()[key], value), key


def test_load_in_4bit_of_a_4bit_checkpoint_keeps_its_block_size(tmp_path):
    """A checkpoint already packed with another block size (32, not the default 64) under load_in_4bit: its own
    layout is kept (nothing is quantized twice); a config.json that misstates the block size is refused by the loader
    (shapes of the block scales), never loaded as garbage."""
    torch.manual_seed(0)
    source = quantize_experts(SparseMoEForCausalLM(small_config()), bnb_config(), blocksize=32)
    source.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_config())
    assert loaded.config.expert_quantization["blocksize"] == 32
    for ours, theirs in zip(experts_modules(loaded), experts_modules(source)):
        for name in ("gate_up_proj", "down_proj"):
            assert torch.equal(dequantize_experts(ours, name), dequantize_experts(theirs, name))
    config = json.loads((tmp_path / "config.json").read_text())
    config["expert_quantization"]["blocksize"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_config())


# ------------------------------------------------------------------------------------------ the standard doors
DOOR_LORA = dict(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"],
                 target_parameters=["experts.gate_up_proj", "experts.down_proj"])


def _adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("door", ["get_peft_model", "PeftModel.from_pretrained", "add_adapter", "load_adapter"])
def test_every_door_puts_full_precision_lora_on_4bit_experts(door, fp_folder, tmp_path):
    """A plain LoraConfig (no helper) through each door of PEFT and transformers on a 4-bit model: the same logits as
    the same adapter under PEFT's own ParamWrapper on the full-precision model holding the dequantized weights, the
    per-expert path (no parametrization of the packed tensor), and adapters saved under the names and shapes a
    full-precision base gives them."""
    from modeling_sparse_moe.quantization import _param_wrapper_4bit_class

    fp_adapter = tmp_path / "fp_adapter"
    torch.manual_seed(5)
    peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(fp_folder), peft.LoraConfig(**DOOR_LORA)
    ).save_pretrained(fp_adapter)
    model = AutoModelForCausalLM.from_pretrained(fp_folder, quantization_config=bnb_config())
    if door == "get_peft_model":
        model = peft.get_peft_model(model, peft.LoraConfig(**DOOR_LORA))
    elif door == "PeftModel.from_pretrained":
        model = peft.PeftModel.from_pretrained(model, fp_adapter)
    elif door == "add_adapter":
        model.add_adapter(peft.LoraConfig(**DOOR_LORA))
    else:
        model.load_adapter(fp_adapter)
    wrappers = [m for m in model.modules() if type(m).__name__ == "ParamWrapper"]
    assert len(wrappers) == 4 and all(isinstance(m, _param_wrapper_4bit_class()) for m in wrappers)
    quantized_logits = logits(model)
    model.save_pretrained(tmp_path / "door_adapter")  # transformers' save of an adapted model writes the adapter only
    saved, reference_names = _adapter_tensors(tmp_path / "door_adapter"), _adapter_tensors(fp_adapter)
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in reference_names.items()}

    dequantized = dequantize_model(AutoModelForCausalLM.from_pretrained(fp_folder, quantization_config=bnb_config()))
    reference = peft.PeftModel.from_pretrained(dequantized, tmp_path / "door_adapter")
    with reference.disable_adapter():
        assert (logits(reference) - quantized_logits).abs().max() > 1e-3  # the adapter matters
    # NOTE: 4-bit path = per-expert dequantize + matmul in fp32; the reference multiplies the same fp32 weights
    assert_fp32_close(quantized_logits, logits(reference))


# ---------------------------------------------------------------------------------------------- save and share
def test_save_reload_keeps_logits_and_config(fp_folder, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(fp_folder, quantization_config=bnb_config(bnb_4bit_quant_type="fp4"))
    before = logits(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["quantization_config"]["load_in_4bit"] and saved["expert_quantization"]["quant_type"] == "fp4"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(is_quantized_experts(m) for m in experts_modules(reloaded))
    torch.testing.assert_close(logits(reloaded), before, rtol=0, atol=0)


@pytest.mark.slow
def test_hub_folder_of_a_quantized_model_loads_in_a_fresh_process(tmp_path):
    from test_hub import run_fresh_process

    from modeling_sparse_moe.recipes.data import load_text_corpus, train_tokenizer
    from modeling_sparse_moe.interop.hub import save_for_hub

    tokenizer = train_tokenizer(load_text_corpus(max_chars=5_000), vocab_size=300)
    torch.manual_seed(0)
    SparseMoEForCausalLM(small_config(vocab_size=len(tokenizer))).save_pretrained(tmp_path / "fp")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=bnb_config())
    folder = save_for_hub(model, tmp_path / "hub", tokenizer)
    assert (folder / "quantization.py").is_file()
    text = "In the beginning"
    enc = tokenizer([text], return_tensors="pt")
    reference = logits(model, enc["input_ids"])
    result = run_fresh_process(
        [{"auto_class": "AutoModelForCausalLM", "source": str(folder), "texts": [text], "generate": None}],
        tmp_path / "fresh",
    )
    torch.testing.assert_close(torch.tensor(result["jobs"][0]["logits"]), reference, rtol=0, atol=0)


def test_to_hf_refuses_a_quantized_model_or_dequantizes_on_request(fp_folder, tmp_path):
    from modeling_sparse_moe.interop.conversion import to_hf

    model = AutoModelForCausalLM.from_pretrained(fp_folder, quantization_config=bnb_config())
    model.save_pretrained(tmp_path / "q")
    for source in (model, tmp_path / "q"):
        with pytest.raises(ValueError, match="dequantize=True"):
            to_hf(source, family="mixtral")
    mixtral = to_hf(model, family="mixtral", dequantize=True).eval()
    assert is_quantized_experts(experts_modules(model)[0])  # the 4-bit model itself is left as it was
    before = logits(model)
    assert_fp32_close(logits(mixtral), before)
    model.dequantize()  # transformers' API: the experts are unpacked too, the quantization records removed
    assert not any(is_quantized_experts(m) or isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert not hasattr(model.config, "quantization_config") and not hasattr(model.config, "expert_quantization")
    assert_fp32_close(logits(model), before)


# --------------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_clearly(fp_model, fp_folder, tmp_path):
    with pytest.raises(ValueError, match="does not divide the expert width"):
        quantize_experts(copy.deepcopy(fp_model), bnb_config(), blocksize=256)
    assert not any(is_quantized_experts(m) for m in experts_modules(fp_model))  # nothing half-done
    grouped = copy.deepcopy(fp_model)
    grouped.config._experts_implementation = "grouped_mm"
    with pytest.raises(ValueError, match="cannot read 4-bit experts"):
        quantize_experts(grouped, bnb_config())
    quantized = quantize_experts(copy.deepcopy(fp_model), bnb_config())
    with pytest.raises(ValueError, match="already quantized"):
        quantize_experts(quantized, bnb_config())
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(quantized, bnb_config())
    loaded = AutoModelForCausalLM.from_pretrained(fp_folder, quantization_config=bnb_config())
    with pytest.raises(ValueError, match="adapters"):  # full fine-tuning of 4-bit weights: transformers' Trainer says
        Trainer(model=loaded, args=TrainingArguments(tmp_path, report_to=[], use_cpu=True))


@pytest.mark.slow
def test_recipe_qlora_adapts_the_4bit_experts_on_cpu(tmp_path):
    """`--load_in_4bit --lora_target attention,experts` in a recipe, from configs/tiny (widths of 32: block size 32)."""
    from modeling_sparse_moe.tasks import translation

    result = translation.main([
        "--config_name", "configs/tiny", "--offline_corpus", "country_names", "--output_dir", str(tmp_path / "mt"),
        "--do_train", "--max_train_samples", "16", "--max_steps", "3", "--learning_rate", "1e-2", "--lora_r", "4",
        "--lora_target", "attention,experts", "--load_in_4bit", "--report_to", "none", "--disable_tqdm", "true",
        "--save_strategy", "no", "--per_device_train_batch_size", "8", "--tokenizer_vocab_size", "300",
    ])
    model = result["model"]
    experts = model.base_model.model.model.layers[0].mlp.experts.get_base_layer()
    assert is_quantized_experts(experts) and experts.quant_spec["blocksize"] == 32
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("experts" in n and "lora_" in n for n in trainable) and any("q_proj.lora_" in n for n in trainable)
    assert all("lora_" in n for n in trainable)
    with pytest.raises(ValueError, match="--lora_r"):
        translation.main(["--config_name", "configs/tiny", "--offline_corpus", "country_names", "--output_dir",
                          str(tmp_path / "full"), "--do_train", "--load_in_4bit", "--max_steps", "1"])


@pytest.mark.slow
def test_bench_quant_quick_reports_every_section(tmp_path):
    """scripts/bench_quant.py at smoke size: the exact parts of its report (timings are the script's business)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_quant.py"
    out = tmp_path / "quant.json"
    result = subprocess.run([sys.executable, str(script), "--quick", "--no-rss", "--json", str(out), "--work-dir",
                             str(tmp_path / "work")], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["memory_demo"]["experts_ratio"] <= 0.30
    assert set(report["variants"]) == {"fp32", "nf4"}
    assert report["variants"]["nf4"]["footprint_bytes"] < 0.6 * report["variants"]["fp32"]["footprint_bytes"]
    assert all(len(curve) == 6 for curve in report["qlora"]["loss_curves"].values())


@pytest.mark.slow
def test_bench_load_4bit_smoke_streams_with_the_same_logits(tmp_path):
    """scripts/bench_load_4bit.py --smoke: both loads run in fresh processes and give the same logits (the memory
    figures are the script's business: at smoke size the interpreter's own allocations dominate them)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_load_4bit.py"
    out = tmp_path / "load.json"
    result = subprocess.run([sys.executable, str(script), "--smoke", "--output", str(out)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"stream", "after_full_load"} and report["shards"] > 1
    assert report["runs"]["after_full_load"]["max_abs_logit_diff_vs_stream"] == 0
    assert report["runs"]["stream"]["footprint_bytes"] == report["runs"]["after_full_load"]["footprint_bytes"]
