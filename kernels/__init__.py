"""Attention kernels, one op per folder (a plain PyTorch `reference.py`, the chunked PyTorch path, Triton, and
the dispatcher last): `gla` (gated linear attention), `window` (sliding-window softmax attention, with sinks),
`liger`, `still` and `parallax` (each method's own ops), over the shared pieces in `common`; `backend` picks the
implementation a call runs on. The two ops every method builds on are re-exported here.

Installed as `linearize.kernels`. Where a checkout's root is on sys.path (`python -m linearize`, `torchrun -m`,
`python -m pytest` run from it), this folder is also found as the top-level `kernels`, the name of the Hugging Face
package that transformers imports; it then loads that package in its own place rather than shadow it.
"""

if __name__ == "kernels":
    from ._shadowed import load_installed_kernels

    load_installed_kernels()
else:
    from .backend import BACKENDS, resolve_backend
    from .gla import gated_linear_attention
    from .window import sliding_window_attention

    __all__ = ["BACKENDS", "gated_linear_attention", "resolve_backend", "sliding_window_attention"]
