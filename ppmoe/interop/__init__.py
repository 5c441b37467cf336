"""Interchange with transformers: export a checkpoint as a transformers model directory (Llama, Mixtral,
Qwen2-MoE), import one as a ppmoe checkpoint. Runs on one process, outside any training job."""
