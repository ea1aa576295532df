"""Command-line tools behind ``python -m fpn_kernels``."""
