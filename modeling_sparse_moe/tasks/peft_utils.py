"""PEFT LoRA for SparseMoE: which weights each `--lora_target` part names, adapter sizes, merge checks, QLoRA.

The MoE weights are not all `nn.Linear`: the router (`mlp.gate.weight`, (E, D)) and the experts
(`mlp.experts.gate_up_proj` (E, 2F, D), `mlp.experts.down_proj` (E, D, F)) are plain parameters, which PEFT >= 0.17
adapts through `LoraConfig(target_parameters=[...])` (one low-rank delta per expert tensor).
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
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=modules or None,
        target_parameters=parameters or None,
        task_type=task_type,
    )


def apply_lora(model, lora_args, task_type=None):
    """Wrap `model` with LoRA adapters from `LoraArguments` (a no-op when `lora_r == 0`)."""
    if lora_args.lora_r <= 0:
        return model
    cfg = lora_config(
        lora_args.lora_r, lora_args.lora_alpha, lora_args.lora_dropout, lora_args.lora_target, task_type, model
    )
    return get_peft_model(model, cfg)


def check_qlora_available() -> None:
    """QLoRA (4-bit NF4 base weights through bitsandbytes, LoRA on top) needs CUDA and bitsandbytes; refuse clearly
    elsewhere instead of failing deep inside a load. On a CUDA machine:

        from transformers import BitsAndBytesConfig
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
        model = peft.prepare_model_for_kbit_training(model)   # then apply_lora as usual

    Note: bitsandbytes quantizes `nn.Linear` layers only: the 3D expert tensors stay in the compute dtype."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "QLoRA (--load_in_4bit) needs a CUDA GPU: bitsandbytes 4-bit layers do not run on this machine (no CUDA "
            "device found). Drop --load_in_4bit to train LoRA adapters on full-precision weights."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise RuntimeError("QLoRA (--load_in_4bit) needs the bitsandbytes package: pip install bitsandbytes") from err


def quantization_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True
    )


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
