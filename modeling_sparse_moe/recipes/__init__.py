"""Training recipes: offline corpora and tokenizers (`data`), Trainer pieces (`training`: router callbacks, telemetry,
safe saves), the pretraining recipe (`pretraining`), the MoE-vs-dense study (`study`) and pictures (`plotting`).
Task fine-tuning recipes live in `modeling_sparse_moe.tasks`."""
