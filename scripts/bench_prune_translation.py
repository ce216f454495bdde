"""Expert pruning on a translation model: chrF and BLEU on held-out verses against experts kept, per criterion, with
calibration from the task (the recipe's training pairs, prompt and reference as it trains on them) and from generic
text, against pruning at random, in one run.

    python -m modeling_sparse_moe.quickstart                 # writes out/quickstart/translation
    python scripts/bench_prune_translation.py out/quickstart/translation --json bench_results/bench_prune_translation.json
    python scripts/bench_prune_translation.py out/quickstart/translation --quick     # smoke: 8 verses, one count

Scored exactly as the translation recipe scores (`tasks.translation.translate_and_score`: its validation split of
held-out verses, first `--eval_samples`, decoded with the generation config saved with the model, sacrebleu's chrF
and BLEU). Calibration "task" is the first `--calibration_tokens` tokens of the recipe's training pairs
(`{source} => {target}`), never a validation verse; "generic" the Python docs CPython ships
(`compression.calibration`). Random: the mean over `--random_seeds` seeds. Writes JSON.
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from modeling_sparse_moe.compression.calibration import calibration_texts, token_blocks  # noqa: E402
from modeling_sparse_moe.compression.pruning import (  # noqa: E402
    apply_expert_selection,
    collect_expert_statistics,
    expert_scores,
    select_experts,
)
from modeling_sparse_moe.tasks import common  # noqa: E402
from modeling_sparse_moe.tasks.translation import (  # noqa: E402
    TranslationDataArguments,
    offline_translation_dataset,
    prompts_and_references,
    translate_and_score,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a translation model folder of the recipe (with its tokenizer)")
    parser.add_argument("--experts", default="6,4", help="expert counts to prune to")
    parser.add_argument("--criteria", default="reap,frequency,activation_norm,random")
    parser.add_argument("--calibration", default="task,generic", help="comma-separated: task, generic, bible")
    parser.add_argument("--calibration_tokens", type=int, default=16384)
    parser.add_argument("--random_seeds", type=int, default=2)
    parser.add_argument("--eval_samples", type=int, default=100, help="held-out verses scored")
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--json", default="bench_results/bench_prune_translation.json")
    args = parser.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"{args.model}: no config.json; give a translation model folder (out/quickstart/translation)")
    if args.quick:
        args.experts, args.eval_samples, args.calibration_tokens, args.random_seeds = "2", 8, 1024, 1
    return args


def task_texts(raw, data_args) -> list[str]:
    """The training pairs as the recipe trains on them: its prompt, then the reference."""
    prompts, references, _ = prompts_and_references(raw["train"], data_args)
    return [f"{prompt} {reference}" for prompt, reference in zip(prompts, references)]


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data_args = TranslationDataArguments()
    raw = offline_translation_dataset(data_args)
    validation = common.limit(raw["validation"], args.eval_samples)
    generation_config = model.generation_config  # saved by the recipe: the decoding the model was scored with

    def score(m) -> dict:
        scores, _ = translate_and_score(m, tokenizer, validation, data_args, generation_config, "scoring")
        return scores

    start = time.perf_counter()
    report = dict(model=args.model, num_experts=model.config.num_experts, eval_samples=len(validation),
                  generation=generation_config.to_diff_dict(), base=score(model), pruning={})
    print(f"unpruned: chrF {report['base']['chrf']:.2f}, BLEU {report['base']['bleu']:.2f} on {len(validation)} "
          f"held-out verses", flush=True)
    counts = [int(c) for c in args.experts.split(",") if c]
    corpora = [c for c in args.calibration.split(",") if c]
    for corpus in corpora:
        texts = task_texts(raw, data_args) if corpus == "task" else calibration_texts(corpus)
        stats = collect_expert_statistics(model, token_blocks(tokenizer, texts, args.block_size,
                                                              args.calibration_tokens))
        for criterion in [c for c in args.criteria.split(",") if c]:
            if criterion == "random" and corpus != corpora[0]:
                continue  # random reads no calibration: once is enough
            seeds = range(args.random_seeds) if criterion == "random" else [None]
            name = "random" if criterion == "random" else f"{criterion} ({corpus})"
            for kept in counts:
                runs = []
                for seed in seeds:
                    scores = (expert_scores(model, "random", seed=seed) if criterion == "random"
                              else [s.score(criterion) for s in stats])
                    runs.append(score(apply_expert_selection(copy.deepcopy(model), select_experts(scores, kept))))
                row = {metric: statistics.mean(r[metric] for r in runs) for metric in ("chrf", "bleu")}
                row.update(chrf_runs=[r["chrf"] for r in runs], vs_base_chrf=row["chrf"] - report["base"]["chrf"])
                report["pruning"].setdefault(name, {})[kept] = row
                print(f"{name:28s} {model.config.num_experts} -> {kept}: chrF {row['chrf']:6.2f} "
                      f"({row['vs_base_chrf']:+.2f}), BLEU {row['bleu']:5.2f}", flush=True)
    report["seconds"] = time.perf_counter() - start
    return report


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = run(args)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
