"""Quantized experts: memory, quality, QLoRA and speed of NF4 experts against full precision, in one run.

    # a small pretrained model first (the quickstart's --size small model, 300 steps; ~25 min on 1 busy core):
    python scripts/pretrain.py --config_name demo \
        --config_overrides num_hidden_layers=4,vocab_size=4096,max_position_embeddings=512 \
        --output_dir out/pretrain_small --do_train --max_steps 300 --per_device_train_batch_size 16 --block_size 128 \
        --learning_rate 2e-3 --lr_scheduler_type cosine --warmup_steps 15 --save_strategy no --report_to none
    python scripts/bench_quant.py --pretrained out/pretrain_small      # ~10 min on 2 CPU cores
    python scripts/bench_quant.py --quick                              # smoke run on a random tiny model, < 1 min

Sections (each compares against full precision in the same process):
  1. memory: expert bytes of NF4 (double quantization) vs bf16, and the whole-model footprint of configs/demo in bf16
     vs NF4 (`get_memory_footprint`);
  2. variants: for each model variant (`model_variants`; fp32 and NF4 here, a hook for more, e.g. int8 experts) the
     footprint, validation perplexity on held-out World English Bible chapters (pretraining's fixed split), prefill
     time and greedy decode tokens/s, timed interleaved;
  3. QLoRA vs LoRA on full-precision weights: same data, steps, seed and LoRA init (attention + experts); the two
     loss curves, the step time (steps alternate between the two, so load hits both alike), and the peak RSS of a
     training step of each, QLoRA vs LoRA on a bf16 base, each in a fresh subprocess.
Writes JSON (default `bench_results/bench_quant.json`).
"""

import argparse
import copy
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_model import _peak_rss_mb, generate_fn, prefill_fn, run_and_report  # noqa: E402
from bench_moe import time_interleaved  # noqa: E402

from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig  # noqa: E402

from modeling_sparse_moe import SparseMoEForCausalLM  # noqa: E402
from modeling_sparse_moe.configs import config_path  # noqa: E402
from modeling_sparse_moe.quantization import expert_bytes, quantize_model, with_quantized_experts  # noqa: E402


def nf4_config(compute_dtype=torch.float32) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def quick_model(folder: Path) -> Path:
    """A random tiny model with a small tokenizer (smoke runs): widths divisible by 64."""
    from modeling_sparse_moe.recipes.data import load_text_corpus, train_tokenizer

    tokenizer = train_tokenizer(load_text_corpus(max_chars=50_000), vocab_size=512)
    config = quick_config(vocab_size=len(tokenizer))
    torch.manual_seed(0)
    SparseMoEForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def quick_config(**overrides):
    from modeling_sparse_moe import SparseMoEConfig

    kwargs = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                  max_position_embeddings=256, initializer_range=0.02)
    kwargs.update(overrides)
    return SparseMoEConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------------- memory
def memory_rows() -> dict:
    """configs/demo in bf16 against the same model with NF4 experts and linear layers (double quantization)."""
    from transformers import AutoConfig

    torch.manual_seed(0)
    bf16 = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_path("demo"))).to(torch.bfloat16).eval()
    nf4 = quantize_model(copy.deepcopy(bf16), nf4_config(torch.bfloat16))
    experts_bf16 = sum(expert_bytes(m) for n, m in bf16.named_modules() if n.endswith("mlp.experts"))
    experts_nf4 = sum(expert_bytes(m) for n, m in nf4.named_modules() if n.endswith("mlp.experts"))
    return {
        "experts_bytes_bf16": experts_bf16,
        "experts_bytes_nf4": experts_nf4,
        "experts_ratio": experts_nf4 / experts_bf16,
        "model_bytes_bf16": bf16.get_memory_footprint(),
        "model_bytes_nf4": nf4.get_memory_footprint(),
        "model_ratio": nf4.get_memory_footprint() / bf16.get_memory_footprint(),
    }


# -------------------------------------------------------------------------------------------------------- variants
def model_variants(folder: Path) -> dict:
    """name -> a function building that variant of the model in `folder`. Add rows here (or pass your own dict to
    `measure_variants`): e.g. `variants["int8 experts"] = lambda: load_int8(folder)`."""
    return {
        "fp32": lambda: AutoModelForCausalLM.from_pretrained(folder).eval(),
        "nf4": lambda: AutoModelForCausalLM.from_pretrained(folder, quantization_config=nf4_config()).eval(),
    }


def validation_blocks(folder: Path, block_size: int, max_blocks: int, max_corpus_chars: int | None) -> torch.Tensor:
    """Held-out World English Bible blocks: pretraining's fixed validation split (the chapters the model never saw)."""
    from modeling_sparse_moe.recipes import pretraining

    data_args = pretraining.DataTrainingArguments(max_corpus_chars=max_corpus_chars)
    raw = pretraining.load_raw_datasets(data_args)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    packed = pretraining.tokenize_and_pack(raw, tokenizer, block_size, data_args)
    return torch.tensor(packed["validation"]["input_ids"][:max_blocks])


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch: int = 8) -> float:
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch):
        ids = blocks[start : start + batch]
        total += model(input_ids=ids, labels=ids).loss.item() * ids.numel()
        count += ids.numel()
    return math.exp(total / count)


def measure_variants(variants: dict, blocks: torch.Tensor, args) -> dict:
    """Footprint and perplexity of each variant, then prefill and decode timed interleaved across all of them."""
    models = {name: build() for name, build in variants.items()}
    rows = {name: {"footprint_bytes": m.get_memory_footprint(), "perplexity": perplexity(m, blocks)}
            for name, m in models.items()}
    prompt = blocks[:1, : args.prompt]
    prefill_ids = blocks[: args.batch, : args.prefill]
    steps = {f"{name}/prefill": prefill_fn(m, prefill_ids) for name, m in models.items()}
    steps |= {f"{name}/decode": generate_fn(m, prompt, args.new_tokens) for name, m in models.items()}
    times = time_interleaved(steps, "cpu", args.repeats, min_sample_s=0.0, warmup=1)
    for name in models:
        rows[name]["prefill_ms"] = 1e3 * times[f"{name}/prefill"]
        rows[name]["decode_tokens_per_s"] = args.new_tokens / times[f"{name}/decode"]
    return rows


# ----------------------------------------------------------------------------------------------------------- QLoRA
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            target_parameters=["experts.gate_up_proj", "experts.down_proj"])


def lora_model(folder: Path, quantized: bool, dtype=torch.float32):
    import peft

    if quantized:
        base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=nf4_config())
        base = peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    else:
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    torch.manual_seed(0)  # the same LoRA init for both
    return peft.get_peft_model(base, with_quantized_experts(peft.LoraConfig(**LORA))).train()


def qlora_vs_lora(folder: Path, train_blocks: torch.Tensor, args) -> dict:
    models = {"lora_fp32": lora_model(folder, quantized=False), "qlora_nf4": lora_model(folder, quantized=True)}
    optimizers = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=args.lora_lr)
                  for n, m in models.items()}
    curves = {name: [] for name in models}
    seconds = {name: [] for name in models}
    for step in range(args.lora_steps):
        start = (step * args.batch) % max(1, len(train_blocks) - args.batch)
        ids = train_blocks[start : start + args.batch]
        for name, model in models.items():  # alternating: load from other processes hits both alike
            begin = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            seconds[name].append(time.perf_counter() - begin)
            curves[name].append(loss.item())
    median = {name: sorted(s)[len(s) // 2] for name, s in seconds.items()}
    return {"loss_curves": curves, "step_s_median": median,
            "step_time_ratio_qlora_over_lora": median["qlora_nf4"] / median["lora_fp32"]}


def rss_worker(args) -> dict:
    """Fresh process: two training steps of one LoRA variant, then its peak RSS (VmHWM)."""
    torch.set_num_threads(args.threads)
    folder = Path(args.rss_worker_folder)
    quantized = args.rss_worker == "qlora_nf4"
    model = lora_model(folder, quantized=quantized, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.seq), generator=generator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"variant": args.rss_worker, "peak_rss_mb": _peak_rss_mb()}


def measure_rss(args, folder: Path, variant: str) -> dict:
    command = [sys.executable, __file__, "--rss-worker", variant, "--rss-worker-folder", str(folder),
               "--threads", str(args.threads), "--batch", str(args.batch), "--seq", str(args.seq)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------------- run
def run(args) -> dict:
    if args.pretrained:
        folder = Path(args.pretrained)
    else:
        folder = quick_model(Path(args.work_dir) / "quick_model")
    report = {"source": str(folder), "memory_demo": memory_rows()}
    config = AutoModelForCausalLM.from_pretrained(folder).config
    block_size = min(args.seq, config.max_position_embeddings)
    chars = 300_000 if args.quick else None
    blocks = validation_blocks(folder, block_size, args.eval_blocks, chars)
    report["variants"] = measure_variants(model_variants(folder), blocks, args)
    fp, nf4 = report["variants"]["fp32"], report["variants"]["nf4"]
    report["perplexity_ratio_nf4"] = nf4["perplexity"] / fp["perplexity"]
    # LoRA data: training blocks of the same corpus (the first texts; the validation chapters are held out)
    from modeling_sparse_moe.recipes import pretraining

    data_args = pretraining.DataTrainingArguments(max_corpus_chars=chars or 400_000)
    raw = pretraining.load_raw_datasets(data_args)
    packed = pretraining.tokenize_and_pack(raw, AutoTokenizer.from_pretrained(folder), block_size, data_args)
    train_blocks = torch.tensor(packed["train"]["input_ids"][: 4 * args.batch * args.lora_steps])
    report["qlora"] = qlora_vs_lora(folder, train_blocks, args)
    if not args.no_rss:
        variants = ("lora_bf16", "qlora_nf4")
        report["qlora"]["peak_rss_mb"] = {v: measure_rss(args, folder, v)["peak_rss_mb"] for v in variants}
    return report


def print_table(report: dict, args) -> None:
    mem = {k: v / 2**20 if k.endswith("bytes_bf16") or k.endswith("bytes_nf4") else v
           for k, v in report["memory_demo"].items()}
    print(f"\nconfigs/demo: experts {mem['experts_bytes_bf16']:.1f} MiB bf16 -> {mem['experts_bytes_nf4']:.1f} MiB NF4 "
          f"({mem['experts_ratio']:.3f}x); whole model {mem['model_bytes_bf16']:.1f} -> {mem['model_bytes_nf4']:.1f} MiB "
          f"({mem['model_ratio']:.3f}x)")
    print(f"\nmodel: {report['source']}")
    print(f"{'variant':<12} {'footprint MiB':>14} {'perplexity':>11} {'prefill ms':>11} {'decode tok/s':>13}")
    for name, row in report["variants"].items():
        print(f"{name:<12} {row['footprint_bytes'] / 2**20:>14.1f} {row['perplexity']:>11.3f} "
              f"{row['prefill_ms']:>11.1f} {row['decode_tokens_per_s']:>13.1f}")
    print(f"NF4 / fp32 perplexity: {report['perplexity_ratio_nf4']:.4f}")
    q = report["qlora"]
    for name, curve in q["loss_curves"].items():
        shown = " ".join(f"{x:.2f}" for x in curve[:: max(1, len(curve) // 10)])
        print(f"{name:<10} loss: {shown} -> {curve[-1]:.2f}")
    print(f"training step: QLoRA {1e3 * q['step_s_median']['qlora_nf4']:.0f} ms, LoRA fp32 "
          f"{1e3 * q['step_s_median']['lora_fp32']:.0f} ms ({q['step_time_ratio_qlora_over_lora']:.2f}x)")
    if "peak_rss_mb" in q:
        print("peak RSS of a training step: " + ", ".join(f"{k} {v:.0f} MB" for k, v in q["peak_rss_mb"].items()))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", help="a model folder from scripts/pretrain.py (default with --quick: random)")
    parser.add_argument("--work-dir", default="bench_results/bench_quant_work")
    parser.add_argument("--device", default="cpu", choices=["cpu"], help="CPU only (the GPU table is future work)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eval-blocks", type=int, default=64)
    parser.add_argument("--lora-steps", type=int, default=40)
    parser.add_argument("--lora-lr", type=float, default=2e-3)
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--json", default="bench_results/bench_quant.json")
    parser.add_argument("--quick", action="store_true", help="smoke run: random tiny model, few blocks and steps")
    parser.add_argument("--rss-worker", choices=["lora_bf16", "qlora_nf4"], help=argparse.SUPPRESS)
    parser.add_argument("--rss-worker-folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.prefill, args.new_tokens, args.repeats = 2, 64, 64, 8, 2
        args.eval_blocks, args.lora_steps = 8, 6
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss_worker:
        print(json.dumps(rss_worker(args)))
        return {}
    return run_and_report(args, run, print_table)


if __name__ == "__main__":
    main()
