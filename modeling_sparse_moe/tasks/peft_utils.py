"""PEFT LoRA for SparseMoE: which weights each `--lora_target` part names, adapter sizes, merge checks, QLoRA.

The MoE weights are not all `nn.Linear`: the router (`mlp.gate.weight`, (E, D)) and the experts
(`mlp.experts.gate_up_proj` (E, 2F, D), `mlp.experts.down_proj` (E, D, F)) are plain parameters, which PEFT >= 0.17
adapts through `LoraConfig(target_parameters=[...])` (one low-rank delta per expert tensor). With `--load_in_4bit`
the base is quantized to NF4 (experts included, `modeling_sparse_moe.quantization`) and the same targets train
adapters on the frozen 4-bit experts (QLoRA), on CPU too, through PEFT's own doors with a plain `LoraConfig`; the
adapters have the names and shapes they have on a full-precision base, so `load_adapted` puts them on either.
"""

from __future__ import annotations

import os

import torch
from peft import LoraConfig, PeftModel, get_peft_model

# part -> (target_modules, target_parameters)
LORA_PARTS = {
    "attention": (["q_proj", "k_proj", "v_proj", "o_proj"], []),
    "router": ([], ["mlp.gate.weight"]),
    "experts": ([], ["experts.gate_up_proj", "experts.down_proj"]),
    "mlp": (["gate_proj", "up_proj", "down_proj"], []),
}


def lora_config(
    r: int, alpha: float = 16.0, dropout: float = 0.0, target: str = "attention,router,experts", task_type=None, model=None
) -> LoraConfig:
    """A `LoraConfig` for the comma-separated parts in `target` (see `LORA_PARTS`; anything else is taken as a
    module name). Parts the model does not have (the router of an all-dense model, say) are skipped when `model`
    is given."""
    modules: list[str] = []
    parameters: list[str] = []
    names = {n for n, _ in model.named_parameters()} if model is not None else None
    for part in (p.strip() for p in target.split(",") if p.strip()):
        if part in LORA_PARTS:
            mods, params = LORA_PARTS[part]
            if names is not None:
                mods = [m for m in mods if any(f".{m}." in n for n in names)]
                params = [p for p in params if any(n.endswith(p) for n in names)]
            modules += mods
            parameters += params
        else:
            modules.append(part)
    if not modules and not parameters:
        raise ValueError(f"--lora_target {target!r} names nothing this model has")
    # NOTE: a plain LoraConfig reaches 4-bit experts too (the model adopts PEFT's wrapper, quantization.py)
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=modules or None,
        target_parameters=parameters or None,
        task_type=task_type,
    )


def apply_lora(model, lora_args, task_type=None):
    """Wrap `model` with LoRA adapters from `LoraArguments` (a no-op when `lora_r == 0`); with `--load_in_4bit` the
    base is quantized first (`quantize_for_qlora`)."""
    if lora_args.lora_r <= 0:
        return model
    if getattr(lora_args, "load_in_4bit", False):
        model = quantize_for_qlora(model)
    cfg = lora_config(
        lora_args.lora_r, lora_args.lora_alpha, lora_args.lora_dropout, lora_args.lora_target, task_type, model
    )
    return get_peft_model(model, cfg)


def check_qlora_available(lora_r: int | None = None) -> None:
    """QLoRA (4-bit NF4 base weights through bitsandbytes, LoRA on top) needs bitsandbytes and, as any 4-bit model,
    adapters to train: refuse clearly instead of failing deep inside a load. bitsandbytes >= 0.48 runs 4-bit weights
    on CPU as well as on CUDA. What `--load_in_4bit` does, by hand:

        from transformers import BitsAndBytesConfig
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True))   # experts too
        model = peft.prepare_model_for_kbit_training(model)
        model = peft.get_peft_model(model, LoraConfig(
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
        # later: PeftModel.from_pretrained(<the same 4-bit or a full-precision base>, adapter_dir)"""
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as err:
        raise RuntimeError("QLoRA (--load_in_4bit) needs the bitsandbytes package: pip install bitsandbytes") from err
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        bnb_functional.quantize_4bit(torch.ones(64, device=device), quant_type="nf4")
    except (RuntimeError, NotImplementedError) as err:
        raise RuntimeError(
            f"QLoRA (--load_in_4bit): this bitsandbytes build cannot quantize to 4 bits on {device} ({err}). "
            "Upgrade bitsandbytes (>= 0.48 runs on CPU), or drop --load_in_4bit to train LoRA on full-precision weights."
        ) from err
    if lora_r is not None and lora_r <= 0:
        raise ValueError(
            "--load_in_4bit freezes the base in 4 bits, so full fine-tuning (--lora_r 0) cannot update it: add "
            "--lora_r 8 (QLoRA), or drop --load_in_4bit to fine-tune every weight in full precision."
        )


def quantization_config():
    """The QLoRA base format: NF4 with double quantization; bf16 compute on GPUs, fp32 on CPU (no fast bf16 GEMM)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
    )


def quantize_for_qlora(model):
    """The loaded full-precision model quantized as `from_pretrained(..., quantization_config=quantization_config())`
    would have done (experts included), then made ready for k-bit training (PEFT). A model already loaded in 4 bits
    is only prepared."""
    from peft import prepare_model_for_kbit_training

    from ..quantization import quantize_model

    if not getattr(model, "is_loaded_in_4bit", False):
        model = quantize_model(model, quantization_config())
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def load_adapted(base_path: str | os.PathLike, adapter_dir: str | os.PathLike, load_in_4bit: bool = False,
                 is_trainable: bool = False, model_class=None, **kwargs):
    """A saved adapter on its base, through PEFT's standard door: `PeftModel.from_pretrained` on the base loaded in
    full precision or, with `load_in_4bit`, in the QLoRA format (`quantization_config()`; experts included). Either
    base takes an adapter trained on either. `kwargs` go to the base's `from_pretrained`."""
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    if load_in_4bit:
        kwargs["quantization_config"] = quantization_config()
    base = model_class.from_pretrained(base_path, **kwargs)
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=is_trainable)


def folder_size(path: str | os.PathLike) -> int:
    """Bytes of the weight files in a saved folder (adapter or model)."""
    total = 0
    for name in os.listdir(path):
        if name.endswith(".safetensors") or name.endswith(".bin"):
            total += os.path.getsize(os.path.join(path, name))
    return total


def adapter_report(model, adapter_dir: str, base_param_count: int) -> dict:
    """Adapter vs model size: trainable and total parameters, and the adapter file's bytes vs fp32 model bytes."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapter_bytes = folder_size(adapter_dir)
    return {
        "trainable_parameters": trainable,
        "base_parameters": base_param_count,
        "trainable_fraction": trainable / max(base_param_count, 1),
        "adapter_bytes": adapter_bytes,
        "base_model_bytes_fp32": 4 * base_param_count,
    }


@torch.no_grad()
def merge_max_abs_diff(peft_model: PeftModel, input_ids: torch.Tensor) -> float:
    """Largest |logit difference| between the adapter model and its `merge_and_unload()` version, on `input_ids`.
    Merges a deep copy, so `peft_model` keeps its adapters."""
    import copy

    peft_model.eval()
    unmerged = peft_model(input_ids=input_ids).logits
    merged_model = copy.deepcopy(peft_model).merge_and_unload().eval()
    merged = merged_model(input_ids=input_ids).logits
    return (merged - unmerged).abs().max().item()
