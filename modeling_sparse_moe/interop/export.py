# Copyright 2026 The sparse-moe authors. Licensed under the Apache License, Version 2.0.
"""Serving export: a trained SparseMoE folder becomes what serving engines load.

    export_for_serving(src, dst)             SparseMoE folder (or LoRA adapter + base) -> folder of the transformers
                                             family that holds it exactly (Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE /
                                             GLM-4-MoE), tokenizer, chat template and generation config included;
                                             optionally a GGUF file beside it
    pick_family(config)                      the first family in `FAMILY_PREFERENCE` that holds `config`, or a
                                             `ValueError` with every family's reasons and the nearest settings
    write_gguf(model, path, family, tok)     a GGUF file (f32 / f16 / q8_0) in the llama.cpp architecture of `family`
    gguf_tokenizer_fields(tokenizer, n)      the `tokenizer.ggml.*` fields of a byte-level BPE tokenizer
    quantize_gguf(src, dst, "Q4_K_M")        k-quants through llama.cpp (llama-cpp-python or `llama-quantize`)

Not Hub-facing: it may import anything installed (`gguf` and `peft` lazily).

GGUF layout (what llama.cpp's `convert_hf_to_gguf.py` writes for these families): experts stacked per layer as
`blk.{i}.ffn_{gate,up,down}_exps.weight` (E, F, D) / (E, D, F), the router `blk.{i}.ffn_gate_inp.weight` kept in fp32 as
our routing runs in fp32, norms and biases in fp32. Mixtral runs as llama.cpp's `llama` architecture, whose RoPE rotates
interleaved pairs (GPT-J style), so q/k rows are permuted from transformers' half-split order; the other architectures
use transformers' order (NeoX style) and take q/k as they are.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

from transformers import GenerationConfig, PreTrainedTokenizerFast
from transformers.utils import logging

from ..configuration_sparse_moe import SparseMoEConfig
from .conversion import convert_folder, to_hf
from .families import (
    FAMILY_PREFERENCE,
    GGUF_ARCHITECTURES,
    MOE_FAMILIES,
    _glm4_moe_shared_count,
    _load_config,
    family_problems,
    gguf_problems,
    pick_family,
)
from .safetensors_io import _atomic_output_dir, _SafetensorsFolder, _StateDictSource


logger = logging.get_logger(__name__)

GGUF_TYPES = ("f32", "f16", "q8_0")  # written here, in Python
LLAMA_QUANTIZE_TYPES = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q4_0")  # need llama.cpp's quantizer (k-quants have no Python one)
TOKENIZER_FILES = ("tokenizer.json",)
# Generation settings that transformers' `generate()` applies and the serving engines (vLLM, llama.cpp) have no setting
# for: a shipped generation_config.json that carries them answers differently in transformers than in the engines.
# They stay in the recipes' evaluation flags (`--no_repeat_ngram_size`) and the model card says how to apply them.
ENGINE_UNSUPPORTED_GENERATION = ("no_repeat_ngram_size",)
# The one BPE pre-tokenisation llama.cpp knows that our tokenizers use: GPT-2's ByteLevel regex, no prefix space.
GGUF_PRE_TOKENIZER = "gpt-2"


@dataclasses.dataclass
class ExportResult:
    """What `export_for_serving` wrote."""

    folder: Path
    family: str
    gguf: Path | None = None
    dropped_generation: dict = dataclasses.field(default_factory=dict)  # settings left out of generation_config.json


# =========================================================================================================== export
def export_for_serving(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    family: str = "auto",
    base: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    gguf: str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> ExportResult:
    """Write DST: the transformers-native folder of SRC (a SparseMoE folder, or a PEFT LoRA adapter folder merged into
    its base on the way) with tokenizer, chat template and generation config, loadable by plain
    `AutoModelForCausalLM`/`AutoTokenizer`, vLLM and SGLang. With `gguf` ("f16", "q8_0", "f32", or a llama.cpp
    k-quant such as "Q4_K_M"), also `DST/model-<type>.gguf` for llama.cpp.

    `family="auto"` picks the first family of `FAMILY_PREFERENCE` that holds the model (and, with `gguf`, whose
    llama.cpp architecture runs it). `base` is the base model folder of an adapter (default: the adapter config's
    `base_model_name_or_path`); `tokenizer` a folder to take the tokenizer from when SRC has none. Errors are
    `ValueError`s raised before anything is written; DST is built in a temporary folder and renamed at the end."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ValueError(f"{src} is not a folder; expected a SparseMoE model folder or a LoRA adapter folder.")
    _check_output(dst, overwrite)
    if family != "auto" and family not in MOE_FAMILIES:
        raise ValueError(f"family must be 'auto' or one of {MOE_FAMILIES}, got {family!r}.")
    gguf_type = _check_gguf_type(gguf)
    if gguf_type in LLAMA_QUANTIZE_TYPES:
        _llama_quantizer(gguf_type)  # refuse now, not after writing the f16 file
    adapter = (src / "adapter_config.json").is_file()
    if adapter:
        base = _adapter_base(src, base)
    elif base is not None:
        raise ValueError(f"--base is for adapter folders, but {src} has no adapter_config.json.")
    model_folder = Path(base) if adapter else src
    config = _load_config(model_folder)
    if not isinstance(config, SparseMoEConfig):
        raise ValueError(
            f"{model_folder} is a {config.model_type} folder, not SparseMoE: it is already in a transformers family."
        )
    candidates = [Path(tokenizer)] if tokenizer else [src, model_folder] if adapter else [src]
    tokenizer_folder = _tokenizer_folder(candidates)

    merged = _merge_adapter(model_folder, src) if adapter else None
    with _tensors(model_folder, merged) as source:
        if family == "auto":
            family = pick_family(config, source, gguf=gguf_type is not None)
        problems = family_problems(config, family, source) + (gguf_problems(config, family) if gguf_type else [])
        if problems:
            raise ValueError(f"Cannot export this SparseMoE model as {family}{' GGUF' if gguf_type else ''}:\n"
                             + _bullets(problems))
    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_folder)
    if gguf_type is not None:
        gguf_tokenizer_fields(tok, config.vocab_size)  # refuse an unconvertible tokenizer before writing anything

    with _atomic_output_dir(dst, overwrite) as tmp:
        if merged is None:
            convert_folder(src, tmp, to=family, max_shard_size=max_shard_size, overwrite=True)
        else:
            to_hf(merged, family).save_pretrained(tmp, max_shard_size=max_shard_size)
            _copy_generation_config(src, model_folder, tmp)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            (tmp / name).unlink(missing_ok=True)  # one tokenizer, saved below, whichever folder it came from
        tok.save_pretrained(tmp)
        if not (tmp / "generation_config.json").is_file():
            GenerationConfig.from_model_config(_load_config(tmp)).save_pretrained(tmp)
        dropped = portable_generation_config(tmp)
        if dropped:
            logger.warning(f"export: generation_config.json leaves out {dropped} (vLLM and llama.cpp have no such "
                           "setting); pass it to generate() to decode as the recipe scored (docs/serving.md)")
        gguf_path = None
        if gguf_type is not None:
            with _tensors(model_folder, merged) as source:
                written = "f16" if gguf_type in LLAMA_QUANTIZE_TYPES else gguf_type
                gguf_path = tmp / f"model-{written}.gguf"
                write_gguf(source, gguf_path, family, tok, config=config, outtype=written, name=dst.name)
            if gguf_type in LLAMA_QUANTIZE_TYPES:
                quantized = tmp / f"model-{gguf_type}.gguf"
                quantize_gguf(gguf_path, quantized, gguf_type)
                gguf_path = quantized
        _umask_permissions(tmp)
    return ExportResult(dst, family, dst / gguf_path.name if gguf_path is not None else None, dropped)


def _umask_permissions(folder: Path) -> None:
    """The permissions a plain `mkdir`/`open` would give: the temporary folder is private (0700) and some writers make
    private files, but a served folder is often read by another user (a container, a server account)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _bullets(problems: list[str]) -> str:
    return "\n".join(f"  - {problem}" for problem in problems)


def _check_output(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())) and not overwrite:
        raise ValueError(f"{dst} already exists; choose a new folder or pass overwrite=True (--overwrite).")


def _check_gguf_type(gguf: str | None) -> str | None:
    if gguf is None:
        return None
    if gguf.lower() in GGUF_TYPES:
        return gguf.lower()
    if gguf.upper() in LLAMA_QUANTIZE_TYPES:
        return gguf.upper()
    raise ValueError(f"gguf must be one of {GGUF_TYPES} (written in Python) or {LLAMA_QUANTIZE_TYPES} (llama.cpp's "
                     f"quantizer), got {gguf!r}.")


def _adapter_base(adapter: Path, base) -> Path:
    """The base model folder of a PEFT adapter: `base`, else the adapter config's `base_model_name_or_path`."""
    named = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    candidate = Path(base) if base is not None else (Path(named) if named else None)
    if candidate is None or not (candidate / "config.json").is_file():
        where = f"its adapter_config.json names {named!r}, which is not a local model folder" if base is None else (
            f"--base {base} has no config.json")
        raise ValueError(f"{adapter} is a LoRA adapter without its base model ({where}); pass the base SparseMoE "
                         "folder it was trained on with --base PATH (base=...).")
    return candidate


def _merge_adapter(base: Path, adapter: Path):
    """The base model with the LoRA adapter merged into its weights (PEFT's `merge_and_unload`)."""
    from peft import PeftModel

    from ..modeling_sparse_moe import SparseMoEForCausalLM

    model = SparseMoEForCausalLM.from_pretrained(base)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()


def _tokenizer_folder(candidates: list[Path]) -> Path:
    for folder in candidates:
        if all((folder / name).is_file() for name in TOKENIZER_FILES):
            return folder
    names = ", ".join(str(folder) for folder in candidates)
    raise ValueError(f"No tokenizer (tokenizer.json) in {names}: serving needs one. Save it into the model folder "
                     "with tokenizer.save_pretrained(FOLDER), or pass --tokenizer FOLDER (tokenizer=...).")


def portable_generation_config(folder: str | os.PathLike) -> dict:
    """Rewrite `folder`/generation_config.json without the `ENGINE_UNSUPPORTED_GENERATION` settings, so that
    transformers, vLLM and llama.cpp decode the folder alike; returns the settings left out ({name: value}), empty
    when there is no file or nothing to leave out."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    fields = json.loads(path.read_text())
    dropped = {name: fields.pop(name) for name in ENGINE_UNSUPPORTED_GENERATION if fields.get(name)}
    if dropped:
        path.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    return dropped


def _copy_generation_config(*folders_then_dst: Path) -> None:
    *folders, dst = folders_then_dst
    for folder in folders:
        if (folder / "generation_config.json").is_file():
            shutil.copy2(folder / "generation_config.json", dst / "generation_config.json")
            return


def _tensors(folder: Path, merged_model):
    """The SparseMoE tensors to export: the merged model's, or the folder's read one at a time."""
    if merged_model is not None:
        return contextlib.nullcontext(_StateDictSource(merged_model.state_dict()))
    return _SafetensorsFolder(folder)


# ============================================================================================================== GGUF
def gguf_tokenizer_fields(tokenizer: PreTrainedTokenizerFast, vocab_size: int) -> dict:
    """The `tokenizer.ggml.*` fields of a byte-level BPE tokenizer, padded to the model's `vocab_size` rows:
    `model` "gpt2", `pre` "gpt-2", `tokens`, `token_type`, `merges`, special ids, add-bos/eos flags and the chat
    template. `ValueError` when llama.cpp would split text differently (another pre-tokenizer or normalizer)."""
    import gguf

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre, normalizer = state["model"], state.get("pre_tokenizer"), state.get("normalizer")
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"model {model.get('type')!r}: only byte-level BPE is written")
    if not _is_gpt2_byte_level(pre):
        problems.append(f"pre_tokenizer {json.dumps(pre)}: llama.cpp's {GGUF_PRE_TOKENIZER!r} pre-tokenizer is "
                        "ByteLevel(add_prefix_space=False, use_regex=True) (what data.train_tokenizer builds)")
    if normalizer is not None and normalizer.get("type") != "NFC":
        problems.append(f"normalizer {normalizer.get('type')!r}: llama.cpp does not normalise text")
    if len(tokenizer) > vocab_size:
        problems.append(f"{len(tokenizer)} tokens but the model has vocab_size={vocab_size} rows")
    if problems:
        raise ValueError("This tokenizer cannot be written to GGUF exactly:\n" + _bullets(problems))
    if normalizer is not None:  # NFC
        logger.info("The tokenizer NFC-normalises its input and llama.cpp does not: text already in NFC (nearly all "
                    "text) tokenizes identically.")

    vocab = tokenizer.get_vocab()
    by_id = {index: token for token, index in vocab.items()}
    added = {entry["id"]: entry for entry in state.get("added_tokens", [])}
    tokens, types = [], []
    for index in range(vocab_size):
        if index in by_id:
            tokens.append(by_id[index])
            entry = added.get(index)
            kind = gguf.TokenType.NORMAL if entry is None else (
                gguf.TokenType.CONTROL if entry.get("special") else gguf.TokenType.USER_DEFINED)
        else:  # rows of the embedding past the tokenizer's vocabulary
            tokens.append(f"[PAD{index}]")
            kind = gguf.TokenType.UNUSED
        types.append(int(kind))
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    fields = {
        "model": "gpt2",
        "pre": GGUF_PRE_TOKENIZER,
        "tokens": tokens,
        "token_type": types,
        "merges": merges,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "unknown_token_id": tokenizer.unk_token_id,
        "padding_token_id": tokenizer.pad_token_id,
        "add_bos_token": len(probe) > len(plain) and probe[0] == tokenizer.bos_token_id,
        "add_eos_token": len(probe) > len(plain) and probe[-1] == tokenizer.eos_token_id,
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    }
    return fields


def _is_gpt2_byte_level(pre) -> bool:
    if pre is not None and pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    return (
        pre is not None
        and pre.get("type") == "ByteLevel"
        and not pre.get("add_prefix_space", False)
        and pre.get("use_regex", True)
    )


def write_gguf(
    model_or_source,
    path: str | os.PathLike,
    family: str,
    tokenizer: PreTrainedTokenizerFast,
    *,
    config: SparseMoEConfig | None = None,
    outtype: str = "f16",
    name: str | None = None,
) -> Path:
    """Write a GGUF file of a SparseMoE model (a `SparseMoEForCausalLM`, or a tensor source with `config`) in the
    llama.cpp architecture of `family`. `outtype`: "f16" (default), "q8_0" (2D weights whose rows split into
    32-blocks; others f16) or "f32"; norms, biases and routers stay fp32. Raises a `ValueError` for what the family
    or its llama.cpp graph cannot hold, or a tokenizer llama.cpp would split differently. The file is written next
    to `path` and renamed at the end."""
    import gguf

    if family not in GGUF_ARCHITECTURES:
        raise ValueError(f"family must be one of {tuple(GGUF_ARCHITECTURES)}, got {family!r}.")
    if outtype not in GGUF_TYPES:
        raise ValueError(f"outtype must be one of {GGUF_TYPES}, got {outtype!r}.")
    if config is None:
        config, source = model_or_source.config, _StateDictSource(model_or_source.state_dict())
    else:
        source = model_or_source
    problems = family_problems(config, family, source) + gguf_problems(config, family)
    if problems:
        raise ValueError(f"Cannot write this SparseMoE model as a {family} GGUF:\n" + _bullets(problems))
    token_fields = gguf_tokenizer_fields(tokenizer, config.vocab_size)

    path = Path(path)
    arch = GGUF_ARCHITECTURES[family]
    partial = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(partial, arch, use_temp_file=True)
    try:
        _write_gguf_metadata(writer, config, family, arch, outtype, name or path.stem)
        _write_gguf_tokenizer(writer, token_fields)
        for gguf_name, tensor in _gguf_tensors(config, family, source):
            _add_gguf_tensor(writer, gguf_name, tensor, outtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=True)
        writer.close()
        partial.rename(path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return path


_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # gguf.LlamaFileType: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0


def _write_gguf_metadata(writer, config: SparseMoEConfig, family: str, arch: str, outtype: str, name: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_file_type(_FILE_TYPES[outtype])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    # `feed_forward_length` is the expert width where the architecture has no separate key for it.
    dense_width = config.moe_intermediate_size if arch in ("llama", "olmoe") else config.intermediate_size
    writer.add_feed_forward_length(dense_width)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    rope = config.rope_parameters or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", SparseMoEConfig.default_theta)))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    if arch in ("qwen2moe", "qwen3moe", "glm4moe"):
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if arch == "qwen2moe":
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    if arch == "glm4moe":
        writer.add_expert_shared_count(_glm4_moe_shared_count(config))
        writer.add_leading_dense_block_count(min(config.first_k_dense_replace, config.num_hidden_layers))
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        writer.add_expert_weights_scale(float(config.routed_scaling_factor))
        writer.add_expert_weights_norm(bool(config.norm_topk_prob))
        writer.add_nextn_predict_layers(0)
        if config.n_group > 1 and config.topk_group < config.n_group:
            # NOTE: read by every architecture in llama.cpp's hparams loader; `build_moe_ffn` then scores each group by
            # its top-2 biased scores and keeps the best `topk_group`, as our router does.
            writer.add_expert_group_count(config.n_group)
            writer.add_expert_group_used_count(config.topk_group)


def _write_gguf_tokenizer(writer, fields: dict) -> None:
    writer.add_tokenizer_model(fields["model"])
    writer.add_tokenizer_pre(fields["pre"])
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["token_type"])
    writer.add_token_merges(fields["merges"])
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("unknown_token_id", writer.add_unk_token_id), ("padding_token_id", writer.add_pad_token_id)):
        if fields[key] is not None:
            add(fields[key])
    writer.add_add_bos_token(fields["add_bos_token"])
    writer.add_add_eos_token(fields["add_eos_token"])
    if fields["chat_template"]:
        writer.add_chat_template(fields["chat_template"])


def _gguf_tensors(config: SparseMoEConfig, family: str, source):
    """(GGUF name, fp32 tensor) pairs, read one at a time from `source` (SparseMoE names, fused experts)."""
    arch = GGUF_ARCHITECTURES[family]
    get = lambda key: source.get(key).float()  # noqa: E731
    yield "token_embd.weight", get("model.embed_tokens.weight")
    yield "output_norm.weight", get("model.norm.weight")
    # NOTE: always written, tied or not: some architectures (qwen2moe, olmoe) require the output matrix.
    yield "output.weight", get("lm_head.weight" if "lm_head.weight" in source else "model.embed_tokens.weight")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for i in range(config.num_hidden_layers):
        layer, blk = f"model.layers.{i}", f"blk.{i}"
        yield f"{blk}.attn_norm.weight", get(f"{layer}.input_layernorm.weight")
        post_norm = "post_attention_norm" if arch == "glm4moe" else "ffn_norm"
        yield f"{blk}.{post_norm}.weight", get(f"{layer}.post_attention_layernorm.weight")
        for ours, theirs, n_head in (("q_proj", "attn_q", heads), ("k_proj", "attn_k", kv_heads),
                                     ("v_proj", "attn_v", None), ("o_proj", "attn_output", None)):
            for kind in ("weight", "bias"):
                key = f"{layer}.self_attn.{ours}.{kind}"
                if key in source:
                    tensor = get(key)
                    if arch == "llama" and n_head is not None:
                        tensor = _interleave_rope_rows(tensor, n_head)
                    yield f"{blk}.{theirs}.{kind}", tensor
                elif arch == "qwen2moe" and kind == "bias" and ours != "o_proj":
                    # NOTE: llama.cpp releases before its `create_tensor_qkv` refactor require qwen2moe's q/k/v biases;
                    # zeros are exact.
                    weight = source.get(f"{layer}.self_attn.{ours}.weight")
                    yield f"{blk}.{theirs}.bias", torch.zeros(weight.shape[0])
        for ours, theirs in (("q_norm", "attn_q_norm"), ("k_norm", "attn_k_norm")):
            if f"{layer}.self_attn.{ours}.weight" in source:
                yield f"{blk}.{theirs}.weight", get(f"{layer}.self_attn.{ours}.weight")
        mlp = f"{layer}.mlp"
        if not config.is_moe_layer(i):
            for proj, theirs in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
                yield f"{blk}.{theirs}.weight", get(f"{mlp}.{proj}.weight")
            continue
        yield f"{blk}.ffn_gate_inp.weight", get(f"{mlp}.gate.weight")
        if arch == "glm4moe":
            yield f"{blk}.exp_probs_b.bias", get(f"{mlp}.gate.e_score_correction_bias")
        gate_up = get(f"{mlp}.experts.gate_up_proj")  # (E, 2F, D)
        width = gate_up.shape[1] // 2
        yield f"{blk}.ffn_gate_exps.weight", gate_up[:, :width].contiguous()
        yield f"{blk}.ffn_up_exps.weight", gate_up[:, width:].contiguous()
        del gate_up
        yield f"{blk}.ffn_down_exps.weight", get(f"{mlp}.experts.down_proj")
        if config.num_shared_experts > 0:
            for proj, theirs in (("gate_proj", "ffn_gate_shexp"), ("up_proj", "ffn_up_shexp"),
                                 ("down_proj", "ffn_down_shexp")):
                yield f"{blk}.{theirs}.weight", get(f"{mlp}.shared_experts.{proj}.weight")
        elif arch == "glm4moe":  # glm4moe's graph always adds a shared expert: an all-zero one adds exactly 0
            width, hidden = config.moe_intermediate_size, config.hidden_size
            yield f"{blk}.ffn_gate_shexp.weight", torch.zeros(width, hidden)
            yield f"{blk}.ffn_up_shexp.weight", torch.zeros(width, hidden)
            yield f"{blk}.ffn_down_shexp.weight", torch.zeros(hidden, width)
        if config.shared_expert_gate:
            yield f"{blk}.ffn_gate_inp_shexp.weight", get(f"{mlp}.shared_expert_gate.weight").reshape(-1)


def _interleave_rope_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """transformers' rotate-half q/k rows -> the interleaved pairs llama.cpp's `llama` RoPE rotates (the permutation
    llama.cpp's converter applies): within each head, row j of the first half and row j of the second half become
    rows 2j and 2j+1."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


_ALWAYS_F32 = ("_norm.weight", ".bias", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")


def _add_gguf_tensor(writer, name: str, tensor: torch.Tensor, outtype: str) -> None:
    import gguf

    data = tensor.numpy().astype(np.float32)
    if outtype == "f32" or data.ndim == 1 or name.endswith(_ALWAYS_F32):
        writer.add_tensor(name, data)
    elif outtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    elif np.abs(data).max() > np.finfo(np.float16).max:  # a bf16/fp32 value f16 cannot hold: keep it exact
        logger.warning(f"{name}: values beyond float16's range; written in float32.")
        writer.add_tensor(name, data)
    else:
        writer.add_tensor(name, data.astype(np.float16))


def quantize_gguf(src: str | os.PathLike, dst: str | os.PathLike, qtype: str = "Q4_K_M") -> Path:
    """Quantize an f16/f32 GGUF to a llama.cpp k-quant (`gguf` has no Python quantizer for them): through
    llama-cpp-python's `llama_model_quantize` when it is installed, else the `llama-quantize` binary (on PATH or
    `LLAMA_QUANTIZE`). Raises a `ValueError` naming the command to run when neither is available."""
    src, dst = Path(src), Path(dst)
    qtype = qtype.upper()
    if qtype not in LLAMA_QUANTIZE_TYPES:
        raise ValueError(f"qtype must be one of {LLAMA_QUANTIZE_TYPES}, got {qtype!r}.")
    llama_cpp, binary = _llama_quantizer(qtype, src.name, dst.name)
    if llama_cpp is not None:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        if status != 0:
            raise ValueError(f"llama.cpp failed to quantize {src} to {qtype} (status {status}).")
        return dst
    subprocess.run([binary, str(src), str(dst), qtype], check=True, capture_output=True)
    return dst


def _llama_quantizer(qtype: str, src: str = "model-f16.gguf", dst: str | None = None):
    """(llama_cpp module or None, llama-quantize path or None); `ValueError` when neither is available."""
    try:
        import llama_cpp

        return llama_cpp, None
    except ImportError:
        pass
    binary = os.environ.get("LLAMA_QUANTIZE") or shutil.which("llama-quantize")
    if binary is None:
        raise ValueError(
            f"{qtype} needs llama.cpp's quantizer (the gguf package has no Python k-quant quantizer): install "
            "llama-cpp-python, or put llama-quantize on PATH (or LLAMA_QUANTIZE=path), or write --gguf f16 and run: "
            f"llama-quantize {src} {dst or f'model-{qtype}.gguf'} {qtype}"
        )
    return None, binary


__all__ = [
    "FAMILY_PREFERENCE",
    "GGUF_ARCHITECTURES",
    "GGUF_TYPES",
    "ENGINE_UNSUPPORTED_GENERATION",
    "LLAMA_QUANTIZE_TYPES",
    "ExportResult",
    "export_for_serving",
    "pick_family",
    "portable_generation_config",
    "gguf_problems",
    "gguf_tokenizer_fields",
    "write_gguf",
    "quantize_gguf",
]
