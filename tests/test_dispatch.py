"""The "sparse_moe" experts dispatch (moe_dispatch.py) against the eager reference loop, forward and backward.

Every path of the dispatch is covered: the decode plan (all assignments on distinct experts, no sort), the host-side
plan (few assignments sharing experts or dropped), the device sort plan, grouped GEMMs and the per-segment mm loop,
fused and split gate/up products, the no-grad forward (grouped, and expert by expert) and the custom autograd
backward; with random routing, experts that receive no tokens, capacity-dropped assignments (the sentinel index),
odd token counts, fp32 (tight tolerance) and bf16 (loose). Timings live in scripts/bench_moe.py, not here.
"""

import copy

import pytest
import torch
from torch import nn

from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from modeling_sparse_moe import SparseMoEConfig, SparseMoEForCausalLM
from modeling_sparse_moe import moe_dispatch
from modeling_sparse_moe.modeling_sparse_moe import SparseMoEBlock, SparseMoEExperts
from modeling_sparse_moe.moe_dispatch import SPARSE_MOE_EXPERTS, plan_dispatch

from conftest import tiny_config


HIDDEN, FFN, NUM_EXPERTS, TOP_K = 16, 12, 6, 2
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5)}  # bf16 is judged against the reference's own error


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_experts(dtype=torch.float32, hidden_act="silu", num_experts=NUM_EXPERTS, top_k=TOP_K, seed=0, ffn=FFN):
    config = SparseMoEConfig(
        hidden_size=HIDDEN, moe_intermediate_size=ffn, num_experts=num_experts, num_experts_per_tok=top_k,
        num_attention_heads=2, num_key_value_heads=1, hidden_act=hidden_act,
    )
    experts = SparseMoEExperts(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=generator) * 0.5)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=generator) * 0.5)
    return experts.to(dtype)


def random_routing(num_tokens, num_experts=NUM_EXPERTS, top_k=TOP_K, idle=(), drop_fraction=0.0, seed=0):
    """(index_TK, weights_TK): distinct experts per token drawn from the non-idle ones, fp32 weights; a fraction of
    the assignments is marked dropped (index = num_experts, weight 0) as the block does for capacity."""
    generator = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(num_experts) if e not in idle])
    index_TK = torch.stack(
        [allowed[torch.randperm(len(allowed), generator=generator)[:top_k]] for _ in range(num_tokens)]
    )
    weights_TK = torch.rand(num_tokens, top_k, generator=generator) + 0.1
    if drop_fraction:
        dropped_TK = torch.rand(num_tokens, top_k, generator=generator) < drop_fraction
        index_TK = index_TK.masked_fill(dropped_TK, num_experts)
        weights_TK = weights_TK.masked_fill(dropped_TK, 0.0)
    return index_TK, weights_TK


def run(experts, implementation, x_TD, index_TK, weights_TK, grad_TD=None):
    """Output and gradients (x, routing weights, gate_up_proj, down_proj) of one implementation."""
    experts.config._experts_implementation = implementation
    experts.zero_grad(set_to_none=True)
    x_TD = x_TD.detach().clone().requires_grad_(True)
    weights_TK = weights_TK.detach().clone().requires_grad_(True)
    out_TD = experts(x_TD, index_TK, weights_TK)
    if grad_TD is None:
        return (out_TD.detach(),)
    out_TD.backward(grad_TD)
    leaves = (x_TD, weights_TK, experts.gate_up_proj, experts.down_proj)
    # A leaf that no kept assignment reaches gets no gradient from the eager loop: that means zeros.
    grads = tuple(leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves)
    return (out_TD.detach(), *grads)


def relative_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    return ((actual.float() - exact.float()).norm() / exact.float().norm().clamp_min(1e-12)).item()


def assert_as_accurate_as(ours, eager, exact, name, slack=1e-3):
    """bf16 results round differently, element by element, from any other bf16 computation. Hold ours to the
    standard of the reference instead: its error against an fp32 computation on the same bf16 inputs is at most
    twice the eager loop's (plus slack), and small in absolute terms."""
    error_ours, error_eager = relative_error(ours, exact), relative_error(eager, exact)
    assert error_ours <= 2 * error_eager + slack and error_ours < 2e-2, (name, error_ours, error_eager)


def assert_matches_eager(experts, x_TD, index_TK, weights_TK, with_backward=True):
    grad_TD = torch.randn_like(x_TD) if with_backward else None
    reference = run(experts, "eager", x_TD, index_TK, weights_TK, grad_TD)
    ours = run(experts, SPARSE_MOE_EXPERTS, x_TD, index_TK, weights_TK, grad_TD)
    names = ("output", "grad x", "grad routing weights", "grad gate_up_proj", "grad down_proj")
    if x_TD.dtype == torch.bfloat16:
        exact_experts = copy.deepcopy(experts).float()
        exact_grad = None if grad_TD is None else grad_TD.float()
        exact = run(exact_experts, "eager", x_TD.float(), index_TK, weights_TK, exact_grad)
    for i, (name, expected, actual) in enumerate(zip(names, reference, ours)):
        assert actual.dtype == expected.dtype, name
        if x_TD.dtype == torch.bfloat16:
            assert_as_accurate_as(actual, expected, exact[i], name)
        else:
            torch.testing.assert_close(actual, expected, **TOLERANCE[x_TD.dtype], msg=lambda m: f"{name}: {m}")
    return reference, ours


# ------------------------------------------------------------------------------------------------------ registration
def test_registered_and_default():
    assert SPARSE_MOE_EXPERTS == "sparse_moe" and SPARSE_MOE_EXPERTS in ALL_EXPERTS_FUNCTIONS
    model = SparseMoEForCausalLM(tiny_config())
    assert model.config._experts_implementation == "sparse_moe"
    for name in ("eager", "grouped_mm", "batched_mm", "sparse_moe"):
        model.set_experts_implementation(name)
        assert model.config._experts_implementation == name
    explicit = SparseMoEForCausalLM._from_config(tiny_config(), experts_implementation="eager")
    assert explicit.config._experts_implementation == "eager"


# -------------------------------------------------------------------------------------------------------------- plan
def test_plan_decode_keeps_assignment_order():
    plan = plan_dispatch(torch.tensor([[4, 1]]), NUM_EXPERTS)
    assert plan.rows_N is None and plan.segments == ((4, 0, 1), (1, 1, 2))
    assert plan.token_N.tolist() == [0, 0]
    assert plan.idle_experts(NUM_EXPERTS) == [(0, 1), (2, 4), (5, 6)]


def test_plan_host_path_groups_shared_experts_and_skips_dropped():
    index_TK = torch.tensor([[3, 1], [1, NUM_EXPERTS], [3, 0]])  # A = 6 <= E: planned on the host
    plan = plan_dispatch(index_TK, NUM_EXPERTS)
    assert plan.rows_N.tolist() == [5, 1, 2, 0, 4]  # grouped by expert (0, 1, 1, 3, 3), token order inside
    assert plan.token_N.tolist() == [2, 0, 1, 0, 2]
    assert plan.segments == ((0, 0, 1), (1, 1, 3), (3, 3, 5))
    assert plan.idle_experts(NUM_EXPERTS) == [(2, 3), (4, 6)]


def test_plan_device_sort_path_matches_host_path():
    index_TK, _ = random_routing(21, drop_fraction=0.3, seed=3)  # A = 42 > E: sorted on the device
    plan = plan_dispatch(index_TK, NUM_EXPERTS)
    flat = index_TK.reshape(-1).tolist()
    expected_rows = sorted((a for a in range(len(flat)) if flat[a] < NUM_EXPERTS), key=flat.__getitem__)
    assert plan.rows_N.tolist() == expected_rows
    assert plan.token_N.tolist() == [a // TOP_K for a in expected_rows]
    counts = [flat.count(e) for e in range(NUM_EXPERTS)]
    assert [end - start for _, start, end in plan.segments] == [c for c in counts if c]


def record_matmuls(monkeypatch) -> list[tuple[str, int]]:
    """(kernel, rows) of every expert matmul the dispatch runs, grouped or per segment, recorded as they run."""
    calls = []
    real = {"mm": torch.mm, "grouped_mm": torch.nn.functional.grouped_mm}

    def recorder(kind):
        return lambda a, b, **kwargs: calls.append((kind, a.shape[0])) or real[kind](a, b, **kwargs)

    monkeypatch.setattr(moe_dispatch.torch, "mm", recorder("mm"))
    monkeypatch.setattr(moe_dispatch.F, "grouped_mm", recorder("grouped_mm"))
    return calls


def test_all_dropped_computes_nothing(monkeypatch):
    experts = make_experts()
    calls = record_matmuls(monkeypatch)
    index_TK = torch.full((5, TOP_K), NUM_EXPERTS)
    weights_TK = torch.zeros(5, TOP_K)
    x_TD = torch.randn(5, HIDDEN)
    reference, ours = assert_matches_eager(experts, x_TD, index_TK, weights_TK)
    assert sum(rows for _, rows in calls) == 0 and ours[0].abs().max() == 0
    assert ours[3].abs().max() == 0 and ours[4].abs().max() == 0


@pytest.mark.parametrize("num_tokens", [3, 17])  # planned on the host, sorted on the device
@pytest.mark.parametrize("gate_up", ["fused", "split"])
def test_dropped_assignments_are_not_computed(monkeypatch, num_tokens, gate_up):
    """The sentinel rows never reach a matmul: the matmul row count equals the kept assignments."""
    experts = make_experts()
    use_kernels(monkeypatch, "grouped_mm", gate_up)
    calls = record_matmuls(monkeypatch)
    index_TK, weights_TK = random_routing(num_tokens, drop_fraction=0.4, seed=5)
    kept = int((index_TK < NUM_EXPERTS).sum())
    experts.config._experts_implementation = SPARSE_MOE_EXPERTS
    with torch.no_grad():
        experts(torch.randn(num_tokens, HIDDEN), index_TK, weights_TK)
    assert 0 < kept < index_TK.numel()
    projections = 2 if gate_up == "fused" else 3  # gate_up (or gate and up) and down, over the kept rows only
    assert sum(rows for _, rows in calls) == projections * kept


# ------------------------------------------------------------------------------------------- against the reference
def use_kernels(monkeypatch, kernel: str, gate_up: str, segments: str = "short") -> None:
    """Force a code path: the per-segment mm loop (devices / torch versions without a grouped GEMM kernel), the
    split gate/up products (what large token counts get), and "long" segments: every expert gathers its own rows
    before its products (what experts with many rows get)."""
    if kernel == "mm_loop":
        monkeypatch.setattr(moe_dispatch, "_grouped_mm_usable", lambda a, w: False)
    monkeypatch.setattr(moe_dispatch, "FUSED_GATE_UP_MAX_BYTES", 2**62 if gate_up == "fused" else 0)
    monkeypatch.setattr(moe_dispatch, "PIPELINE_MIN_ROWS_PER_EXPERT", 1 if segments == "long" else 2**62)


@pytest.mark.parametrize("num_tokens", [1, 2, 3, 5, 17, 64])
@pytest.mark.parametrize("drop_fraction", [0.0, 0.35])
@pytest.mark.parametrize("kernel", ["grouped_mm", "mm_loop"])
@pytest.mark.parametrize("gate_up", ["fused", "split"])
@pytest.mark.parametrize("segments", ["short", "long"])
def test_matches_eager_fp32(num_tokens, drop_fraction, kernel, gate_up, segments, monkeypatch):
    experts = make_experts()
    calls = record_matmuls(monkeypatch)
    use_kernels(monkeypatch, kernel, gate_up, segments)
    index_TK, weights_TK = random_routing(num_tokens, idle=(2,), drop_fraction=drop_fraction, seed=num_tokens)
    x_TD = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(num_tokens))
    _, ours = assert_matches_eager(experts, x_TD, index_TK, weights_TK)
    # Expert 2 received no tokens: its weight gradients are exactly zero.
    assert ours[3][2].abs().max() == 0 and ours[4][2].abs().max() == 0
    # The decode plan (per-row products) and long segments (per-expert products) never use the grouped kernel.
    grouped = kernel == "grouped_mm" and segments == "short" and plan_dispatch(index_TK, NUM_EXPERTS).rows_N is not None
    assert ("grouped_mm" in {kind for kind, _ in calls}) == grouped


@pytest.mark.parametrize("num_tokens", [1, 3, 17, 64])
@pytest.mark.parametrize("kernel", ["grouped_mm", "mm_loop"])
@pytest.mark.parametrize("segments", ["short", "long"])
def test_matches_eager_bf16(num_tokens, kernel, segments, monkeypatch):
    experts = make_experts(torch.bfloat16, ffn=16)  # bf16 rows of 16 elements: aligned for grouped_mm
    calls = record_matmuls(monkeypatch)
    use_kernels(monkeypatch, kernel, "split" if num_tokens == 64 else "fused", segments)
    index_TK, weights_TK = random_routing(num_tokens, idle=(0, 5), drop_fraction=0.2, seed=num_tokens)
    x_TD = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    _, ours = assert_matches_eager(experts, x_TD, index_TK, weights_TK)
    assert ours[1].dtype == torch.bfloat16 and ours[2].dtype == torch.float32
    grouped = kernel == "grouped_mm" and segments == "short" and plan_dispatch(index_TK, NUM_EXPERTS).rows_N is not None
    assert ("grouped_mm" in {kind for kind, _ in calls}) == grouped


@pytest.mark.parametrize("num_tokens", [1, 3, 40])
@pytest.mark.parametrize("inference_path", ["grouped", "per_expert"])
@pytest.mark.parametrize("drop_fraction", [0.0, 0.3])
def test_matches_eager_no_grad(num_tokens, inference_path, drop_fraction, monkeypatch):
    experts = make_experts()
    calls = record_matmuls(monkeypatch)
    # per_expert: every expert runs start to finish on its own rows (what inference does with long segments)
    monkeypatch.setattr(moe_dispatch, "PIPELINE_MIN_ROWS_PER_EXPERT", 2**62 if inference_path == "grouped" else 1)
    index_TK, weights_TK = random_routing(num_tokens, idle=(1,), drop_fraction=drop_fraction, seed=num_tokens)
    x_TD = torch.randn(num_tokens, HIDDEN)
    with torch.no_grad():
        reference = run(experts, "eager", x_TD, index_TK, weights_TK)[0]
        ours = run(experts, SPARSE_MOE_EXPERTS, x_TD, index_TK, weights_TK)[0]
    torch.testing.assert_close(ours, reference, **TOLERANCE[torch.float32])
    kept = int((index_TK < NUM_EXPERTS).sum())
    sorted_plan = plan_dispatch(index_TK, NUM_EXPERTS).rows_N is not None
    if inference_path == "per_expert" and sorted_plan:
        assert {kind for kind, _ in calls} == {"mm"} and sum(rows for _, rows in calls) == 2 * kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden_act", ["silu", "gelu", "linear"])
@pytest.mark.parametrize("path", ["decode", "short", "long"])
def test_no_grad_paths_dtypes_and_activations(dtype, hidden_act, path, monkeypatch):
    """Inference in every path, fp32 and bf16, SiLU and others ("linear" hands back its input: nothing may write
    into it). "decode" routes 3 tokens to 6 distinct experts, the assignment-order plan with T > 1."""
    use_kernels(monkeypatch, "grouped_mm", "fused", "long" if path == "long" else "short")
    experts = make_experts(dtype, hidden_act=hidden_act, num_experts=8, ffn=16)
    if path == "decode":
        index_TK, weights_TK = torch.tensor([[0, 3], [5, 1], [7, 2]]), torch.rand(3, 2) + 0.1
        assert plan_dispatch(index_TK, 8).rows_N is None
    else:
        index_TK, weights_TK = random_routing(40, num_experts=8, idle=(4,), drop_fraction=0.2, seed=5)
    x_TD = torch.randn(index_TK.shape[0], HIDDEN).to(dtype)
    assert_matches_eager(experts, x_TD, index_TK, weights_TK, with_backward=False)


@pytest.mark.parametrize("segments", ["short", "long"])
def test_fine_grained_many_experts_top8(segments, monkeypatch):
    use_kernels(monkeypatch, "grouped_mm", "fused", segments)
    experts = make_experts(num_experts=64, top_k=8)
    index_TK, weights_TK = random_routing(37, num_experts=64, top_k=8, idle=tuple(range(40, 64)), seed=7)
    assert_matches_eager(experts, torch.randn(37, HIDDEN), index_TK, weights_TK)


def test_top1_switch():
    experts = make_experts(top_k=1)
    index_TK, weights_TK = random_routing(9, top_k=1, drop_fraction=0.3, seed=9)
    assert_matches_eager(experts, torch.randn(9, HIDDEN), index_TK, weights_TK)


@pytest.mark.parametrize("hidden_act", ["gelu", "relu"])
@pytest.mark.parametrize("segments", ["short", "long"])
def test_other_activations_use_the_generic_backward(hidden_act, segments, monkeypatch):
    use_kernels(monkeypatch, "grouped_mm", "split", segments)
    experts = make_experts(hidden_act=hidden_act)
    index_TK, weights_TK = random_routing(13, drop_fraction=0.2, seed=11)
    assert_matches_eager(experts, torch.randn(13, HIDDEN), index_TK, weights_TK)


@pytest.mark.parametrize("segments", ["short", "long"])
def test_partial_requires_grad(segments, monkeypatch):
    """Frozen experts (PEFT) and a frozen router: only the requested gradients are produced, and they match."""
    use_kernels(monkeypatch, "grouped_mm", "fused", segments)
    experts = make_experts()
    experts.requires_grad_(False)
    index_TK, weights_TK = random_routing(11, drop_fraction=0.2, seed=2)
    x_TD = torch.randn(11, HIDDEN)
    grad_TD = torch.randn(11, HIDDEN)
    results = {}
    for implementation in ("eager", SPARSE_MOE_EXPERTS):
        experts.config._experts_implementation = implementation
        x = x_TD.clone().requires_grad_(True)
        experts(x, index_TK, weights_TK).backward(grad_TD)
        results[implementation] = x.grad
        assert experts.gate_up_proj.grad is None and experts.down_proj.grad is None
    torch.testing.assert_close(results[SPARSE_MOE_EXPERTS], results["eager"], **TOLERANCE[torch.float32])

    for implementation in ("eager", SPARSE_MOE_EXPERTS):  # only the routing weights (a router-only fine-tune)
        experts.config._experts_implementation = implementation
        weights = weights_TK.clone().requires_grad_(True)
        experts(x_TD, index_TK, weights).backward(grad_TD)
        results[implementation] = weights.grad
    assert results[SPARSE_MOE_EXPERTS].abs().sum() > 0
    torch.testing.assert_close(results[SPARSE_MOE_EXPERTS], results["eager"], **TOLERANCE[torch.float32])

    experts.requires_grad_(True)
    for implementation in ("eager", SPARSE_MOE_EXPERTS):  # only the weights want gradients
        experts.config._experts_implementation = implementation
        experts.zero_grad(set_to_none=True)
        experts(x_TD, index_TK, weights_TK).backward(grad_TD)
        results[implementation] = (experts.gate_up_proj.grad, experts.down_proj.grad)
    for ours, reference in zip(results[SPARSE_MOE_EXPERTS], results["eager"]):
        torch.testing.assert_close(ours, reference, **TOLERANCE[torch.float32])


def test_deterministic():
    experts = make_experts()
    index_TK, weights_TK = random_routing(33, drop_fraction=0.2, seed=4)
    x_TD, grad_TD = torch.randn(33, HIDDEN), torch.randn(33, HIDDEN)
    first = run(experts, SPARSE_MOE_EXPERTS, x_TD, index_TK, weights_TK, grad_TD)
    second = run(experts, SPARSE_MOE_EXPERTS, x_TD, index_TK, weights_TK, grad_TD)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("segments", ["short", "long"])
def test_autocast_bf16_matches_eager(segments, monkeypatch):
    """Under CPU autocast the experts run in bf16 (the eager loop itself cannot: its fp32 buffer rejects bf16 rows)."""
    use_kernels(monkeypatch, "grouped_mm", "fused", segments)
    experts = make_experts()
    index_TK, weights_TK = random_routing(19, drop_fraction=0.2, seed=6)
    x_TD, grad_TD = torch.randn(19, HIDDEN), torch.randn(19, HIDDEN)
    exact = run(experts, "eager", x_TD, index_TK, weights_TK, grad_TD)
    experts_bf16 = copy.deepcopy(experts).bfloat16()
    eager_bf16 = run(experts_bf16, "eager", x_TD.bfloat16(), index_TK, weights_TK, grad_TD.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = run(experts, SPARSE_MOE_EXPERTS, x_TD, index_TK, weights_TK, grad_TD)
    assert ours[0].dtype == torch.float32 and ours[3].dtype == torch.float32  # output and grads keep fp32
    names = ("output", "grad x", "grad routing weights", "grad gate_up_proj", "grad down_proj")
    for name, actual, expected, reference in zip(names, ours, exact, eager_bf16):
        assert_as_accurate_as(actual, reference, expected, name)


def test_zero_tokens():
    experts = make_experts()
    experts.config._experts_implementation = SPARSE_MOE_EXPERTS
    out = experts(torch.randn(0, HIDDEN), torch.zeros(0, TOP_K, dtype=torch.long), torch.zeros(0, TOP_K))
    assert out.shape == (0, HIDDEN)


# ----------------------------------------------------------------------------------------------------- whole model
def _copy_model(model, implementation):
    twin = SparseMoEForCausalLM._from_config(copy.deepcopy(model.config), experts_implementation=implementation)
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_causal_lm_logits_and_grads_match_eager(capacity_factor):
    torch.manual_seed(0)
    config = tiny_config(capacity_factor=capacity_factor, num_experts=6, num_shared_experts=1)
    reference = SparseMoEForCausalLM._from_config(config, experts_implementation="eager")
    ours = _copy_model(reference, SPARSE_MOE_EXPERTS)
    assert ours.config._experts_implementation == SPARSE_MOE_EXPERTS
    assert reference.config._experts_implementation == "eager"
    ids = torch.randint(3, config.vocab_size, (2, 11))
    results = {}
    for name, model in (("eager", reference), ("ours", ours)):
        model.train()
        out = model(ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results[name] = (out.logits.detach(), out.loss.detach(), out.dropped_fraction, grads)
    (logits_e, loss_e, dropped_e, grads_e), (logits_o, loss_o, dropped_o, grads_o) = results["eager"], results["ours"]
    if capacity_factor is not None:
        assert dropped_e > 0 and torch.equal(dropped_e, dropped_o)
    torch.testing.assert_close(logits_o, logits_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_o, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_o.keys() == grads_e.keys() and any("experts.gate_up_proj" in n for n in grads_o)
    for name in grads_e:
        torch.testing.assert_close(grads_o[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_causal_lm_generate_matches_eager():
    torch.manual_seed(1)
    config = tiny_config(num_experts=8, num_experts_per_tok=2)
    reference = SparseMoEForCausalLM._from_config(config, experts_implementation="eager").eval()
    ours = _copy_model(reference, SPARSE_MOE_EXPERTS).eval()
    ids = torch.randint(3, config.vocab_size, (2, 5))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(ours.generate(ids, **kwargs), reference.generate(ids, **kwargs))


def test_block_in_bf16_matches_eager():
    torch.manual_seed(2)
    config = tiny_config(num_experts=6)
    block = SparseMoEBlock(config)
    for param in block.parameters():
        nn.init.normal_(param, std=0.3)
    block = block.bfloat16().float()  # bf16-representable weights and input: every run routes the same way
    x = torch.randn(2, 7, config.hidden_size).bfloat16().float()
    results = {}
    for name, dtype, implementation in (
        ("exact", torch.float32, "eager"), ("eager", torch.bfloat16, "eager"), ("ours", torch.bfloat16, "sparse_moe")
    ):
        twin = copy.deepcopy(block).to(dtype)
        twin.config._experts_implementation = implementation
        out = twin(x.to(dtype))
        out.float().square().sum().backward()
        experts = twin.experts
        results[name] = (out.detach(), experts.gate_up_proj.grad, experts.down_proj.grad, twin.gate.weight.grad)
    for i, name in enumerate(("output", "grad gate_up_proj", "grad down_proj", "grad router")):
        assert_as_accurate_as(results["ours"][i], results["eager"][i], results["exact"][i], name)
