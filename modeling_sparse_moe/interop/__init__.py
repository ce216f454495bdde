"""Interop: SparseMoE <-> transformers' native MoE families (conversion), serving formats (native-family and GGUF
export), and the Hub (model card, folder validation, push). Conversion and export share one set of per-family rules
(`families.py`) and one streaming safetensors reader/writer (`safetensors_io.py`)."""
