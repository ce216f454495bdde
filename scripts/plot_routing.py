"""Routing pictures of a trained model folder (e.g. the output of scripts/pretrain.py).

    python scripts/plot_routing.py out/pretrain --text "In the beginning God created the heavens and the earth." \
        --layer 0 --output_dir out/pretrain/plots

Writes token_routing.png (which experts each token went to, per layer), expert_specialisation.png and .md (the tokens
most often routed to each expert of --layer, over --num_texts held-out chapters of the World English Bible or the
lines of --text_file), and expert_load.png from the folder's router_telemetry.json when there is one.
All logic lives in `modeling_sparse_moe.recipes.plotting`.
"""

import argparse
from pathlib import Path

import modeling_sparse_moe  # noqa: F401  (registers the sparse_moe model type)
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_sparse_moe.recipes import plotting
from modeling_sparse_moe.recipes.data import load_bible_corpus
from modeling_sparse_moe.recipes.training import TELEMETRY_FILE


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a model folder with its tokenizer")
    parser.add_argument("--text", default="In the beginning God created the heavens and the earth.")
    parser.add_argument("--layer", type=int, default=None, help="MoE layer for the specialisation table")
    parser.add_argument("--text_file", default=None, help="texts (one per line) for the specialisation table")
    parser.add_argument("--num_texts", type=int, default=40)
    parser.add_argument("--top_n", type=int, default=8)
    parser.add_argument("--output_dir", default=None, help="default: MODEL/plots")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir or Path(args.model) / "plots")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    written = [plotting.plot_token_routing(plotting.route_tokens(model, tokenizer, args.text), out / "token_routing.png")]
    if args.text_file:
        texts = [line.strip() for line in Path(args.text_file).read_text().splitlines() if line.strip()]
    else:
        texts = load_bible_corpus()[-args.num_texts :]  # Revelation and the last epistles
    spec = plotting.expert_top_tokens(model, tokenizer, texts[: args.num_texts], layer=args.layer, top_n=args.top_n)
    written.append(plotting.plot_expert_specialisation(spec, out / "expert_specialisation.png"))
    table = plotting.specialisation_table(spec)
    (out / "expert_specialisation.md").write_text(table)
    telemetry = Path(args.model) / TELEMETRY_FILE
    if telemetry.is_file():
        written.append(plotting.plot_load_heatmap(telemetry, out / "expert_load.png"))
    print(table)
    for path in written:
        print("wrote", path)


if __name__ == "__main__":
    main()
