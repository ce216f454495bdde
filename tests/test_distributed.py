"""Multi-process training and inference, two processes on CPU (gloo), through the engines users run: `Trainer` under
DDP (torchrun), transformers' FSDP2 (`DistributedConfig(fsdp_size=2)`), tensor parallel (`tp_size=2`, the config's
`base_model_tp_plan`) and expert parallel (`ep_size=2`, all_to_all). One torchrun launch (tests/dist_worker.py) runs
every scenario; this process builds the single-process references with the same helpers and compares.

Run alone: `python -m pytest -q -m distributed tests/test_distributed.py`.
"""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_fp32_close, tiny_config
from modeling_sparse_moe import SparseMoEForCausalLM, SparseMoERouter

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker as W  # noqa: E402

# NOTE: the fp32 loss tolerance. A loss near 5.3 sits in [4, 8), where one fp32 ulp is 2^-21 = 4.8e-7. 1 x batch 4
# and 2 x batch 2 sum the same terms in another order (per-rank partial sums, then an all-reduce of the statistics
# and of the gradients), which moves results by a few ulps, and 6 AdamW steps carry that along. We allow 16 ulps
# (7.6e-6); measured: at most 1 ulp (4.8e-7). A rank-local router loss is off by > 1e-3 (checked below).
LOSS_ATOL = 16 * 2.0**-21
# NOTE: weights after 6 AdamW steps of lr 1e-2. Adam divides each gradient by its running RMS, so the fp32
# reordering above, tiny in the gradients, moves the update of a weight with a near-zero gradient by far more:
# measured 1e-6 (5e-6 with accumulation) on Intel, 2.4e-6 (1.4e-5 with accumulation) on AMD EPYC. 5e-5 is half a
# percent of one step; the loss trace above (16 ulps) is the strict check.
WEIGHT_ATOL = 5e-5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Single-process checkpoints, then one torchrun launch of every scenario over them."""
    workdir = tmp_path_factory.mktemp("distributed")
    W.write_checkpoints(workdir)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(Path(__file__).parent / "dist_worker.py"), str(workdir),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-5000:]
    return workdir


def _results(workdir: Path, scenario: str) -> list[dict]:
    results = [torch.load(workdir / "out" / f"{scenario}.rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    for result in results:
        assert "error" not in result, result["error"]
        assert result["world_size"] == 2
    return results


@pytest.fixture(scope="module")
def single_process(workdir):
    """`Trainer` in one process over the same rows: batch 4 (and 2 x 2 with accumulation), same seed, same order."""
    runs = {}
    for grad_accum in (1, 2):
        torch.manual_seed(0)
        model = SparseMoEForCausalLM.from_pretrained(workdir / "ckpt" / "train")
        run = W.run_trainer(model, workdir / f"single-{grad_accum}", 4 // grad_accum, grad_accum=grad_accum)
        run["state"] = run.pop("trainer").model.state_dict()
        runs[grad_accum] = run
    return runs


@pytest.mark.distributed
@pytest.mark.parametrize("scenario", ["ddp", "ddp_noavg", "ddp_accum", "fsdp", "fsdp_noavg"])
def test_data_parallel_training_equals_one_process(workdir, single_process, scenario):
    """Router aux + z losses and bias balancing on: the loss of every step, the router biases (on every rank) and
    the trained weights equal one process holding the whole batch; the run's checkpoint reloads in one process with
    the logits the run computed."""
    ranks = _results(workdir, scenario)
    if not scenario.startswith("fsdp"):
        assert ranks[0]["engine"] == "DistributedDataParallel"
    reference = single_process[2 if scenario == "ddp_accum" else 1]
    # Trainer logs the mean over ranks of the loss each rank returns.
    trace = [(loss_0 + loss_1) / 2 for loss_0, loss_1 in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert len(trace) == len(reference["losses"]) == W.STEPS * (2 if scenario == "ddp_accum" else 1)
    deviation = max(abs(a - b) for a, b in zip(trace, reference["losses"]))
    assert deviation <= LOSS_ATOL, (deviation, trace, reference["losses"])
    # Router telemetry: every rank logs the whole batch's routing, the integer loads of one process (6 steps x 4 rows
    # x 16 tokens x top-2 = 768 assignments per layer), not its own half.
    assert sum(reference["telemetry"]["counts"][0]) == W.STEPS * W.GLOBAL_BATCH * W.SEQ_LEN * 2
    for result in ranks:
        assert result["telemetry"]["counts"] == reference["telemetry"]["counts"]
        assert abs(result["telemetry"]["load_imbalance"] - reference["telemetry"]["load_imbalance"]) < 1e-12
    for result in ranks:
        assert result["biases"].keys() == reference["biases"].keys()
        for name, bias in reference["biases"].items():
            assert bias.abs().max() > 0  # balancing did move them
            assert torch.equal(result["biases"][name], bias), (name, result["biases"][name], bias)
    reloaded = SparseMoEForCausalLM.from_pretrained(workdir / "out" / f"{scenario}-model")
    state = reloaded.state_dict()
    assert state.keys() == reference["state"].keys()
    for name, value in reference["state"].items():
        torch.testing.assert_close(state[name], value, atol=WEIGHT_ATOL, rtol=0, msg=name)
    with torch.no_grad():
        logits = reloaded.eval()(W.family_batch(123)).logits
    for result in ranks:  # another process, another allocation: fp32-close, not bitwise (see conftest)
        assert_fp32_close(logits, result["logits"])
    if scenario.startswith("fsdp"):  # sharded by the config's FSDP plan, one unit per decoder layer
        assert {"model.layers.0", "model.layers.1", "model.embed_tokens"} <= set(ranks[0]["fsdp_modules"])


def test_rank_local_router_losses_would_be_caught():
    """The tolerance above has teeth: the mean of two half-batch losses (router statistics per rank, the bug this
    file guards against) is far from the whole-batch loss, although the cross-entropy parts are equal."""
    torch.manual_seed(0)
    model = SparseMoEForCausalLM(W.train_config()).train()
    ids = torch.stack([row["input_ids"] for row in W.train_dataset()[: W.GLOBAL_BATCH]])
    with torch.no_grad():
        whole = model(ids, labels=ids).loss
        halves = (model(ids[:2], labels=ids[:2]).loss + model(ids[2:], labels=ids[2:]).loss) / 2
    assert (whole - halves).abs() > 100 * LOSS_ATOL


@pytest.mark.distributed
@pytest.mark.parametrize("family", list(W.FAMILIES))
def test_tensor_parallel_logits_equal_one_process(workdir, family):
    """`DistributedConfig(tp_size=2)`: attention split by heads (gathered for qk_norm="full"), experts and shared
    experts by their hidden width; eval and train mode (capacity dropping) logits equal the single-process model's."""
    ranks = _results(workdir, "tp")
    model = SparseMoEForCausalLM.from_pretrained(workdir / "ckpt" / family)
    ids = W.family_batch(1)
    with torch.no_grad():
        expected = {"eval": model.eval()(ids).logits, "train": model.train()(ids).logits}
    for result in ranks:
        assert result[f"{family}/q_proj_local_rows"] == 16  # really sharded: half of the 32 query rows
        for mode, logits in expected.items():
            assert_fp32_close(result[f"{family}/{mode}"], logits)


@pytest.mark.distributed
@pytest.mark.parametrize("family", list(W.FAMILIES))
def test_expert_parallel_equals_one_process(workdir, family):
    """`DistributedConfig(fsdp_size=2, ep_size=2, ep_implementation="all_to_all")`: two experts per rank, each rank
    its own batch; train-mode logits (capacity-dropped assignments included) and dropped fractions equal one process
    on that batch, and, where nothing is dropped, the mean of the ranks' losses is the one-process loss of both
    batches (router losses pooled over the ranks)."""
    ranks = _results(workdir, "ep")
    model = SparseMoEForCausalLM.from_pretrained(workdir / "ckpt" / family)
    for rank, result in enumerate(ranks):
        assert result[f"{family}/local_experts"] == 2
        ids = W.family_batch(10 + rank)
        with torch.no_grad():
            train = model.train()(ids, labels=ids)
            assert_fp32_close(result[f"{family}/train"], train.logits)
            assert_fp32_close(result[f"{family}/eval"], model.eval()(ids).logits)
        if train.dropped_fraction is not None:
            assert train.dropped_fraction > 0
            torch.testing.assert_close(result[f"{family}/dropped"], train.dropped_fraction)
    if W.family_config(family).capacity_factor is None:  # capacity is per rank's batch, as in GShard / Switch
        both = torch.cat([W.family_batch(10), W.family_batch(11)])
        with torch.no_grad():
            expected = model.train()(both, labels=both).loss
        torch.testing.assert_close((ranks[0][f"{family}/loss"] + ranks[1][f"{family}/loss"]) / 2, expected)


# --------------------------------------------------------------------------------- single-process pieces of the above
@pytest.mark.parametrize("qk_norm", ["none", "head", "full"])
def test_tensor_parallel_plan_fits_every_qk_norm(qk_norm):
    model = SparseMoEForCausalLM(tiny_config(qk_norm=qk_norm, num_shared_experts=1))
    plan = model.tp_plan
    q_style = plan["model.layers.*.self_attn.q_proj"]
    assert q_style == ("colwise_gather_output" if qk_norm == "full" else "colwise")
    assert ("model.layers.*.self_attn.q_norm" in plan) == (qk_norm == "head")
    assert plan["model.layers.*.mlp.shared_experts.down_proj"] == "rowwise"
    assert model.fsdp_plan["lm_head"] == "keep_full_weight"
    assert "base_model_tp_plan" not in model.config.to_dict()


def test_expert_load_is_zero_after_loading_and_kept_from_ddp_broadcast(tmp_path):
    torch.manual_seed(0)
    SparseMoEForCausalLM(tiny_config(router_bias_update_rate=0.01)).save_pretrained(tmp_path)
    model = SparseMoEForCausalLM.from_pretrained(tmp_path)
    loads = [m.expert_load for m in model.modules() if isinstance(m, SparseMoERouter)]
    assert len(loads) == 2 and all(torch.equal(load, torch.zeros(4)) for load in loads)
    assert model._ddp_params_and_buffers_to_ignore == [
        "model.layers.0.mlp.gate.expert_load", "model.layers.1.mlp.gate.expert_load"
    ]


def test_router_losses_follow_num_items_in_batch():
    """Under gradient accumulation Trainer normalises by the step's tokens and does not divide by the steps: a
    micro-batch's router losses count in proportion to its share of those tokens (here half)."""
    torch.manual_seed(0)
    model = SparseMoEForCausalLM(tiny_config(router_aux_loss_coef=0.1, router_z_loss_coef=0.01)).train()
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    items = ids[:, 1:].numel()
    torch.manual_seed(1)
    plain = model(ids, labels=ids)
    penalty = 0.1 * plain.aux_loss + 0.01 * plain.z_loss
    torch.manual_seed(1)
    half = model(ids, labels=ids, num_items_in_batch=torch.tensor(2 * items))
    lm = model.loss_function(half.logits, ids, 97, num_items_in_batch=torch.tensor(2 * items))
    torch.testing.assert_close(half.loss, lm + penalty / 2)
    torch.testing.assert_close(plain.loss, model.loss_function(plain.logits, ids, 97) + penalty)


@pytest.mark.distributed
def test_pretraining_recipe_runs_unchanged_under_torchrun(tmp_path):
    """scripts/pretrain.py as users run it, `torchrun --nproc_per_node 2` x batch 2 against one process x batch 4
    (sequential sampler, z-loss and bias balancing on): the logged losses, the router biases and the saved weights
    match, and the multi-process output folder is the usual single-process-loadable one."""
    import json

    from pydoc_data.topics import topics
    from safetensors.torch import load_file

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(text.replace("\n", " ") for text in list(topics.values())[:60]))
    args = [
        str(Path(__file__).parents[1] / "scripts" / "pretrain.py"), "--config_name", "tiny", "--train_file",
        str(corpus), "--do_train", "--max_steps", "4", "--block_size", "32", "--report_to", "none", "--use_cpu",
        "--logging_steps", "1", "--train_sampling_strategy", "sequential", "--seed", "0",
        "--config_overrides", "router_bias_update_rate=0.01,router_z_loss_coef=0.01",
    ]
    launchers = {
        "single": ([sys.executable], "4"),
        "torchrun": ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                      "127.0.0.1", "--master_port", str(_free_port())], "2"),
    }
    for name, (launcher, batch) in launchers.items():
        command = launcher + args + ["--output_dir", str(tmp_path / name), "--per_device_train_batch_size", batch]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
        assert done.returncode == 0, done.stderr[-5000:]
    losses = {
        name: [row["loss"] for row in json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
               if "loss" in row]
        for name in launchers
    }
    assert len(losses["single"]) == 4
    torch.testing.assert_close(losses["torchrun"], losses["single"], atol=LOSS_ATOL, rtol=0)
    single, multi = (load_file(tmp_path / name / "model.safetensors") for name in launchers)
    assert single.keys() == multi.keys()
    for key, value in single.items():
        if key.endswith("e_score_correction_bias"):
            assert torch.equal(multi[key], value) and value.abs().max() > 0, key
        torch.testing.assert_close(multi[key], value, atol=WEIGHT_ATOL, rtol=0, msg=key)
    reloaded = SparseMoEForCausalLM.from_pretrained(tmp_path / "torchrun")
    assert reloaded.config.router_bias_update_rate == 0.01
