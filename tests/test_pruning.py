"""Expert pruning and merging (modeling_sparse_moe/compression/pruning.py), fewer experts per token
(compression/routing.py, `router_skip_threshold`), the calibration helpers and scripts/prune.py.

Routing after pruning: the router's softmax runs over the kept experts only; with `norm_topk_prob` the top-k weights
are renormalised to sum to 1, so a token whose top-k were all kept gets exactly the weights it had (ratios of the
same exp(logits)); a sigmoid router scores each expert alone, so it is unchanged with or without renormalisation.
Hence "pruned model == original model on inputs routed only to kept experts", up to fp32 rounding of the softmax."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_fp32_close, tiny_config

from transformers import AutoModelForCausalLM

from modeling_sparse_moe import SparseMoEForCausalLM
from modeling_sparse_moe.compression.calibration import calibration_texts, token_blocks, validation_loss
from modeling_sparse_moe.compression.pruning import (
    CRITERIA,
    apply_expert_selection,
    collect_expert_statistics,
    merge_experts,
    moe_blocks,
    prune_experts,
    select_experts,
)
from modeling_sparse_moe.compression.routing import set_experts_per_token, set_skip_threshold
from modeling_sparse_moe.int8_experts import quantize_experts_int8


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import prune as prune_cli  # noqa: E402  (scripts/prune.py)

NEVER = -10.0  # a correction bias that keeps an expert out of every top-k (scores are in [0, 1])


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return SparseMoEForCausalLM(tiny_config(**overrides)).eval()


def ids(batch=2, seq=16, seed=0):
    return torch.randint(3, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def ban(model, experts_per_layer):
    """Make the router never choose these experts (selection bias only: the kept experts' weights are unchanged)."""
    with torch.no_grad():
        for (_, block), banned in zip(moe_blocks(model), experts_per_layer):
            block.gate.e_score_correction_bias[list(banned)] = NEVER
    return model


# ------------------------------------------------------------------------------------------------ which experts
@pytest.mark.parametrize("criterion", ["frequency", "reap", "activation_norm"])
def test_an_expert_the_router_never_picks_goes_first(criterion):
    model = ban(make_model(), [[2], [0]])
    prune_experts(model, 3, criterion, ids())
    assert model.pruned_experts == [[0, 1, 3], [1, 2, 3]]
    assert model.config.num_experts == 3
    for _, block in moe_blocks(model):
        assert block.gate.weight.shape == (3, 32) and block.gate.e_score_correction_bias.shape == (3,)
        assert block.experts.gate_up_proj.shape == (3, 48, 32) and block.experts.down_proj.shape == (3, 32, 24)


def test_pruning_keeps_exactly_the_chosen_experts_tensors():
    model = make_model()
    original = copy.deepcopy(model)
    kept = [[0, 3], [1, 2]]
    apply_expert_selection(model, kept)
    for (_, new), (_, old), chosen in zip(moe_blocks(model), moe_blocks(original), kept):
        assert torch.equal(new.gate.weight, old.gate.weight[chosen])
        assert torch.equal(new.gate.e_score_correction_bias, old.gate.e_score_correction_bias[chosen])
        assert torch.equal(new.experts.gate_up_proj, old.experts.gate_up_proj[chosen])
        assert torch.equal(new.experts.down_proj, old.experts.down_proj[chosen])
        assert new.gate.num_experts == new.experts.num_experts == new.num_experts == 2


def test_statistics_match_a_per_token_reference():
    """count, REAP and activation-norm sums of layer 0 against a loop over tokens with the router and the eager
    expert math written out (fp64 sums of fp32 products: fp32 tolerance)."""
    model = make_model()
    block = moe_blocks(model)[0][1]
    seen = {}
    handle = block.register_forward_pre_hook(lambda m, args: seen.update(x=args[0].reshape(-1, 32)))
    stats = collect_expert_statistics(model, ids())[0]
    handle.remove()
    x_TD = seen["x"]
    with torch.no_grad():
        _, weights_TK, index_TK, _ = block.gate(x_TD)
        count, reap, norm = torch.zeros(4), torch.zeros(4), torch.zeros(4)
        experts = block.experts
        for t in range(x_TD.shape[0]):
            for k in range(2):
                e = int(index_TK[t, k])
                gate, up = (experts.gate_up_proj[e] @ x_TD[t]).chunk(2)
                y = experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up)
                count[e] += 1
                reap[e] += weights_TK[t, k] * y.norm()
                norm[e] += y.norm()
    assert stats.tokens == 32 and torch.equal(stats.count.float(), count)
    torch.testing.assert_close(stats.score("reap").float(), torch.where(count > 0, reap / count, 0.0))
    torch.testing.assert_close(stats.score("activation_norm").float(), torch.where(count > 0, norm / count, 0.0))
    assert torch.equal(stats.score("frequency").float(), count)


def test_select_ties_and_groups():
    scores = [torch.tensor([1.0, 3.0, 3.0, 0.5, 2.0, 2.0, 0.0, 9.0])]
    assert select_experts(scores, 4) == [[1, 2, 4, 7]]  # the tie 4/5 goes to the lower index
    # two groups of 4: best 2 of [1, 3, 3, 0.5] and best 2 of [2, 2, 0, 9]
    assert select_experts(scores, 4, n_group=2) == [[1, 2, 4, 7]]


def test_random_criterion_is_seeded_and_needs_no_calibration():
    first = prune_experts(make_model(), 2, "random", seed=3).pruned_experts
    again = prune_experts(make_model(), 2, "random", seed=3).pruned_experts
    assert first == again and all(len(k) == 2 for k in first)
    others = {str(prune_experts(make_model(), 2, "random", seed=s).pruned_experts) for s in range(6)}
    assert len(others) > 1


# --------------------------------------------------------------------------------------- the pruned model's outputs
@pytest.mark.parametrize("routing", [dict(), dict(router_type="sigmoid", norm_topk_prob=False)])
def test_pruned_model_equals_original_on_inputs_routed_to_kept_experts(routing):
    model = ban(make_model(**routing), [[1, 3], [0, 3]])
    original = copy.deepcopy(model)
    prune_experts(model, 2, "frequency", ids(seed=1))
    assert model.pruned_experts == [[0, 2], [1, 2]]
    input_ids = ids(seed=2)
    # fp32 tolerance: the softmax normaliser now sums 2 experts instead of 4 (rounding differs, not the value)
    assert_fp32_close(logits(model, input_ids), logits(original, input_ids))
    assert model.generate(input_ids[:1, :4], max_new_tokens=6, do_sample=False).tolist() == original.generate(
        input_ids[:1, :4], max_new_tokens=6, do_sample=False).tolist()


def test_pruning_changes_outputs_when_used_experts_go():
    model = make_model()
    original = copy.deepcopy(model)
    prune_experts(model, 2, "random", seed=0)
    assert (logits(model, ids()) - logits(original, ids())).abs().max() > 1e-3


def test_group_limited_routing_keeps_equal_groups():
    model = make_model(num_experts=8, n_group=2, topk_group=1, router_type="sigmoid")
    prune_experts(model, 4, "reap", ids())
    for kept in model.pruned_experts:
        assert sum(e < 4 for e in kept) == 2 and sum(e >= 4 for e in kept) == 2
    assert model.config.num_experts == 4 and model(ids()).logits.shape == (2, 16, 97)


# ---------------------------------------------------------------------------------------------- save, load, export
def test_pruned_model_saves_reloads_quantizes_and_exports(tmp_path):
    pytest.importorskip("gguf")
    from transformers import BitsAndBytesConfig

    from modeling_sparse_moe.interop.export import export_for_serving
    from modeling_sparse_moe.recipes.data import load_text_corpus, train_tokenizer

    tokenizer = train_tokenizer(load_text_corpus(max_chars=4000), vocab_size=300)
    model = make_model(vocab_size=320, hidden_size=128, moe_intermediate_size=64, intermediate_size=128,
                       initializer_range=0.02)
    prune_experts(model, 3, "reap", token_blocks(tokenizer, load_text_corpus(max_chars=3000), 32))
    model.save_pretrained(tmp_path / "pruned")
    tokenizer.save_pretrained(tmp_path / "pruned")
    assert json.loads((tmp_path / "pruned" / "config.json").read_text())["num_experts"] == 3
    input_ids = ids(seed=4)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert_fp32_close(logits(reloaded, input_ids), logits(model, input_ids))  # fp32: reload may misalign (conftest)

    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path / "pruned", quantization_config=BitsAndBytesConfig(load_in_4bit=True)).eval()
    assert quantized.config.expert_quantization and quantized.model.layers[0].mlp.experts.num_experts == 3
    # NF4 rounding, the bound of test_quantization.py::test_logits_close_to_full_precision: relative weight error
    # eps <= 0.12 per product, at most 4 quantized products per layer, errors in quadrature
    error = (logits(quantized, input_ids) - logits(model, input_ids)).norm() / logits(model, input_ids).norm()
    assert 0 < error <= (4 * model.config.num_hidden_layers) ** 0.5 * 0.12

    result = export_for_serving(tmp_path / "pruned", tmp_path / "native", gguf="f16")
    native = AutoModelForCausalLM.from_pretrained(result.folder).eval()
    assert native.config.num_local_experts == 3
    assert_fp32_close(logits(native, input_ids), logits(model, input_ids))
    import gguf

    reader = gguf.GGUFReader(result.gguf)
    assert reader.get_field("llama.expert_count").contents() == 3


def test_prune_script_end_to_end(tmp_path):
    from modeling_sparse_moe.recipes.data import load_text_corpus, train_tokenizer

    tokenizer = train_tokenizer(load_text_corpus(max_chars=4000), vocab_size=300)
    model = ban(make_model(vocab_size=320), [[2], [2]])
    model.save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    (tmp_path / "calib.txt").write_text("\n".join(load_text_corpus(max_chars=3000)))
    assert prune_cli.main([str(tmp_path / "src"), str(tmp_path / "dst"), "--num_experts", "3", "--criterion",
                           "frequency", "--calibration_file", str(tmp_path / "calib.txt"), "--block_size", "32"]) == 0
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "dst")
    assert pruned.config.num_experts == 3
    original = moe_blocks(model)[0][1].experts.gate_up_proj
    assert torch.equal(moe_blocks(pruned)[0][1].experts.gate_up_proj, original[[0, 1, 3]])
    assert (tmp_path / "dst" / "tokenizer.json").is_file()


# ----------------------------------------------------------------------------------------------------- merging
def test_merging_an_unused_expert_leaves_its_neighbour_and_the_outputs():
    model = ban(make_model(), [[3], [3]])
    original = copy.deepcopy(model)
    merge_experts(model, 3, ids())
    assert model.config.num_experts == 3
    assert all(sorted(sum(groups, [])) == [0, 1, 2, 3] for groups in model.merged_experts)
    # the unused expert has weight ~1e-6 / count in the average: its neighbour (and the outputs) barely move
    assert_fp32_close(logits(model, ids(seed=5)), logits(original, ids(seed=5)))


def test_merging_two_used_experts_averages_by_frequency():
    model = make_model()
    stats = collect_expert_statistics(model, ids())[0]
    before = copy.deepcopy(moe_blocks(model)[0][1].experts.gate_up_proj.detach())
    merge_experts(model, 3, ids())
    groups = model.merged_experts[0]
    (merged,) = [g for g in groups if len(g) == 2]
    into, victim = (merged if stats.count[merged[0]] >= stats.count[merged[1]] else merged[::-1])
    share = (stats.count[victim] + 1e-6) / (stats.count[victim] + stats.count[into] + 2e-6)
    expected = (1 - share) * before[into].double() + share * before[victim].double()
    new_index = groups.index(merged)
    torch.testing.assert_close(moe_blocks(model)[0][1].experts.gate_up_proj[new_index].double(), expected,
                               rtol=1e-6, atol=1e-7)  # fp32 storage of an fp64 average


# -------------------------------------------------------------------------------------------- fewer per token
def test_lowered_top_k_equals_a_model_built_with_it():
    model = make_model()
    built = SparseMoEForCausalLM(tiny_config(num_experts_per_tok=1)).eval()
    built.load_state_dict(model.state_dict())
    set_experts_per_token(model, 1)
    assert model.config.num_experts_per_tok == 1
    assert torch.equal(logits(model, ids()), logits(built, ids()))


def test_lowered_top_k_per_layer_changes_only_that_layer():
    model = make_model()
    set_experts_per_token(model, 1, layers=[1])
    assert [b.gate.top_k for _, b in moe_blocks(model)] == [2, 1] and model.config.num_experts_per_tok == 2
    built = copy.deepcopy(make_model())
    assert not torch.equal(logits(model, ids()), logits(built, ids()))


def test_skip_threshold_between_top_k_models():
    """Threshold 0 (default) is the top-2 model bitwise; a tiny one skips nothing; 0.99 skips every second choice
    whose score is under 99% of the first (all of them here): the top-1 model."""
    model = make_model()
    top1 = set_experts_per_token(copy.deepcopy(model), 1)
    assert model.config.router_skip_threshold == 0.0
    reference = logits(model, ids())
    assert torch.equal(logits(set_skip_threshold(copy.deepcopy(model), 1e-9), ids()), reference)
    skipping = set_skip_threshold(copy.deepcopy(model), 0.99)
    assert_fp32_close(logits(skipping, ids()), logits(top1, ids()))
    half = set_skip_threshold(copy.deepcopy(model), 0.5)
    out = logits(half, ids())
    assert not torch.allclose(out, reference) and not torch.allclose(out, logits(top1, ids()))


def test_skip_threshold_is_validated_and_saved(tmp_path):
    model = make_model()
    with pytest.raises(ValueError, match="router_skip_threshold"):
        set_skip_threshold(model, 1.0)
    with pytest.raises(ValueError, match="router_skip_threshold"):
        tiny_config(router_skip_threshold=-0.1)
    assert model.config.router_skip_threshold == 0.0
    set_skip_threshold(model, 0.3).save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.router_skip_threshold == 0.3


# -------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("num_experts, match", [(0, "at least 1"), (5, "more than the 4"), (1, "num_experts_per_tok")])
def test_bad_expert_counts(num_experts, match):
    with pytest.raises(ValueError, match=match):
        prune_experts(make_model(), num_experts, "random")


def test_groups_that_no_longer_divide():
    model = make_model(num_experts=8, n_group=4, topk_group=2, router_type="sigmoid")
    with pytest.raises(ValueError, match="not divisible by n_group=4"):
        prune_experts(model, 6, "random")


def test_quantized_models_are_refused():
    with pytest.raises(ValueError, match="prune or merge experts before quantizing"):
        prune_experts(quantize_experts_int8(make_model()), 3, "random")
    with pytest.raises(ValueError, match="before quantizing"):
        merge_experts(quantize_experts_int8(make_model()), 3, ids())


def test_calibration_without_tokens():
    with pytest.raises(ValueError, match="no tokens"):
        prune_experts(make_model(), 3, "reap", torch.zeros(0, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="calibration"):
        prune_experts(make_model(), 3, "reap", None)
    from modeling_sparse_moe.recipes.data import train_tokenizer

    with pytest.raises(ValueError, match="no tokens"):
        token_blocks(train_tokenizer(["a b c d e"] * 5, vocab_size=270), ["short"], block_size=64)


def test_unknown_criterion_and_calibration_source():
    with pytest.raises(ValueError, match="unknown criterion"):
        prune_experts(make_model(), 3, "magnitude", ids())
    with pytest.raises(ValueError, match="unknown calibration corpus"):
        calibration_texts("wiki")
    with pytest.raises(ValueError, match="exactly one calibration source"):
        calibration_texts("generic", calibration_file="x.txt")
    assert set(CRITERIA) == {"reap", "frequency", "activation_norm", "random"}


def test_validation_loss_is_the_lm_loss():
    model = make_model()
    blocks = [ids()]
    with torch.no_grad():
        out = model(ids(), labels=ids())
    # labels add the router losses to `loss`; validation_loss is the cross-entropy alone (fp32 sums)
    assert validation_loss(model, blocks) == pytest.approx(
        torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids()[:, 1:].reshape(-1)).item(),
        rel=1e-5)
