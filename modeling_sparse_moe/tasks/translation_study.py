"""MoE vs dense on translation at equal active parameters, over several seeds: the study that picks the translation
recipe's default shape. Every run trains from scratch with `translation.main` on the same data, the same shared
tokenizer, the same steps and learning rate; only the FFN shape and the seed change.

    from modeling_sparse_moe.tasks.translation_study import run_study
    table = run_study("out/study", seeds=[0, 1, 2], max_steps=300)
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time


from .common import write_json
from .data import bible_translation_dataset, texts_of
from .. import SparseMoEConfig
from ..recipes.data import train_tokenizer

logger = logging.getLogger(__name__)

# Shapes compared, as config overrides of the base config. Each MoE shape has the dense FFN's active width
# (`intermediate_size` of dense = top_k * moe_intermediate_size + shared width).
BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
SHAPES = {
    "dense": dict(intermediate_size=128, mlp_only_layers=[0, 1]),
    "moe-8x64-top2": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64),
    "moe-16x32-top3+shared32": dict(num_experts=16, num_experts_per_tok=3, moe_intermediate_size=32,
                                     num_shared_experts=1, shared_expert_intermediate_size=32),
}



def _config(shape: dict, vocab_size: int):
    return SparseMoEConfig(**{**BASE, **shape, "vocab_size": vocab_size})


def run_study(
    output_dir: str,
    seeds: list[int] = (0, 1, 2),
    shapes: list[str] | None = None,
    max_steps: int = 300,
    train_samples: int = 4000,
    eval_samples: int = 100,
    max_corpus_chars: int = 80,
    learning_rate: float = 3e-3,
    batch_size: int = 16,
    vocab_size: int = 1024,
) -> dict:
    """Train every shape with every seed; write `study.json` after each run (a partial study is still usable) and
    return {shape: {runs: [...], bleu_mean, bleu_std, chrf_mean, ...}}."""
    from . import translation  # late import: translation imports this package

    shapes = list(shapes or SHAPES)
    os.makedirs(output_dir, exist_ok=True)
    data = bible_translation_dataset("en", "fr", max_chars=max_corpus_chars)
    data_dir = os.path.join(output_dir, "data")
    os.makedirs(data_dir, exist_ok=True)
    files = {}
    for split, n in (("train", train_samples), ("validation", eval_samples)):
        path = os.path.join(data_dir, f"{split}.jsonl")
        data[split].select(range(min(n, len(data[split])))).to_json(path, force_ascii=False)
        files[split] = path
    tok_dir = os.path.join(output_dir, "tokenizer")
    train_tokenizer(texts_of(data["train"].select(range(min(train_samples, len(data["train"])))), ["translation"]),
                    vocab_size).save_pretrained(tok_dir)

    study_path = os.path.join(output_dir, "study.json")
    study = json.load(open(study_path)) if os.path.exists(study_path) else {}
    for seed in seeds:
        for name in shapes:
            runs = study.setdefault(name, {"runs": []})["runs"]
            if any(r["seed"] == seed for r in runs):
                continue  # resumable: a finished run is not repeated
            cfg = _config(SHAPES[name], vocab_size)
            cfg_dir = os.path.join(output_dir, "configs", name)
            cfg.save_pretrained(cfg_dir)
            start = time.perf_counter()
            result = translation.main([
                "--config_name", cfg_dir, "--tokenizer_name", tok_dir,
                "--train_file", files["train"], "--validation_file", files["validation"],
                "--output_dir", os.path.join(output_dir, "runs", f"{name}-seed{seed}"), "--overwrite_output_dir",
                "--do_train", "--do_eval", "--predict_with_generate", "--seed", str(seed),
                "--max_steps", str(max_steps), "--per_device_train_batch_size", str(batch_size),
                "--learning_rate", str(learning_rate), "--lr_scheduler_type", "cosine", "--warmup_steps", "20",
                "--max_source_length", "64", "--max_target_length", "64", "--val_max_target_length", "48",
                "--generation_batch_size", "50", "--save_strategy", "no", "--logging_steps", "50",
                "--report_to", "none", "--disable_tqdm", "true",
            ])
            runs.append({
                "seed": seed, "bleu": result["eval_bleu"], "chrf": result["eval_chrf"],
                "bleu_before": result["eval_bleu_before"], "chrf_before": result["eval_chrf_before"],
                "eval_loss": result["eval_loss"], "train_loss": result["train_loss"],
                "wall_s": time.perf_counter() - start,
                "total_params": cfg.num_parameters() if hasattr(cfg, "num_parameters") else None,
                "active_params": cfg.num_active_parameters() if hasattr(cfg, "num_active_parameters") else None,
            })
            summarize(study)
            write_json(study_path, study)
            logger.info("%s seed %d: BLEU %.2f chrF %.2f", name, seed, runs[-1]["bleu"], runs[-1]["chrf"])
    return study


def summarize(study: dict) -> dict:
    for entry in study.values():
        runs = entry["runs"]
        for key in ("bleu", "chrf", "eval_loss"):
            values = [r[key] for r in runs]
            entry[f"{key}_mean"] = statistics.fmean(values)
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            entry[f"{key}_min"], entry[f"{key}_max"] = min(values), max(values)
    return study


def table(study: dict) -> str:
    """A Markdown table of the study: mean ± std (min-max) per shape."""
    lines = ["| shape | seeds | BLEU mean ± std (min–max) | chrF mean ± std (min–max) | eval loss | active / total params |",
             "|---|---|---|---|---|---|"]
    for name, e in study.items():
        r = e["runs"][0]
        lines.append(
            f"| {name} | {len(e['runs'])} | {e['bleu_mean']:.2f} ± {e['bleu_std']:.2f} ({e['bleu_min']:.2f}–{e['bleu_max']:.2f}) "
            f"| {e['chrf_mean']:.2f} ± {e['chrf_std']:.2f} ({e['chrf_min']:.2f}–{e['chrf_max']:.2f}) "
            f"| {e['eval_loss_mean']:.3f} ± {e['eval_loss_std']:.3f} | {r['active_params']:,} / {r['total_params']:,} |"
        )
    return "\n".join(lines)


def merge(folders: list[str]) -> dict:
    """One study from several `study.json` files (runs of one study split over processes, e.g. one seed each)."""
    study: dict = {}
    for folder in folders:
        with open(os.path.join(folder, "study.json")) as f:
            for name, entry in json.load(f).items():
                runs = study.setdefault(name, {"runs": []})["runs"]
                runs.extend(r for r in entry["runs"] if all(r["seed"] != s["seed"] for s in runs))
    for entry in study.values():
        entry["runs"].sort(key=lambda r: r["seed"])
    return summarize(study)
