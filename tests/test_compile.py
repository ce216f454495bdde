"""The compile-friendly expert path and the model under `torch.compile(fullgraph=True)`.

Eager, no compiler (fast): the static, sync-free path (`moe_dispatch.static_experts_forward`) against the eager
reference loop, forward and backward, with random routing, idle experts, dropped assignments and odd token counts, in
fp32 and bf16, through `F.grouped_mm` and through the per-expert fallback of the `sparse_moe::grouped_linear` custom
op, which `torch.library.opcheck` validates (schema, fake tensor, autograd registration).

Compiled (a few tiny variants; each compile takes 10-60 s on 2 CPU cores): the MoE block for every routing feature
(softmax, sigmoid + groups + correction bias, shared experts, capacity dropping in training, top-1), the whole causal
LM's training forward + backward, `torch._dynamo.explain` counting one graph, and static-cache generation. Tolerance
for compiled vs eager in fp32: 1e-4 absolute and relative (inductor fuses and reorders fp32 reductions: on these
O(1-10) values we saw up to 9e-5 absolute, 2.6e-5 relative); routing is identical in both, so a routing or dispatch
bug shows up as an O(1) difference.
"""

import copy

import pytest
import torch
from torch import nn

from transformers import CompileConfig

from modeling_sparse_moe import SparseMoEForCausalLM
from modeling_sparse_moe import moe_dispatch
from modeling_sparse_moe.modeling_sparse_moe import SparseMoEBlock
from modeling_sparse_moe.moe_dispatch import SPARSE_MOE_EXPERTS

from conftest import assert_fp32_close, tiny_config
from test_dispatch import HIDDEN, NUM_EXPERTS, TOP_K, make_experts, random_routing, run, assert_as_accurate_as


COMPILED = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def force_static(monkeypatch, kernel: str = "grouped_mm") -> None:
    """Run the static path in eager on CPU (what accelerators and compiled graphs run). `kernel="mm_loop"`: the custom
    op's per-expert fallback (devices or dtypes without a grouped kernel)."""
    monkeypatch.setattr(moe_dispatch, "_use_static_path", lambda device, act_fn=None: True)
    monkeypatch.setattr(moe_dispatch, "_use_gathered_path", lambda *args: False)
    if kernel == "mm_loop":
        monkeypatch.setattr(moe_dispatch, "_grouped_mm_usable", lambda a, w: False)
        monkeypatch.setattr(moe_dispatch, "_native_grouped_mm", lambda a: False)


# -------------------------------------------------------------------------------------------- static path, eager
@pytest.mark.parametrize("num_tokens", [1, 2, 5, 17, 64])
@pytest.mark.parametrize("drop_fraction", [0.0, 0.35])
@pytest.mark.parametrize("kernel", ["grouped_mm", "mm_loop"])
def test_static_path_matches_eager_fp32(num_tokens, drop_fraction, kernel, monkeypatch):
    experts = make_experts()
    force_static(monkeypatch, kernel)
    index_TK, weights_TK = random_routing(num_tokens, idle=(2,), drop_fraction=drop_fraction, seed=num_tokens)
    x_TD = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(num_tokens))
    grad_TD = torch.randn_like(x_TD)
    reference = run(experts, "eager", x_TD, index_TK, weights_TK, grad_TD)
    ours = run(experts, SPARSE_MOE_EXPERTS, x_TD, index_TK, weights_TK, grad_TD)
    names = ("output", "grad x", "grad routing weights", "grad gate_up_proj", "grad down_proj")
    for name, expected, actual in zip(names, reference, ours):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        assert torch.isfinite(actual).all(), name  # dropped rows never leak uninitialised memory
    assert ours[3][2].abs().max() == 0 and ours[4][2].abs().max() == 0  # idle expert: zero weight gradients


def test_static_path_all_dropped_and_no_grad(monkeypatch):
    experts = make_experts()
    force_static(monkeypatch)
    index_TK, weights_TK = torch.full((5, TOP_K), NUM_EXPERTS), torch.zeros(5, TOP_K)
    ours = run(experts, SPARSE_MOE_EXPERTS, torch.randn(5, HIDDEN), index_TK, weights_TK, torch.randn(5, HIDDEN))
    assert all(t.abs().max() == 0 for t in ours)
    index_TK, weights_TK = random_routing(9, drop_fraction=0.3, seed=4)
    x_TD = torch.randn(9, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(
            run(experts, SPARSE_MOE_EXPERTS, x_TD, index_TK, weights_TK)[0],
            run(experts, "eager", x_TD, index_TK, weights_TK)[0],
            rtol=1e-5,
            atol=1e-5,
        )


@pytest.mark.parametrize("kernel", ["grouped_mm", "mm_loop"])
def test_static_path_bf16_as_accurate_as_eager(kernel, monkeypatch):
    experts = make_experts(torch.bfloat16, ffn=16)
    force_static(monkeypatch, kernel)
    index_TK, weights_TK = random_routing(33, idle=(0,), drop_fraction=0.2, seed=7)
    x_TD = torch.randn(33, HIDDEN).to(torch.bfloat16)
    grad_TD = torch.randn_like(x_TD)
    eager = run(experts, "eager", x_TD, index_TK, weights_TK, grad_TD)
    ours = run(experts, SPARSE_MOE_EXPERTS, x_TD, index_TK, weights_TK, grad_TD)
    exact = run(copy.deepcopy(experts).float(), "eager", x_TD.float(), index_TK, weights_TK, grad_TD.float())
    for name, o, e, x in zip(("output", "grad x", "grad weights", "grad gate_up", "grad down"), ours, eager, exact):
        assert o.dtype == e.dtype, name
        assert_as_accurate_as(o, e, x, name)


@pytest.mark.parametrize("drop_fraction", [0.0, 0.3])
def test_static_path_bf16_compiled_as_accurate_as_eager(drop_fraction, monkeypatch):
    """What a GPU compiles: the static path in bf16, `F.grouped_mm` traced into the graph (no custom op), forward and
    every gradient held to the eager loop's own bf16 error against fp32 (routing is an input here, so no near-tie in
    the router can flip between the two)."""
    experts = make_experts(torch.bfloat16, ffn=16)
    force_static(monkeypatch)
    index_TK, weights_TK = random_routing(33, idle=(0,), drop_fraction=drop_fraction, seed=11)
    x_TD = torch.randn(33, HIDDEN).to(torch.bfloat16)
    grad_TD = torch.randn_like(x_TD)
    eager = run(experts, "eager", x_TD, index_TK, weights_TK, grad_TD)
    exact = run(copy.deepcopy(experts).float(), "eager", x_TD.float(), index_TK, weights_TK, grad_TD.float())
    experts.config._experts_implementation = SPARSE_MOE_EXPERTS
    experts.zero_grad(set_to_none=True)
    x_leaf, weights_leaf = x_TD.clone().requires_grad_(True), weights_TK.clone().requires_grad_(True)
    out_TD = torch.compile(experts, fullgraph=True)(x_leaf, index_TK, weights_leaf)
    out_TD.backward(grad_TD)
    compiled = (out_TD.detach(), x_leaf.grad, weights_leaf.grad, experts.gate_up_proj.grad, experts.down_proj.grad)
    for name, c, e, x in zip(("output", "grad x", "grad weights", "grad gate_up", "grad down"), compiled, eager, exact):
        assert c.dtype == e.dtype, name
        assert_as_accurate_as(c, e, x, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 3])
def test_gathered_decode_path_compiled_equals_eager(num_tokens, dtype):
    """Compiled inference on CPU with T*K <= E (decode) runs `gathered_experts_forward`, fused by inductor: it equals
    the eager reference (fp32: 1e-5, inductor sums the products in another order; bf16: as accurate as the eager loop
    against fp32), dropped assignments included, and the graph holds no custom op."""
    experts = make_experts(dtype)
    index_TK, weights_TK = random_routing(num_tokens, seed=num_tokens)
    if num_tokens > 1:
        index_TK[1, 0], weights_TK[1, 0] = NUM_EXPERTS, 0.0  # a dropped assignment
    assert index_TK.numel() <= NUM_EXPERTS
    x_TD = torch.randn(num_tokens, HIDDEN).to(dtype)
    with torch.no_grad():
        reference = run(experts, "eager", x_TD, index_TK, weights_TK)[0]
        exact = run(copy.deepcopy(experts).float(), "eager", x_TD.float(), index_TK, weights_TK)[0]
        experts.config._experts_implementation = SPARSE_MOE_EXPERTS
        compiled = torch.compile(experts, fullgraph=True)(x_TD, index_TK, weights_TK)
        code = torch._dynamo.explain(experts)(x_TD, index_TK, weights_TK).graphs[0].code
    assert "sparse_moe." not in code, code  # no custom op: the gathered path, fused
    assert compiled.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(compiled, reference, rtol=1e-5, atol=1e-5)
    else:
        assert_as_accurate_as(compiled, reference, exact, "output")


def test_grouped_linear_custom_op_passes_opcheck():
    a_AI = torch.randn(10, 8, requires_grad=True)
    w_EOI = torch.randn(4, 6, 8, requires_grad=True)
    offsets_E = torch.tensor([3, 3, 7, 7], dtype=torch.int32)  # an idle expert, a zero-row tail (dropped rows)
    torch.library.opcheck(torch.ops.sparse_moe.grouped_linear.default, (a_AI, w_EOI, offsets_E))


def _routing_with_drops(num_tokens=9, seed=1):
    index_TK, weights_TK = random_routing(num_tokens, idle=(2,), drop_fraction=0.3, seed=seed)
    assert bool((index_TK == NUM_EXPERTS).any())  # some assignments dropped
    return index_TK, weights_TK.requires_grad_(True)


@pytest.mark.parametrize("num_tokens", [1, 9])
def test_planned_custom_ops_pass_opcheck(num_tokens):
    """The planned path's ops (compiled graphs on CPU): schema, fake tensors, autograd registration."""
    experts = make_experts()
    index_TK, weights_TK = (_routing_with_drops() if num_tokens > 1 else random_routing(1, seed=3))
    weights_TK.requires_grad_(True)
    x_TD = torch.randn(num_tokens, HIDDEN, requires_grad=True)
    gate_up, down = experts.gate_up_proj, experts.down_proj
    ops = torch.ops.sparse_moe
    h_AH = ops.planned_up(x_TD, index_TK, gate_up).detach().requires_grad_(True)
    cases = [
        (ops.planned_up.default, (x_TD, index_TK, gate_up)),
        (ops.planned_down.default, (h_AH, weights_TK, index_TK, down)),
        (ops.planned_inference.default, (x_TD.detach(), index_TK, weights_TK.detach(), gate_up.detach(),
                                         down.detach())),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_planned_ops_match_the_planned_path():
    """Forward and every gradient through the ops equal the eager planned path (the same kernels)."""
    experts = make_experts()
    index_TK, weights_TK = _routing_with_drops()
    x_TD = torch.randn(index_TK.shape[0], HIDDEN)
    grad_TD = torch.randn_like(x_TD)
    results = []
    for through_ops in (False, True):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x_TD, weights_TK, experts.gate_up_proj,
                                                                    experts.down_proj)]
        if through_ops:
            out = moe_dispatch.planned_ops_experts_forward(leaves[0], index_TK, leaves[1], leaves[2], leaves[3])
        else:
            experts_copy = copy.deepcopy(experts)
            experts_copy.gate_up_proj, experts_copy.down_proj = nn.Parameter(leaves[2]), nn.Parameter(leaves[3])
            out = moe_dispatch.sparse_moe_experts_forward(experts_copy, leaves[0], index_TK, leaves[1])
            leaves[2], leaves[3] = experts_copy.gate_up_proj, experts_copy.down_proj
        out.backward(grad_TD)
        results.append([out.detach()] + [leaf.grad for leaf in leaves])
    for eager, ops in zip(*results):
        assert_fp32_close(ops, eager)  # same kernels, separately allocated copies (see conftest)


def test_planned_ops_compile_with_strided_weights():
    """Expert weights that are transposed views (e.g. tied or converted layouts): the compiled ops' fakes and kernels
    agree on the gradients' layout, and the gradients equal eager's up to fp32 rounding (same kernels on separately
    allocated copies; see conftest.assert_fp32_close)."""
    index_TK, weights_TK = _routing_with_drops()
    x_TD, grad_TD = torch.randn(index_TK.shape[0], HIDDEN), torch.randn(index_TK.shape[0], HIDDEN)
    gate_up = torch.randn(NUM_EXPERTS, HIDDEN, 2 * 12).transpose(1, 2)
    down = torch.randn(NUM_EXPERTS, 12, HIDDEN).transpose(1, 2)
    results = []
    for forward in (moe_dispatch.planned_ops_experts_forward,
                    torch.compile(moe_dispatch.planned_ops_experts_forward, fullgraph=True)):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x_TD, weights_TK)]
        leaves += [t.detach().transpose(1, 2).clone().transpose(1, 2).requires_grad_(True) for t in (gate_up, down)]
        assert not leaves[2].is_contiguous()
        forward(leaves[0], index_TK, *leaves[1:]).backward(grad_TD)
        results.append([leaf.grad for leaf in leaves])
    for eager, compiled in zip(*results):
        assert_fp32_close(compiled, eager)


def test_cpu_eager_keeps_the_planned_path(monkeypatch):
    """Eager on CPU runs the planned dispatch (faster there); the static path is for compiled graphs / accelerators."""
    called = []
    monkeypatch.setattr(moe_dispatch, "static_experts_forward", lambda *args: called.append(1))
    experts = make_experts()
    experts.config._experts_implementation = SPARSE_MOE_EXPERTS
    index_TK, weights_TK = random_routing(7)
    experts(torch.randn(7, HIDDEN), index_TK, weights_TK)
    assert not called and not moe_dispatch._use_static_path(torch.device("cpu"), experts.act_fn)


# -------------------------------------------------------------------------------------------------------- compiled
BLOCK_VARIANTS = {
    "softmax": dict(),
    "sigmoid_groups_bias_shared": dict(
        router_type="sigmoid", num_experts=8, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        num_shared_experts=1, shared_expert_gate=True,
    ),
    "capacity_dropping": dict(capacity_factor=0.5, num_experts=6),
    "top1": dict(num_experts_per_tok=1, norm_topk_prob=False),
}


def _block(**overrides):
    config = tiny_config(**overrides)
    config._experts_implementation = SPARSE_MOE_EXPERTS
    block = SparseMoEBlock(config)
    for param in block.parameters():
        nn.init.normal_(param, std=0.3)
    if block.gate.n_group > 1:
        block.gate.e_score_correction_bias.normal_(std=0.1)
    return block


def _block_results(block, x, compile_: bool):
    block.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    forward = torch.compile(block, fullgraph=True) if compile_ else block
    out = forward(x)
    out.square().sum().backward()
    grads = [x.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in block.parameters()]
    return out.detach(), grads


@pytest.mark.parametrize("path", ["planned_ops", "static"])
@pytest.mark.parametrize("variant", list(BLOCK_VARIANTS))
def test_block_fullgraph_forward_backward_equals_eager(variant, path, monkeypatch):
    """Compiled on CPU: the planned ops (what CPU runs); "static": the sync-free path accelerators compile."""
    if path == "static":
        force_static(monkeypatch)
    block = _block(**BLOCK_VARIANTS[variant]).train()
    x = torch.randn(2, 9, block.config.hidden_size)
    eager_out, eager_grads = _block_results(block, x, compile_=False)
    compiled_out, compiled_grads = _block_results(block, x, compile_=True)
    torch.testing.assert_close(compiled_out, eager_out, **COMPILED)
    for eager_grad, compiled_grad in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(compiled_grad, eager_grad, **COMPILED)
    if variant == "capacity_dropping":  # something was actually dropped, in both
        assert bool(block.gate.over_capacity(block.gate(x.reshape(-1, x.shape[-1]))[2]).any())


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(BLOCK_VARIANTS))
def test_block_fullgraph_inference_equals_eager(variant):
    block = _block(**BLOCK_VARIANTS[variant]).eval()
    x = torch.randn(3, 5, block.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(block, fullgraph=True)(x), block(x), **COMPILED)


def _train_model(**overrides):
    config = tiny_config(num_hidden_layers=1, **overrides)
    model = SparseMoEForCausalLM._from_config(config, experts_implementation=SPARSE_MOE_EXPERTS)
    return model.train()


def test_causal_lm_fullgraph_train_step_equals_eager():
    """Labels, aux loss, z-loss, capacity dropping, sigmoid routing with groups and a shared expert: the training
    forward + backward compiles into one graph and gives eager's loss, logits and every gradient."""
    model = _train_model(
        router_type="sigmoid", num_experts=8, n_group=2, topk_group=1, num_shared_experts=1, capacity_factor=0.75,
        router_aux_loss_coef=0.01, router_z_loss_coef=0.001,
    )
    ids = torch.randint(3, model.config.vocab_size, (2, 11))
    results = {}
    for name, forward in (("eager", model), ("compiled", torch.compile(model, fullgraph=True))):
        model.zero_grad(set_to_none=True)
        out = forward(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = (out.loss.detach(), out.logits.detach(), out.aux_loss.detach(), grads)
    (loss_e, logits_e, aux_e, grads_e), (loss_c, logits_c, aux_c, grads_c) = results["eager"], results["compiled"]
    torch.testing.assert_close(loss_c, loss_e, **COMPILED)
    torch.testing.assert_close(aux_c, aux_e, **COMPILED)
    torch.testing.assert_close(logits_c, logits_e, **COMPILED)
    assert grads_c.keys() == grads_e.keys() and any("experts.down_proj" in n for n in grads_e)
    for n in grads_e:
        torch.testing.assert_close(grads_c[n], grads_e[n], **COMPILED, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_dynamo_explain_one_graph(mode):
    """Regression guard: the whole forward (with labels and router losses in training) is one graph, no breaks."""
    model = _train_model(capacity_factor=1.0, router_z_loss_coef=0.001)
    model.train(mode == "train")
    ids = torch.randint(3, model.config.vocab_size, (2, 7))
    kwargs = dict(input_ids=ids, labels=ids) if mode == "train" else dict(input_ids=ids)
    with torch.set_grad_enabled(mode == "train"):
        explanation = torch._dynamo.explain(model)(**kwargs)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons
    # on CPU the experts are the planned path's ops: two with autograd when grads flow, else one
    code = explanation.graphs[0].code
    expected = ("planned_up", "planned_down") if mode == "train" else ("planned_inference",)
    assert all(f"sparse_moe.{op}" in code for op in expected), code
    assert SparseMoEForCausalLM._can_compile_fullgraph


def _padded_batch(vocab_size):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, vocab_size, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # left padding
    return ids, mask


def test_static_cache_generate_equals_dynamic_with_padding():
    torch.manual_seed(3)
    model = SparseMoEForCausalLM(tiny_config(router_type="sigmoid", num_shared_experts=1)).eval()
    ids, mask = _padded_batch(model.config.vocab_size)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    dynamic = model.generate(ids, **kwargs)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(static, dynamic)


@pytest.mark.slow
def test_static_cache_generate_auto_compiles_fullgraph_and_equals_dynamic():
    """What `generate(cache_implementation="static")` does on CUDA (auto-compile of the decode forward), forced on CPU
    with `CompileConfig._compile_all_devices`: one fullgraph-compiled decode step, the same tokens as eager."""
    torch.manual_seed(4)
    model = SparseMoEForCausalLM(tiny_config(num_hidden_layers=1)).eval()
    ids, mask = _padded_batch(model.config.vocab_size)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    dynamic = model.generate(ids, **kwargs)
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True
    torch._dynamo.utils.counters.clear()
    compiled = model.generate(ids, cache_implementation="static", compile_config=compile_config, **kwargs)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the decode step did compile
    assert torch.equal(compiled, dynamic)


class _Progressions(torch.utils.data.Dataset):
    """Learnable toy sequences: id_t = (start + step * t) mod (vocab - 3) + 3."""

    def __init__(self, vocab_size: int, length: int = 16, count: int = 64):
        g = torch.Generator().manual_seed(0)
        starts, steps = torch.randint(0, 50, (count,), generator=g), torch.randint(1, 4, (count,), generator=g)
        self.ids = (starts[:, None] + steps[:, None] * torch.arange(length)) % (vocab_size - 3) + 3

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def _train_losses(tmp_path, compiled: bool) -> list[float]:
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    config = tiny_config(num_hidden_layers=1, capacity_factor=1.0, router_aux_loss_coef=0.01, router_z_loss_coef=1e-3)
    model = SparseMoEForCausalLM(config)
    args = TrainingArguments(
        output_dir=str(tmp_path / str(compiled)), max_steps=10, per_device_train_batch_size=8, learning_rate=3e-3,
        lr_scheduler_type="constant", logging_steps=2, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, torch_compile=compiled,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Progressions(config.vocab_size))
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


@pytest.mark.slow
def test_trainer_torch_compile_trains_like_eager_without_graph_breaks(tmp_path):
    """`TrainingArguments(torch_compile=True)`: the same losses as eager training (tolerance 1e-3 relative: compiled
    fp32 rounding compounds over 10 AdamW steps), the loss falls, and dynamo records no graph break."""
    eager = _train_losses(tmp_path, compiled=False)
    torch._dynamo.utils.counters.clear()
    compiled = _train_losses(tmp_path, compiled=True)
    graph_breaks = dict(torch._dynamo.utils.counters["graph_break"])
    assert sum(graph_breaks.values()) == 0, graph_breaks
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert len(compiled) == len(eager) == 5 and compiled[-1] < compiled[0] - 0.5, compiled
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-3, atol=1e-3)
