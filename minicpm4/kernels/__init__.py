"""Functional ops. Each op folder holds a pure-PyTorch reference and its dispatch (docs/kernels.md)."""
