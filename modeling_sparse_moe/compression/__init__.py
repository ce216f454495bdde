"""Making a trained model smaller for inference, outside the Hub-facing files: expert pruning and merging, fewer
experts per token, and the memory planner that prices each option. The quantized kernels themselves
(`quantization.py`, `int8_experts.py`) sit with the model files, because a saved quantized folder needs them."""
