"""Standalone Triton kernels, installed as altgrad.kernels (see kernels/README.md)."""
