"""Two-process checks for tests/test_distributed.py, run the way users run the engines (gloo on CPU):

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py WORKDIR [SCENARIO ...]
    accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 2 tests/dist_worker.py WORKDIR ddp

WORKDIR/ckpt/<name> holds the single-process checkpoints the test wrote; each scenario writes its results to
WORKDIR/out/<scenario>.rank<R>.pt (and checkpoints to WORKDIR/out/<scenario>-model). On CUDA machines the ranks use
NCCL and one GPU each (scripts/gpu_distributed_check.py), elsewhere gloo on CPU. Scenarios:

    ddp        Trainer with the engine the launcher set up (DDP under torchrun; FSDP2 / DeepSpeed under their
               accelerate configs), average_tokens_across_devices=True (loss trace, biases, final weights)
    ddp_noavg  the same with average_tokens_across_devices=False
    ddp_accum  the same with 2 micro-batches of 1 row per step (gradient accumulation)
    fsdp       Trainer on a model sharded by DistributedConfig(fsdp_size=2) (transformers' own FSDP2)
    fsdp_noavg the same with average_tokens_across_devices=False
    tp         from_pretrained(tp_plan="auto") logits for every routing family, eval and train mode
    ep         DistributedConfig(fsdp_size=2, ep_size=2) train-mode forward + backward over all_to_all

The helpers below (`train_config`, `train_dataset`, `run_trainer`, `FAMILIES`, `family_batch`) also build the
single-process references in the test process, so both sides run the same code.
"""

import datetime
import os
import sys
import traceback
from pathlib import Path

import torch

import modeling_sparse_moe  # noqa: F401  (registers the Auto classes)
from modeling_sparse_moe import SparseMoEConfig, SparseMoEForCausalLM, SparseMoERouter
from modeling_sparse_moe.recipes.training import RouterBiasUpdateCallback, RouterTelemetryCallback

STEPS = 6
GLOBAL_BATCH = 4
SEQ_LEN = 16
VOCAB = 96  # even: tensor parallel shards the vocabulary of the embedding and the LM head


def _tiny(**overrides) -> SparseMoEConfig:
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2,
    )
    kwargs.update(overrides)
    return SparseMoEConfig(**kwargs)


def train_config() -> SparseMoEConfig:
    """Router losses on with coefficients large enough that a per-rank (unpooled) loss is far off, and DeepSeek-V3
    bias balancing on: every batch statistic the model keeps must be pooled over ranks."""
    return _tiny(
        router_type="sigmoid", n_group=2, topk_group=1, router_aux_loss_coef=0.1, router_z_loss_coef=0.01,
        router_bias_update_rate=0.01,
    )


# Every routing family the model accepts, each in a config tensor and expert parallelism must shard right.
FAMILIES = {
    "softmax-qkfull-shared-dense": dict(
        qk_norm="full", num_shared_experts=1, shared_expert_gate=True, first_k_dense_replace=1, num_hidden_layers=3,
        norm_topk_prob=False,
    ),
    "sigmoid-groups-qkhead-capacity": dict(
        router_type="sigmoid", n_group=2, topk_group=1, routed_scaling_factor=2.5, qk_norm="head",
        num_shared_experts=1, capacity_factor=1.0,
    ),
    "switch-top1-capacity": dict(num_experts_per_tok=1, capacity_factor=1.0, router_z_loss_coef=0.01),
}


def family_config(name: str) -> SparseMoEConfig:
    return _tiny(**FAMILIES[name])


def family_batch(seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def train_dataset() -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(3, VOCAB, (STEPS * GLOBAL_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def write_checkpoints(workdir: Path) -> None:
    """The single-process checkpoints every scenario starts from: WORKDIR/ckpt/train and WORKDIR/ckpt/<family>."""
    torch.manual_seed(0)
    SparseMoEForCausalLM(train_config()).save_pretrained(Path(workdir) / "ckpt" / "train")
    for seed, name in enumerate(FAMILIES):
        torch.manual_seed(seed)
        SparseMoEForCausalLM(family_config(name)).save_pretrained(Path(workdir) / "ckpt" / name)


def router_biases(model) -> dict[str, torch.Tensor]:
    routers = ((n, m) for n, m in model.named_modules() if isinstance(m, SparseMoERouter))
    return {n: m.e_score_correction_bias.detach().float().cpu() for n, m in routers}


def device() -> torch.device:
    """This rank's device: its GPU under NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cuda" if torch.cuda.is_available() and not dist.is_initialized() else "cpu")


def run_trainer(model, output_dir, per_device_batch: int, average_tokens: bool = True, grad_accum: int = 1) -> dict:
    """`STEPS` optimizer steps of `Trainer` in data order (sequential sampler: rank r of N gets rows r*b..r*b+b-1 of
    every global micro-batch, which is exactly the single process's micro-batch of N*b). Returns the loss of every
    micro-batch as Trainer computes it on this rank, the router biases after training, and the router telemetry of
    the whole run (logged once, at the last step: per-layer expert loads and the imbalance)."""
    from transformers import Trainer, TrainingArguments

    class RecordingTrainer(Trainer):
        losses: list[float] = []

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.losses.append(loss.item())
            return loss

    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=grad_accum,
        learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        train_sampling_strategy="sequential", average_tokens_across_devices=average_tokens,
        use_cpu=device().type == "cpu",
        report_to=[], save_strategy="no", logging_strategy="steps", logging_steps=STEPS, disable_tqdm=True, seed=0,
        dataloader_num_workers=0,
    )
    telemetry = RouterTelemetryCallback(json_file=None)
    trainer = RecordingTrainer(
        model=model, args=args, train_dataset=train_dataset(), callbacks=[RouterBiasUpdateCallback(), telemetry]
    )
    trainer.losses = []
    trainer.train()
    (logged,) = telemetry.history
    return {
        "losses": list(trainer.losses), "biases": router_biases(trainer.model), "trainer": trainer,
        "telemetry": {"counts": logged["counts"], "load_imbalance": logged["load_imbalance"]},
    }


# ---------------------------------------------------------------------------------------------------------- scenarios
def _eval_logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(family_batch(123).to(device())).logits.detach().float().cpu()


def scenario_ddp(workdir: Path, rank: int, average_tokens: bool = True, name: str = "ddp", grad_accum: int = 1):
    model = SparseMoEForCausalLM.from_pretrained(workdir / "ckpt" / "train")
    result = run_trainer(
        model, workdir / "out" / f"{name}-run", 2 // grad_accum, average_tokens=average_tokens, grad_accum=grad_accum
    )
    trainer = result.pop("trainer")
    result["engine"] = type(trainer.model_wrapped).__name__
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # gathered under FSDP / ZeRO-3
    if rank == 0:
        trainer.accelerator.unwrap_model(trainer.model_wrapped).save_pretrained(
            workdir / "out" / f"{name}-model", state_dict=state_dict
        )
    result["logits"] = _eval_logits(trainer.model_wrapped)
    return result


def scenario_fsdp(workdir: Path, rank: int, average_tokens: bool = True, name: str = "fsdp") -> dict:
    from torch.distributed.fsdp import FSDPModule
    from transformers.distributed import DistributedConfig

    model = SparseMoEForCausalLM.from_pretrained(
        workdir / "ckpt" / "train", distributed_config=DistributedConfig(fsdp_size=2)
    )
    sharded = [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]
    result = run_trainer(model, workdir / "out" / f"{name}-run", per_device_batch=2, average_tokens=average_tokens)
    trainer = result.pop("trainer")
    trainer.model.save_pretrained(workdir / "out" / f"{name}-model")  # every rank: gathers the shards, rank 0 writes
    result["logits"] = _eval_logits(trainer.model)
    result["fsdp_modules"] = sharded
    result["engine"] = "DistributedConfig(fsdp_size=2)"
    return result


def scenario_tp(workdir: Path, rank: int) -> dict:
    from transformers.distributed import DistributedConfig

    result = {}
    for name in FAMILIES:
        model = SparseMoEForCausalLM.from_pretrained(
            workdir / "ckpt" / name, distributed_config=DistributedConfig(tp_size=2)  # = tp_plan="auto"
        )
        sharded = model.model.layers[0].self_attn.q_proj.weight
        result[f"{name}/q_proj_local_rows"] = sharded.to_local().shape[0] if hasattr(sharded, "to_local") else -1
        with torch.no_grad():
            ids = family_batch(1).to(model.device)
            result[f"{name}/eval"] = model.eval()(ids).logits.detach().float().cpu()
            result[f"{name}/train"] = model.train()(ids).logits.detach().float().cpu()
    return result


def scenario_ep(workdir: Path, rank: int) -> dict:
    from transformers.distributed import DistributedConfig

    result = {}
    for name in FAMILIES:
        model = SparseMoEForCausalLM.from_pretrained(
            workdir / "ckpt" / name,
            distributed_config=DistributedConfig(fsdp_size=2, ep_size=2, ep_implementation="all_to_all"),
        )
        experts = model.model.layers[-1].mlp.experts
        result[f"{name}/local_experts"] = experts.num_experts
        ids = family_batch(10 + rank).to(model.device)  # each rank its own batch, as data parallelism gives it
        out = model.train()(ids, labels=ids)
        out.loss.backward()
        result[f"{name}/train"] = out.logits.detach().float().cpu()
        result[f"{name}/loss"] = out.loss.detach().float().cpu()
        dropped = out.dropped_fraction
        result[f"{name}/dropped"] = None if dropped is None else dropped.detach().float().cpu()
        with torch.no_grad():
            result[f"{name}/eval"] = model.eval()(ids).logits.detach().float().cpu()
    return result


SCENARIOS = {
    "ddp": scenario_ddp,
    "ddp_noavg": lambda workdir, rank: scenario_ddp(workdir, rank, average_tokens=False, name="ddp_noavg"),
    "ddp_accum": lambda workdir, rank: scenario_ddp(workdir, rank, name="ddp_accum", grad_accum=2),
    "fsdp": scenario_fsdp,
    "fsdp_noavg": lambda workdir, rank: scenario_fsdp(workdir, rank, average_tokens=False, name="fsdp_noavg"),
    "tp": scenario_tp,
    "ep": scenario_ep,
}


def main() -> None:
    import torch.distributed as dist

    workdir, names = Path(sys.argv[1]), sys.argv[2:] or list(SCENARIOS)
    torch.set_num_threads(1)
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > 1 else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=3))  # a failed rank cannot hang the test
    rank = dist.get_rank()
    (workdir / "out").mkdir(parents=True, exist_ok=True)
    for name in names:
        torch.manual_seed(0)
        try:
            result = SCENARIOS[name](workdir, rank)
        except Exception:  # recorded for the test to show; the other scenarios still run
            result = {"error": traceback.format_exc()}
        result["world_size"] = dist.get_world_size()
        torch.save(result, workdir / "out" / f"{name}.rank{rank}.pt")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
