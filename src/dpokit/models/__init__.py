"""Model loading, LoRA, fused kernels, attention layouts and per-token log-probs."""
