"""Rank passages for a query with mean-pooled SparseMoE embeddings, and score recall@k on held-out country facts.

    python scripts/retrieval_example.py --model_name_or_path out/qa-ext --query "What is the capital of Norway?"
"""

import json

from modeling_sparse_moe.tasks.retrieval import main

if __name__ == "__main__":
    result = main()
    print(json.dumps(result, indent=2, ensure_ascii=False))
