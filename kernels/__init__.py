"""Triton kernels for the course: fused attention and fused log-probs, each with its PyTorch reference."""
