"""CUDA kernel sources (.cu, shipped as package data) and their CuPy loaders.

Empty until the fused softmax-cross-entropy kernel of the GPU solver lands (docs/design.md,
section 5).
"""
