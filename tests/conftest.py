import os

import pytest
import torch

import modeling_sparse_moe  # noqa: F401  (registers the Auto classes)
from modeling_sparse_moe import SparseMoEConfig

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_config(**overrides) -> SparseMoEConfig:
    """A 2-layer, 4-expert model small enough for CPU unit tests."""
    kwargs = dict(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        moe_intermediate_size=24,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,
    )
    kwargs.update(overrides)
    return SparseMoEConfig(**kwargs)


@pytest.fixture
def config():
    return tiny_config()


def misalign_(model: torch.nn.Module, offset_bytes: int = 8, nudge: bool = False) -> torch.nn.Module:
    """Re-allocate every floating-point parameter and buffer of `model` so that its data starts `offset_bytes` past
    a 64-byte boundary, in place, values unchanged.

    NOTE: `from_pretrained` leaves weights in the memory-mapped safetensors file at whatever offset the header gives
    (seen: 8, 40, 56 mod 64), and some CPUs' BLAS (AMD EPYC, seen) then pick other kernels than for the 64-byte
    aligned tensors torch allocates: identical weights, outputs that differ in the last fp32 bits. Comparisons of a
    reloaded or converted model run on such a copy, so that CI's machine sees what those CPUs see. With `nudge`, every
    value also moves by one ulp (towards +inf): that changes outputs on every CPU by about what another BLAS kernel
    does, so a comparison that demands bitwise equality fails here too instead of only on users' machines."""
    seen: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in list(store.items()):
                if tensor is None or not tensor.is_floating_point():
                    continue
                if id(tensor) in seen:  # tied weights stay tied
                    moved = seen[id(tensor)]
                else:
                    size = tensor.element_size()
                    assert offset_bytes % size == 0, "offset must be a whole number of elements"
                    raw = torch.empty(tensor.numel() + 128 // size, dtype=tensor.dtype, device=tensor.device)
                    start = ((offset_bytes - raw.data_ptr() % 64) % 64) // size
                    moved = raw[start : start + tensor.numel()].view(tensor.shape).copy_(tensor.detach())
                    if nudge:
                        moved.copy_(torch.nextafter(moved, torch.full_like(moved, float("inf"))))
                    assert moved.data_ptr() % 64 == offset_bytes
                    seen[id(tensor)] = moved
                if isinstance(tensor, torch.nn.Parameter):
                    tensor.data = moved
                else:
                    store[name] = moved
    return model


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Outputs of two copies of the same weights (a reload, a conversion, another implementation of the same
    numerics). NOTE: bitwise equality is not guaranteed across CPUs: BLAS kernels chosen by CPU model and memory
    alignment sum in different orders, which moves fp32 results by a few ulps per layer. torch's fp32 defaults
    (rtol 1.3e-6, atol 1e-5) cover that for the tiny models here; a wrong weight or mapping is off by far more."""
    torch.testing.assert_close(actual, expected, rtol=1.3e-6, atol=1e-5)


def pytest_collection_modifyitems(config, items):
    """Engine checks build llama.cpp and install vLLM into their own environments (tens of minutes, network to the
    package registries): the default run skips them; `SPARSE_MOE_ENGINE_CHECKS=1 python -m pytest -m engines` runs them."""
    if os.environ.get("SPARSE_MOE_ENGINE_CHECKS") == "1":
        return
    skip = pytest.mark.skip(reason="engine check: set SPARSE_MOE_ENGINE_CHECKS=1 to run")
    for item in items:
        # NOTE: the marker, not `item.keywords`: keywords also hold the names of the folders above the test, so a
        # checkout in a folder named "engines" would skip every test.
        if item.get_closest_marker("engines") is not None:
            item.add_marker(skip)
