"""The setup and the inputs of benchmarks/gpu_check.py: the shapes and values every op is checked and timed on,
made as the layers make them (features, gates and decays in their ranges, fp32 where the layers keep fp32)."""

import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F

WINDOW = 64  # Liger's window branch: keys per query, its own included
SWA_RECENT, SWA_SINKS = 60, 4  # the swa baseline: a window of 64 counting 4 sinks
CHUNK, TOPK = 64, 4  # STILL: chunk size (and saliency window), salient tokens per chunk
PROBE = 0.05  # Parallax's probe r = PROBE * randn, small as a converted layer's (zero at conversion)


class Setup(NamedTuple):
    device: str
    dtype: torch.dtype  # activations; gates of linear states and the states stay fp32
    backend: str  # ours: "triton" on CUDA, "torch" in --smoke
    tol: float  # of the relative errors
    strict: bool  # raise (--smoke) instead of printing ERROR and going on
    budget: float  # seconds into the run after which no new row starts
    H: int
    Hkv: int
    D: int


def randn(s: Setup, *shape: int, scale: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
    return (scale * torch.randn(*shape, device=s.device)).to(dtype or s.dtype)


def softmax_features(s: Setup, *shape: int) -> torch.Tensor:
    """Liger's feature map: a softmax over the head dim."""
    return torch.randn(*shape, device=s.device).softmax(-1).to(s.dtype)


def np_map_features(s: Setup, *shape: int) -> torch.Tensor:
    """STILL's NP-Map-like features [softmax(u), softmax(-u)], twice the head dim, positive."""
    u = torch.randn(*shape, device=s.device)
    return torch.cat([u.softmax(-1), (-u).softmax(-1)], dim=-1).to(s.dtype)


def log_decay(s: Setup, *shape: int) -> torch.Tensor:
    """Liger's gates logsigmoid(x) / 16 in fp32, x ~ N(0, 4^2) as in the kernel tests."""
    return F.logsigmoid(4 * torch.randn(*shape, device=s.device)) / 16


def sink_mask(s: Setup, T: int) -> torch.Tensor:
    """`[1, T, SWA_SINKS]`: a query sees sink token e (one of the first tokens) once its window has left it."""
    t, e = torch.arange(T, device=s.device)[:, None], torch.arange(SWA_SINKS, device=s.device)[None, :]
    return (e <= t - SWA_RECENT)[None]


def liger_inputs(s: Setup, T: int) -> dict[str, torch.Tensor]:
    H, Hkv, D = s.H, s.Hkv, s.D
    return {
        "q_lin": softmax_features(s, 1, T, H, D),
        "k_lin": softmax_features(s, 1, T, Hkv, D),
        "v": randn(s, 1, T, Hkv, D),
        "g": log_decay(s, 1, T, Hkv, D),
        "q_rot": randn(s, 1, T, H, D),
        "k_rot": randn(s, 1, T, Hkv, D),
    }


def liger_decode_inputs(s: Setup, B: int, filled: list[int]) -> dict[str, torch.Tensor]:
    """One new token per row; row b has `filled[b]` valid window slots (the last ones)."""
    H, Hkv, D = s.H, s.Hkv, s.D
    slots = torch.arange(WINDOW, device=s.device)
    return {
        "q_lin": softmax_features(s, B, H, D),
        "k_lin": softmax_features(s, B, Hkv, D),
        "v": randn(s, B, Hkv, D),
        "g": log_decay(s, B, Hkv, D),
        "state": randn(s, B, Hkv, D, D, scale=0.1, dtype=torch.float32),
        "q_rot": randn(s, B, H, D),
        "window_k": randn(s, B, WINDOW, Hkv, D),
        "window_v": randn(s, B, WINDOW, Hkv, D),
        "window_valid": slots >= WINDOW - torch.tensor(filled, device=s.device)[:, None],
    }


def still_inputs(s: Setup, T: int) -> dict[str, torch.Tensor]:
    H, Hkv, D = s.H, s.Hkv, s.D
    return {
        "q": randn(s, 1, T, H, D),
        "k": randn(s, 1, T, Hkv, D),
        "v": randn(s, 1, T, Hkv, D),
        "q_feat": np_map_features(s, 1, T, H, D),
        "k_feat": np_map_features(s, 1, T, H, D),  # per query head: K is GQA-expanded before the map
        "gate": torch.sigmoid(torch.randn(1, T, H, D, device=s.device)).to(s.dtype),
    }


def parallax_inputs(s: Setup, T: int) -> dict[str, torch.Tensor]:
    H, Hkv, D = s.H, s.Hkv, s.D
    q, r = randn(s, 1, T, H, D), randn(s, 1, T, H, D, scale=PROBE)
    return {"q": q, "r": r, "k": randn(s, 1, T, Hkv, D), "v": randn(s, 1, T, Hkv, D)}


if __name__ == "__main__":
    sys.exit(f"{__file__} holds helpers of benchmarks/gpu_check.py, which is the script to run (see its --help)")
