"""SQuAD v1.1/v2.0 metric as a local `evaluate` module: load with `evaluate.load(<this folder>)`."""
