# Copyright 2026 The sparse-moe authors. Licensed under the Apache License, Version 2.0.
"""4-bit (NF4 / FP4) routed experts through bitsandbytes' functional API, QLoRA on them, and the CPU save trap.

Hub-facing file: it is copied next to `config.json` and imports only torch and transformers at module level;
bitsandbytes and peft are imported lazily with `importlib` (transformers' remote-code check reads every `import`
statement of a file, indented or not, and would otherwise demand them of every user of a Hub folder).

Shape legend as in moe_dispatch.py: T tokens, K experts per token, E experts, D hidden, F expert hidden, O / I the
output / input width of one expert projection (gate_up: 2F x D, down: D x F), N computed assignments.

Design (why not bitsandbytes' parametrizations or `Params4bit`):
  - A quantized `SparseMoEExperts` keeps its class and its parameter names. `gate_up_proj` / `down_proj` become
    frozen uint8 parameters (E, O*I/2) holding each expert's packed 4-bit codes, with per-expert buffers for the block
    scales (`<name>_absmax`, plus `<name>_nested_absmax` / `<name>_nested_offset` under double quantization) and the
    code books (`<name>_quant_map`, `<name>_nested_quant_map`). Each expert is quantized on its own with
    `bitsandbytes.functional.quantize_4bit`, so expert e is a contiguous slice of every tensor and
    `dequantize_4bit` on that slice rebuilds exactly that expert: the forward dequantizes only experts that received
    tokens, once per call. (`replace_parameter_4bit` quantizes the whole stack as one tensor: its forward dequantizes
    all E experts on every access, and it renames the parameter, so PEFT's `target_parameters` no longer matches.)
  - Our packing is bitsandbytes' portable layout and never changes after quantization, so `state_dict()` is a read.
    bitsandbytes' own `Linear4bit` (attention, shared experts) repacks its weight in eval-mode CPU forwards on
    machines with AVX512-BF16 (`Linear4bit.support_avx512bf16_for_cpu`) and undoes that in `_save_to_state_dict`;
    the undo is lossy (see `disable_cpu_weight_repacking`), so every `state_dict()` changed the model. We switch the
    repacking off on every `Linear4bit` of our models.
  - The quantization is recorded in `config.expert_quantization` (format, block size, compute dtype, which expert
    modules): a saved folder rebuilds the packed layout before its weights load (`prepare_quantized_layout`).
  - QLoRA: PEFT's `ParamWrapper` (what `target_parameters` creates) adds LoRA by registering a parametrization that
    evaluates `W + B @ A` for the whole (E, O, I) stack on every forward; on 4-bit experts that is a full-size float
    tensor per forward (and torch refuses it: the packed tensor is uint8), the memory QLoRA exists to save. Every
    door (`get_peft_model`, `PeftModel.from_pretrained`, transformers' `add_adapter` / `load_adapter`) builds PEFT's
    own `ParamWrapper` with a plain `LoraConfig`: the packed parameters carry their expert shape for PEFT to size the
    adapters (`mark_logical_shapes`), and the MoE block turns the wrapper PEFT installs into `ParamWrapper4bit`
    (`adopt_lora_wrapper`): the same adapters (names and shapes, so they load onto a full-precision base and merge
    there), applied per active expert as x -> x A_e^T B_e^T, next to the dequantized base product.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from .moe_primitives import plan_dispatch


CONFIG_KEY = "expert_quantization"  # attribute of SparseMoEConfig written when experts are quantized
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
DEFAULT_BLOCKSIZE = 64  # bitsandbytes' default, as its Linear4bit layers use; 32 where 64 does not divide the widths
NESTED_BLOCKSIZE = 256  # bitsandbytes' block size for the double-quantized scales


def _drop_kernel_fetch_warning(record) -> bool:
    """Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning.

    NOTE (bitsandbytes 0.50.2): `import bitsandbytes` on a CPU with AVX512-BF16 tries to fetch a fused GEMV kernel from
    the Hub (`kernels.get_kernel`) and logs a warning when it cannot (offline, untrusted publisher, `kernels` not
    installed). That kernel only serves `Linear4bit`'s repacked eval-mode CPU path, which our models switch off
    (`disable_cpu_weight_repacking`), and the 4-bit experts never call it: the warning says nothing about them."""
    return "gemm_4bit_forward from kernels-community" not in str(record.msg)


def _quiet_bitsandbytes_kernel_fetch() -> None:
    """Installed when this file is imported, so before bitsandbytes is (it logs at import). (transformers' logging
    helper returns the standard library's logger of that name: this file imports only torch and transformers.)"""
    from transformers.utils import logging as hf_logging

    logger = hf_logging.get_logger("bitsandbytes.backends.cpu.ops")
    if _drop_kernel_fetch_warning not in logger.filters:
        logger.addFilter(_drop_kernel_fetch_warning)


_quiet_bitsandbytes_kernel_fetch()


def _bnb():
    return importlib.import_module("bitsandbytes")


def _bnb_functional():
    return importlib.import_module("bitsandbytes.functional")


def _dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    return getattr(torch, str(name).replace("torch.", ""))


# ---------------------------------------------------------------------------------------------------------- configs
def _config_value(quantization_config, key, default=None):
    if quantization_config is None:
        return default
    if isinstance(quantization_config, dict):
        return quantization_config.get(key, default)
    return getattr(quantization_config, key, default)


def is_4bit_config(quantization_config) -> bool:
    """Whether a `BitsAndBytesConfig` (object or dict, as config.json stores it) asks for 4-bit weights."""
    # NOTE: `QuantizationMethod` is a str enum, so the object's member and the dict's string compare alike
    method = _config_value(quantization_config, "quant_method", "bitsandbytes")
    return bool(_config_value(quantization_config, "load_in_4bit", False)) and method == "bitsandbytes"


def default_blocksize(experts: nn.Module) -> int:
    """64 (bitsandbytes' default), or 32 for experts whose widths 64 does not divide (e.g. configs/tiny)."""
    widths = (experts.hidden_dim, experts.intermediate_dim)
    return next((b for b in (DEFAULT_BLOCKSIZE, 32) if all(w % b == 0 for w in widths)), DEFAULT_BLOCKSIZE)


def expert_spec(quantization_config, blocksize: int = DEFAULT_BLOCKSIZE) -> dict:
    """The `config.expert_quantization` entry a 4-bit `BitsAndBytesConfig` asks for (modules filled in later)."""
    compute = _config_value(quantization_config, "bnb_4bit_compute_dtype", None) or torch.float32
    return {
        "method": "bnb_4bit",
        "quant_type": _config_value(quantization_config, "bnb_4bit_quant_type", "nf4"),
        "double_quant": bool(_config_value(quantization_config, "bnb_4bit_use_double_quant", False)),
        "compute_dtype": str(_dtype(compute)).replace("torch.", ""),
        "blocksize": int(blocksize),
        "modules": [],
    }


def _skip_patterns(quantization_config) -> list[str]:
    return list(_config_value(quantization_config, "llm_int8_skip_modules", None) or [])


def _should_quantize(name: str, patterns: list[str]) -> bool:
    from transformers.quantizers.quantizers_utils import should_convert_module

    return should_convert_module(name, patterns)


def _check_blocksize(experts: nn.Module, blocksize: int) -> None:
    if blocksize <= 0 or blocksize & (blocksize - 1) or blocksize < 32:
        raise ValueError(f"4-bit block size {blocksize} is not a power of two >= 32; use 64 (bitsandbytes' default).")
    for width, what in ((experts.hidden_dim, "hidden_size"), (experts.intermediate_dim, "moe_intermediate_size")):
        if width % blocksize:
            raise ValueError(
                f"4-bit block size {blocksize} does not divide the expert width {what}={width}: every block must lie "
                f"in one row of one expert. Use a power of two >= 32 that divides {width} (64 and 32 are bitsandbytes' "
                "usual sizes; leave blocksize unset to pick one), or keep "
                "these experts in full precision with llm_int8_skip_modules=['experts']."
            )


# --------------------------------------------------------------------------------------------------------- packing
def is_quantized_experts(module: nn.Module) -> bool:
    return getattr(module, "quant_spec", None) is not None


def _expert_shapes(experts: nn.Module) -> dict[str, tuple[int, int]]:
    return {
        "gate_up_proj": (2 * experts.intermediate_dim, experts.hidden_dim),
        "down_proj": (experts.hidden_dim, experts.intermediate_dim),
    }


def _register_projection(experts: nn.Module, spec: dict, name: str, device, tensors: dict | None = None) -> None:
    """Replace one float expert parameter (`name`) by its packed layout (from `tensors`, or empty for a checkpoint to
    fill)."""
    E = experts.num_experts
    out_dim, in_dim = _expert_shapes(experts)[name]
    blocks = out_dim * in_dim // spec["blocksize"]
    nested_blocks = math.ceil(blocks / NESTED_BLOCKSIZE)
    shapes = {
        name: ((E, out_dim * in_dim // 2), torch.uint8),
        f"{name}_absmax": ((E, blocks), torch.uint8 if spec["double_quant"] else torch.float32),
        f"{name}_quant_map": ((16,), torch.float32),
    }
    if spec["double_quant"]:
        shapes[f"{name}_nested_absmax"] = ((E, nested_blocks), torch.float32)
        shapes[f"{name}_nested_offset"] = ((E,), torch.float32)
        shapes[f"{name}_nested_quant_map"] = ((256,), torch.float32)
    for key, (shape, dtype) in shapes.items():
        value = tensors[key] if tensors is not None else torch.empty(shape, dtype=dtype, device=device)
        if key == name:  # the packed codes keep the parameter's name: PEFT's target_parameters still matches
            value = nn.Parameter(value, requires_grad=False)
            # NOTE: replaced in place, never deleted and re-added: PEFT nests its wrappers in parameter order, and
            # that nesting is in the adapter's key names. The loader sets down_proj before gate_up_proj; re-adding
            # would flip the order, and the adapters would no longer load onto a full-precision base.
            experts._parameters[key] = value
        else:
            experts.register_buffer(key, value)
        value._is_hf_initialized = True  # transformers' loader must not re-initialise what is packed on arrival


def _register_layout(experts: nn.Module, spec: dict, device, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Replace the float expert parameters by the packed layout (from `tensors`, or empty for a checkpoint to fill)."""
    for name in EXPERT_PARAMS:
        _register_projection(experts, spec, name, device, tensors)
    experts.quant_spec = dict(spec)
    mark_logical_shapes(experts)


def mark_logical_shapes(experts: nn.Module) -> None:
    """Tell PEFT the (E, O, I) shape of each packed expert parameter.

    NOTE (peft 0.22): `ParamWrapper` (what `target_parameters` creates, through every door: `get_peft_model`,
    `PeftModel.from_pretrained`, transformers' `add_adapter` / `load_adapter`) sizes its adapters from
    `getattr(param, "ds_shape", param.shape)`: `ds_shape` is where a parameter whose storage is not its logical shape
    (DeepSpeed ZeRO-3 partitions) keeps that shape. Packed 4-bit codes are such a parameter, (E, O*I/2) uint8, so the
    adapters get the shapes and names they have on a full-precision base. A loader that replaces the parameter object
    drops the attribute: `after_from_pretrained` marks again."""
    for name, (out_dim, in_dim) in _expert_shapes(experts).items():
        experts._parameters[name].ds_shape = torch.Size((experts.num_experts, out_dim, in_dim))


@torch.no_grad()
def _pack_stack(weight_EOI: torch.Tensor, name: str, spec: dict) -> dict[str, torch.Tensor]:
    """The packed tensors of one (E, O, I) stack, each expert quantized on its own (see the module docstring).

    NOTE: each expert's packed pieces are copied into (E, ...) outputs allocated at its first expert, and its
    temporaries freed before the next expert. Collecting the pieces and stacking them at the end interleaved
    long-lived small blocks with freed fp32 temporaries in the C heap, and the streamed load's peak RSS growth varied
    run to run by more than one fp32 stack (0.66 / 0.70 / 1.04 GiB against a 0.83 GiB budget, bench_load_4bit.py)."""
    BF = _bnb_functional()
    num_experts = weight_EOI.shape[0]
    tensors: dict[str, torch.Tensor] = {}
    for e in range(num_experts):
        # NOTE: quantized from fp32 whatever the storage dtype: bitsandbytes' CPU kernel takes fp32/bf16/fp16 alike,
        # and fp32 keeps the block scales exact.
        packed, state = BF.quantize_4bit(
            weight_EOI[e].float().contiguous(), blocksize=spec["blocksize"],
            compress_statistics=spec["double_quant"], quant_type=spec["quant_type"],
        )
        pieces = {name: packed.reshape(-1), f"{name}_absmax": state.absmax.reshape(-1)}
        if spec["double_quant"]:
            pieces[f"{name}_nested_absmax"] = state.state2.absmax.reshape(-1).float()
            pieces[f"{name}_nested_offset"] = state.offset.reshape(()).float()
        if e == 0:
            tensors[f"{name}_quant_map"] = state.code.float()
            if spec["double_quant"]:
                tensors[f"{name}_nested_quant_map"] = state.state2.code.float()
            for key, piece in pieces.items():
                tensors[key] = piece.new_empty((num_experts, *piece.shape))
        for key, piece in pieces.items():
            tensors[key][e].copy_(piece)
        del packed, state, pieces
    return {key: value.to(weight_EOI.device) for key, value in tensors.items()}


@torch.no_grad()
def quantize_experts_module(experts: nn.Module, spec: dict) -> None:
    """Quantize one `SparseMoEExperts` in place, expert by expert (see the module docstring for the layout)."""
    if is_quantized_experts(experts):
        raise ValueError("these experts are already quantized; load the full-precision checkpoint to quantize anew")
    _check_blocksize(experts, spec["blocksize"])
    tensors: dict[str, torch.Tensor] = {}
    for name in EXPERT_PARAMS:
        tensors.update(_pack_stack(getattr(experts, name).detach(), name, spec))
    _register_layout(experts, spec, experts.gate_up_proj.device, tensors)


MADV_DONTNEED = 4  # Linux <sys/mman.h>


def _release_checkpoint_pages(tensor: torch.Tensor) -> bool:
    """Drop the resident pages of a packed stack that is a view of the memory-mapped checkpoint. Returns whether it did.

    NOTE (transformers 5.25, Linux): `from_pretrained` maps every shard with safetensors' mmap for the whole load, and a
    tensor read in the checkpoint's dtype is a view of those pages: the process's resident set grows by the whole
    checkpoint until the load ends (page cache, reclaimable, but counted in its RSS). Once the stack is packed its
    pages are not needed: `madvise(MADV_DONTNEED)` on a file mapping drops them (nobody writes to a loading stack, so a
    later read would fault the same bytes back in from the file). Only whole pages of the stack inside one mapping of a
    `.safetensors` file (/proc/self/maps) are advised; anything else (a copy in another dtype, another OS, a GPU
    tensor) is left alone."""
    if tensor.device.type != "cpu" or not os.path.exists("/proc/self/maps"):
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= start < high:
                if len(fields) < 6 or not fields[5].strip().endswith(".safetensors") or end > high:
                    return False
                break
        else:
            return False
    # NOTE: only whole pages inside the stack: a page shared with a neighbouring tensor of the shard is left alone (in
    # a private mapping, dropping a page someone wrote to would bring back the file's bytes).
    page = os.sysconf("SC_PAGE_SIZE")
    first, last = -(-start // page) * page, end // page * page
    if last <= first:
        return False
    ctypes = importlib.import_module("ctypes")  # stdlib; imported lazily as bitsandbytes is (see the module docstring)
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED) == 0


PACK_ON_LOAD = "_pack_on_load"  # instance attribute: the spec a loading experts module packs its stacks with


def pack_on_arrival(experts: nn.Module, name: str, value) -> bool:
    """Called by `SparseMoEExperts.__setattr__`: while `from_pretrained` loads a full-precision checkpoint under a 4-bit
    `BitsAndBytesConfig` (`plan_pack_on_load`), each (E, O, I) expert stack is packed the moment transformers' loader
    sets it, so the float stack lives only until the next one loads. Returns whether `value` was taken."""
    spec = experts.__dict__.get(PACK_ON_LOAD)
    if spec is None or name not in EXPERT_PARAMS or not isinstance(value, torch.Tensor) or value.is_meta:
        return False
    out_dim, in_dim = _expert_shapes(experts)[name]
    if tuple(value.shape) != (experts.num_experts, out_dim, in_dim) or not value.is_floating_point():
        return False  # not an expert stack: transformers reports the mismatch as for any parameter
    _register_projection(experts, spec, name, value.device, _pack_stack(value.detach(), name, spec))
    _release_checkpoint_pages(value)
    packed = experts.__dict__.setdefault("_packed_on_load", set())
    packed.add(name)
    if packed == set(EXPERT_PARAMS):
        del experts.__dict__[PACK_ON_LOAD], experts.__dict__["_packed_on_load"]
        experts.quant_spec = dict(spec)
        mark_logical_shapes(experts)
    return True


def dequantize_expert(experts: nn.Module, name: str, expert: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Expert `expert`'s (O, I) weight of projection `name`, dequantized (compute dtype unless `dtype`)."""
    BF = _bnb_functional()
    spec = experts.quant_spec
    out_dim, in_dim = _expert_shapes(experts)[name]
    dtype = _dtype(spec["compute_dtype"]) if dtype is None else dtype
    buffers = experts._buffers
    state2, offset = None, None
    if spec["double_quant"]:
        state2 = BF.QuantState(
            absmax=buffers[f"{name}_nested_absmax"][expert].float(), code=buffers[f"{name}_nested_quant_map"].float(),
            blocksize=NESTED_BLOCKSIZE, dtype=torch.float32,
        )
        offset = buffers[f"{name}_nested_offset"][expert].float()
    absmax = buffers[f"{name}_absmax"][expert]  # NOTE: fp32 again if `model.to(bfloat16)` cast the scales
    state = BF.QuantState(
        absmax=absmax.float() if absmax.is_floating_point() else absmax, shape=torch.Size((out_dim, in_dim)),
        code=buffers[f"{name}_quant_map"].float(), blocksize=spec["blocksize"], quant_type=spec["quant_type"],
        dtype=dtype, offset=offset, state2=state2,
    )
    return BF.dequantize_4bit(experts._parameters[name][expert], state)


def dequantize_experts(experts: nn.Module, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The whole (E, O, I) stack of `name`, dequantized: for conversion and tests, never in the forward."""
    return torch.stack([dequantize_expert(experts, name, e, dtype) for e in range(experts.num_experts)])


def expert_bytes(experts: nn.Module) -> int:
    """Bytes the expert weights occupy (packed codes, scales and code books when quantized)."""
    tensors = [p for n, p in experts.named_parameters(recurse=False) if n.startswith(EXPERT_PARAMS)]
    tensors += [b for n, b in experts.named_buffers(recurse=False) if n.startswith(EXPERT_PARAMS)]
    return sum(t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------------------------------------- forward
def _lora_delta(x_NI: torch.Tensor, factors: list, expert: int) -> torch.Tensor | None:
    """sum over adapters of scaling * x A_e^T B_e^T (PEFT's per-expert delta, never materialised as a matrix)."""
    delta = None
    for lhs_EOR, rhs_ERI, scaling in factors:
        part = F.linear(F.linear(x_NI, rhs_ERI[expert].to(x_NI.dtype)), lhs_EOR[expert].to(x_NI.dtype)) * scaling
        delta = part if delta is None else delta + part
    return delta


def quantized_experts_forward(
    experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The expert path of 4-bit experts, every `experts_implementation` (planned, eager; also what compiled graphs
    call, outside the graph): one plan (a single host read of the per-expert counts, as the planned path), then for
    each expert with rows only: dequantize its two projections once, gate/up, activation, down, and the weighted rows
    put back in (T, K) order; the K slots are summed in fp32 in a fixed order, as the eager reference.
    Dropped assignments (index E) are never computed. LoRA factors attached by `ParamWrapper4bit` are added per
    expert. (T, D) in the dtype of `hidden_states`."""
    num_tokens, top_k = top_k_index.shape
    compute_dtype = _dtype(experts.quant_spec["compute_dtype"])
    lora = getattr(experts, "_lora_factors", None) or {}
    device_type = hidden_states.device.type
    autocast = torch.is_autocast_enabled(device_type)
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        x_TD = hidden_states.to(compute_dtype)
        plan = plan_dispatch(top_k_index, experts.num_experts)
        weights_A = top_k_weights.reshape(-1).float()
        out_AD = x_TD.new_zeros(num_tokens * top_k, experts.hidden_dim, dtype=torch.float32)
        ffn = experts.intermediate_dim
        for expert, start, end in plan.segments:
            rows_N = plan.rows_N[start:end] if plan.rows_N is not None else torch.arange(start, end, device=x_TD.device)
            x_ND = x_TD[rows_N // top_k]
            h_NH = F.linear(x_ND, dequantize_expert(experts, "gate_up_proj", expert, compute_dtype))
            delta = _lora_delta(x_ND, lora.get("gate_up_proj", []), expert)
            h_NH = h_NH if delta is None else h_NH + delta
            g_NF = experts.act_fn(h_NH[:, :ffn]) * h_NH[:, ffn:]
            y_ND = F.linear(g_NF, dequantize_expert(experts, "down_proj", expert, compute_dtype))
            delta = _lora_delta(g_NF, lora.get("down_proj", []), expert)
            y_ND = y_ND if delta is None else y_ND + delta
            out_AD = out_AD.index_put((rows_N,), y_ND.float() * weights_A[rows_N].unsqueeze(-1))
        out_TD = out_AD.view(num_tokens, top_k, -1).sum(dim=1)
    return out_TD.to(hidden_states.dtype)


# NOTE: a compiled graph calls the quantized path as an opaque region (a graph break): it reads the plan back to the
# host and calls bitsandbytes' kernels, which dynamo cannot trace.
quantized_experts_forward = torch.compiler.disable(quantized_experts_forward)


# ------------------------------------------------------------------------------------------------ bitsandbytes trap
def disable_cpu_weight_repacking(model: nn.Module) -> int:
    """Keep bitsandbytes' `Linear4bit` layers of `model` in their portable 4-bit layout. Returns how many.

    NOTE (bitsandbytes 0.50.2, CPU with AVX512-BF16, `torch.backends.cpu.get_cpu_capability() == "AVX512"`): an
    eval-mode forward without gradients repacks the weight for its CPU GEMV kernel (`_convert_weight_packed_for_cpu`:
    block scales transposed to (I/blocksize, O) and rounded to bf16, double-quantized scales expanded), and
    `Linear4bit._save_to_state_dict` undoes it with `_convert_weight_packed_for_cpu_inverse`, which transposes the
    scales back only when they were double-quantized (plain scales stay transposed: max |dlogit| ~10 on a 128-wide
    model) and re-quantizes double-quantized ones with a new offset (drift on every call). So every `state_dict()`
    (Trainer checkpoints, save_pretrained) changed the model. The switch is the layer's `support_avx512bf16_for_cpu`
    (read on every forward); with it off, the layer runs bitsandbytes' portable dequantize + matmul path, whose
    numbers are those of the saved weights."""
    bnb = _bnb()
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


# -------------------------------------------------------------------------------------------------- model-level API
def _experts_modules(model: nn.Module):
    # NOTE: by a class attribute, not `isinstance`: this file sits below the model file (moe_primitives.py), and a Hub
    # folder's copy of `SparseMoEExperts` is another class than the installed package's.
    for name, module in model.named_modules():
        if getattr(type(module), "is_sparse_moe_experts", False):
            yield name, module


def _model_config(model: nn.Module):
    return getattr(model, "config", None)


def _record(model: nn.Module, spec: dict) -> None:
    config = _model_config(model)
    if config is not None:
        setattr(config, CONFIG_KEY, spec)


def quantize_experts(model: nn.Module, quantization_config, blocksize: int | None = None) -> nn.Module:
    """Quantize the routed experts of `model` to 4 bits in place, as `from_pretrained(..., quantization_config=
    BitsAndBytesConfig(load_in_4bit=True, ...))` does after loading (format, double quantization, compute dtype and
    `llm_int8_skip_modules` from the config). Linear layers are untouched (`quantize_model` does both).
    `blocksize`: weights per block scale; it must divide hidden_size and moe_intermediate_size (default: 64, or 32
    where 64 does not divide them)."""
    if not is_4bit_config(quantization_config):
        raise ValueError(
            "quantize_experts needs a 4-bit BitsAndBytesConfig(load_in_4bit=True, ...); for int8 inference experts "
            "use modeling_sparse_moe.int8_experts."
        )
    config = _model_config(model)
    if config is not None and getattr(config, CONFIG_KEY, None):
        raise ValueError(
            "this model's experts are already quantized (config.expert_quantization is set); quantize the "
            "full-precision model instead, or dequantize it first (model.dequantize())"
        )
    spec, targets = _plan_quantization(model, quantization_config, blocksize)
    for name, experts in targets:
        quantize_experts_module(experts, spec)
        spec["modules"].append(name)
    _record(model, spec)
    return model


def _plan_quantization(model: nn.Module, quantization_config, blocksize: int | None):
    """The spec and the (name, experts) to pack, every check done before anything changes (no half-quantized model
    on bad input)."""
    config = _model_config(model)
    implementation = getattr(config, "_experts_implementation", None)
    if implementation not in (None, "eager", "sparse_moe"):
        raise ValueError(
            f"experts_implementation={implementation!r} cannot read 4-bit experts (it multiplies the stored tensors "
            "as they are): use the default 'sparse_moe' (or 'eager'), e.g. from_pretrained(..., "
            "experts_implementation='sparse_moe')"
        )
    skip = _skip_patterns(quantization_config)
    targets = [(name, m) for name, m in _experts_modules(model) if _should_quantize(name, skip)]
    if blocksize is None:
        blocksize = default_blocksize(targets[0][1]) if targets else DEFAULT_BLOCKSIZE
    spec = expert_spec(quantization_config, blocksize)
    for name, experts in targets:
        if is_quantized_experts(experts):
            raise ValueError(f"{name} is already quantized; quantize the full-precision model instead")
        _check_blocksize(experts, blocksize)
    return spec, targets


def plan_pack_on_load(model: nn.Module) -> None:
    """Called when a model is built (`post_init`): when `from_pretrained` is about to load a full-precision
    checkpoint under a 4-bit `BitsAndBytesConfig` (transformers puts it in `config.quantization_config` and builds
    the model on the meta device first), each experts module to quantize is told to pack its stacks as they arrive
    (`pack_on_arrival`). Peak memory then holds one float expert stack at a time, not the whole float model.
    Anything the plan refuses is left to `after_from_pretrained`, which raises the same error after loading."""
    config = _model_config(model)
    quantization_config = getattr(config, "quantization_config", None)
    if getattr(config, CONFIG_KEY, None) or not is_4bit_config(quantization_config):
        return
    # NOTE: the inner model's post_init runs first and sees names without the head's prefix ("layers.1..."), which
    # `llm_int8_skip_modules` may not match: every post_init plans again, and the outermost one decides.
    for _, experts in _experts_modules(model):
        experts.__dict__.pop(PACK_ON_LOAD, None)
    try:
        spec, targets = _plan_quantization(model, quantization_config, None)
    except ValueError:
        return
    for _, experts in targets:
        if experts.gate_up_proj.is_meta and experts.down_proj.is_meta:  # being loaded, not built by from_config
            experts.__dict__[PACK_ON_LOAD] = spec


def _finish_pack_on_load(model: nn.Module) -> bool:
    """After loading: pack what the checkpoint did not set through the loader, record the spec. False when nothing
    was planned (then the experts are quantized after the load, as `quantize_experts` does)."""
    spec, names = None, []
    for name, experts in _experts_modules(model):
        planned = experts.__dict__.get(PACK_ON_LOAD)
        if planned is not None:
            for param in [n for n in EXPERT_PARAMS if n not in experts.__dict__.get("_packed_on_load", set())]:
                pack_on_arrival(experts, param, experts._parameters[param])
        if is_quantized_experts(experts):
            spec = spec or dict(experts.quant_spec)
            names.append(name)
    if spec is None:
        return False
    spec["modules"] = names
    _record(model, spec)
    return True


def quantize_model(model: nn.Module, quantization_config) -> nn.Module:
    """`from_config` + this = `from_pretrained(..., quantization_config=...)`: the linear layers become bitsandbytes
    `Linear4bit` (the output head and `llm_int8_skip_modules` excepted, as transformers chooses), the routed experts
    are packed by `quantize_experts`, the router and norms stay in full precision, and the model is marked as a
    4-bit model (`is_loaded_in_4bit`, `hf_quantizer`, `config.quantization_config`) so PEFT, Trainer and
    `save_pretrained` treat it as one loaded that way."""
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.auto import AutoHfQuantizer

    if getattr(model, "is_loaded_in_4bit", False) or getattr(_model_config(model), CONFIG_KEY, None):
        raise ValueError(
            "this model is already quantized; call quantize_model on a full-precision model (e.g. from_config or "
            "from_pretrained without quantization_config)"
        )
    if not is_4bit_config(quantization_config):
        raise ValueError("quantize_model needs BitsAndBytesConfig(load_in_4bit=True, ...)")
    bnb = _bnb()
    quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=False)
    skip = quantizer.get_modules_to_not_convert(
        model, quantization_config.llm_int8_skip_modules, getattr(model, "_keep_in_fp32_modules", None)
    )
    originals = {name: m for name, m in model.named_modules() if type(m) is nn.Linear and _should_quantize(name, skip)}
    quantize_experts(model, quantization_config)  # validates everything before the first change
    replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=quantization_config)
    for name, linear in originals.items():
        new = model.get_submodule(name)
        if not isinstance(new, bnb.nn.Linear4bit):
            continue
        device = linear.weight.device
        new.weight = bnb.nn.Params4bit(
            linear.weight.data.to("cpu"), requires_grad=False, module=new,
            compress_statistics=quantization_config.bnb_4bit_use_double_quant,
            quant_type=quantization_config.bnb_4bit_quant_type,
            quant_storage=quantization_config.bnb_4bit_quant_storage,
        ).to(device)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    model.is_loaded_in_4bit = True
    model.quantization_method = quantization_config.quant_method
    model.hf_quantizer = quantizer
    model.config.quantization_config = quantization_config
    disable_cpu_weight_repacking(model)
    return model


def prepare_quantized_layout(model: nn.Module) -> None:
    """Called when a model is built (`post_init`): a config that records quantized experts (a saved 4-bit model)
    gets their packed layout, empty, for the checkpoint to fill; a full-precision checkpoint about to load under a
    4-bit `BitsAndBytesConfig` is packed as it loads (`plan_pack_on_load`)."""
    spec = getattr(_model_config(model), CONFIG_KEY, None)
    if not spec:
        plan_pack_on_load(model)
        return
    wanted = set(spec.get("modules", []))
    for name, experts in _experts_modules(model):
        if name in wanted and not is_quantized_experts(experts):
            _register_layout(experts, spec, experts.gate_up_proj.device)


def after_from_pretrained(model: nn.Module) -> nn.Module:
    """Called at the end of `from_pretrained`: under a 4-bit `BitsAndBytesConfig`, finish and record the experts
    packed while the full-precision checkpoint loaded (`plan_pack_on_load`), and switch off bitsandbytes' lossy CPU
    repacking (see `disable_cpu_weight_repacking`)."""
    quantizer = getattr(model, "hf_quantizer", None)
    quantization_config = getattr(quantizer, "quantization_config", None)
    if quantizer is None or not is_4bit_config(quantization_config):
        return model
    if not getattr(model.config, CONFIG_KEY, None) and not _finish_pack_on_load(model):
        # NOTE: only when the stacks could not be packed as they loaded (`plan_pack_on_load` declined): this raises
        # the clear error for what the plan refused, or packs after the load (peak: the whole float model).
        quantize_experts(model, quantization_config)
    for _, experts in _experts_modules(model):
        if is_quantized_experts(experts):
            mark_logical_shapes(experts)
    disable_cpu_weight_repacking(model)
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Back to full precision in place: experts unpacked into float parameters, `Linear4bit` layers into
    `nn.Linear` (transformers' `dequantize`), the quantization records removed. Lossless with respect to the 4-bit
    model (the values it computed with), not to the model before quantization."""
    for _, experts in _experts_modules(model):
        if not is_quantized_experts(experts):
            continue
        target = dtype or _dtype(experts.quant_spec["compute_dtype"])
        weights = {name: dequantize_experts(experts, name, target) for name in EXPERT_PARAMS}
        for key in [k for k in list(experts._buffers) if k.startswith(EXPERT_PARAMS)]:
            del experts._buffers[key]
        for name, value in weights.items():  # in place: the parameter order is PEFT's wrapper nesting (see above)
            experts._parameters[name] = nn.Parameter(value)
        experts.quant_spec = None
    if getattr(model, "hf_quantizer", None) is not None:
        from transformers.integrations.bitsandbytes import dequantize_and_replace

        dequantize_and_replace(model, quantization_config=model.hf_quantizer.quantization_config, dtype=dtype)
        model.hf_quantizer = None
        model.is_loaded_in_4bit = False
    config = _model_config(model)
    for key in (CONFIG_KEY, "quantization_config"):
        if config is not None and hasattr(config, key):
            delattr(config, key)
    return model


# ---------------------------------------------------------------------------------------------------------- QLoRA
_PARAM_WRAPPER_4BIT = None


def _param_wrapper_4bit_class():
    """`ParamWrapper4bit`, built on first use (peft is imported lazily)."""
    global _PARAM_WRAPPER_4BIT
    if _PARAM_WRAPPER_4BIT is not None:
        return _PARAM_WRAPPER_4BIT
    ParamWrapper = importlib.import_module("peft.tuners.lora.layer").ParamWrapper

    class _LogicalParam:
        """What PEFT reads of a targeted parameter (shape, dtype, device), for the packed one: the expert shape."""

        def __init__(self, shape, dtype, device):
            self.shape, self.dtype, self.device = torch.Size(shape), dtype, device

    class ParamWrapper4bit(ParamWrapper):
        """PEFT's `ParamWrapper` for a 4-bit expert stack: same adapters (names, shapes, init, scaling), applied per
        active expert by `quantized_experts_forward` instead of as a parametrization of the whole stack."""

        def get_param(self):
            experts = self.get_base_layer()
            if not is_quantized_experts(experts):
                return super().get_param()
            out_dim, in_dim = _expert_shapes(experts)[self.parameter_name]
            compute = _dtype(experts.quant_spec["compute_dtype"])
            device = experts._parameters[self.parameter_name].device
            return _LogicalParam((experts.num_experts, out_dim, in_dim), compute, device)

        @contextlib.contextmanager
        def _activate_lora(self, active_adapters):
            experts = self.get_base_layer()
            adapters = [a for a in active_adapters if a in self.lora_A]
            if not adapters or not is_quantized_experts(experts):
                with super()._activate_lora(active_adapters):
                    yield
                return
            factors = experts.__dict__.setdefault("_lora_factors", {})
            previous = factors.get(self.parameter_name)
            factors[self.parameter_name] = [self.get_delta_factors(a) for a in adapters]
            try:
                yield
            finally:
                if previous is None:
                    factors.pop(self.parameter_name, None)
                else:
                    factors[self.parameter_name] = previous

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            if is_quantized_experts(self.get_base_layer()):
                raise ValueError(
                    "merging LoRA into 4-bit experts would re-quantize them (and lose the adapter's update to the "
                    "rounding): load the base model in full precision, PeftModel.from_pretrained(base, adapter_dir), "
                    "then merge_and_unload()"
                )
            super().merge(safe_merge, adapter_names)

    # NOTE: PEFT recognises an existing wrapper (to nest the second parameter of the same experts module) by the class
    # name "ParamWrapper", not by isinstance.
    ParamWrapper4bit.__name__ = ParamWrapper4bit.__qualname__ = "ParamWrapper"
    _PARAM_WRAPPER_4BIT = ParamWrapper4bit
    return ParamWrapper4bit


def adopt_lora_wrapper(module: nn.Module) -> None:
    """Called by `SparseMoEBlock.__setattr__` whenever its `experts` is assigned: PEFT installs its LoRA layers with
    `setattr(parent, name, wrapper)`, through every door. A (possibly nested) PEFT `ParamWrapper` around 4-bit experts
    becomes `ParamWrapper4bit`: the same object and adapters (PEFT built them from the logical shapes,
    `mark_logical_shapes`), applied per active expert instead of as a parametrization of the packed uint8 tensor (which
    torch refuses: "may not change the dtype"). Anything else is left alone."""
    chain = []
    while type(module).__name__ == "ParamWrapper" and hasattr(module, "parameter_name"):
        chain.append(module)
        module = module.base_layer
    if not chain or not is_quantized_experts(module):
        return
    wrapper_class = _param_wrapper_4bit_class()
    for wrapper in chain:
        if isinstance(wrapper, wrapper_class):
            continue
        out_dim, in_dim = _expert_shapes(module)[wrapper.parameter_name]
        if (wrapper.num_experts, wrapper.in_features, wrapper.out_features) != (module.num_experts, in_dim, out_dim):
            raise ValueError(
                f"PEFT sized the LoRA adapter of the 4-bit experts' {wrapper.parameter_name} from its packed storage "
                f"({wrapper.num_experts} x {wrapper.in_features} -> {wrapper.out_features}) instead of the expert shape "
                f"({module.num_experts} x {in_dim} -> {out_dim}): the experts were re-packed outside this package. "
                "Call modeling_sparse_moe.quantization.mark_logical_shapes(experts) on each experts module before "
                "adding the adapter."
            )
        wrapper.__class__ = wrapper_class


def with_quantized_experts(lora_config):
    """Kept for compatibility: returns `lora_config` unchanged. A plain `LoraConfig(target_parameters=
    ['experts.gate_up_proj', 'experts.down_proj'])` trains adapters on 4-bit experts through PEFT's and transformers'
    own doors (`adopt_lora_wrapper`)."""
    return lora_config


__all__ = [
    "CONFIG_KEY",
    "dequantize_expert",
    "dequantize_experts",
    "dequantize_model",
    "disable_cpu_weight_repacking",
    "expert_bytes",
    "is_quantized_experts",
    "mark_logical_shapes",
    "quantize_experts",
    "quantize_model",
    "quantized_experts_forward",
    "adopt_lora_wrapper",
    "with_quantized_experts",
]
