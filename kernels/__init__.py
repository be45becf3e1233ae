"""Triton kernels for the course: fused attention and fused log-probs, each with its PyTorch reference."""

import os

import torch


def gpu_path(device):
    """Whether code on `device` takes the GPU's path: bf16 autocast, the Triton kernels for "auto", the sampling
    sizes of a GPU. True on CUDA; on a CPU only with RLHF_CUDA_SHAPED=1, which runs every GPU branch on the
    CPU so that the tests execute them (the kernels under TRITON_INTERPRET=1)."""
    return torch.device(device).type == "cuda" or os.environ.get("RLHF_CUDA_SHAPED") == "1"
