"""Attention kernels: gated linear attention and sliding-window softmax attention."""

from .backend import BACKENDS, resolve_backend
from .gla import gated_linear_attention
from .window import sliding_window_attention

__all__ = ["BACKENDS", "gated_linear_attention", "resolve_backend", "sliding_window_attention"]
