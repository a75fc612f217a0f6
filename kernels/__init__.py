"""Attention and hot-path kernels: Triton on CUDA, PyTorch references elsewhere."""
