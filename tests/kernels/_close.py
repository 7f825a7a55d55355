import torch

# fp32 tolerance for ||ref - out|| / ||ref||: the torch paths reorder fp32 sums, which costs ~1e-6 relative
# on outputs and up to ~1e-5 on the decay gradient under strong decay, so 1e-4 leaves a 10x margin
FP32_RATIO = 1e-4
# bf16 tolerances, for a torch path given bf16 inputs against the oracle on the same inputs upcast. Rounding the
# oracle's output to bf16 alone costs ~1.7e-3, and ~2.4e-3 on a gradient (whose incoming gradient is rounded too);
# the paths that compute in fp32 measured at most 3.4e-3 here (sink keys' gradients, summed over many queries), so
# 5e-3 fails one that rounds an intermediate where that costs more than rounding its result (SDPA's bf16 backward,
# which rounds the score gradients before the products that sum them: 5.4e-3 on these inputs, 0.15 on dq with
# biased keys, so the window op differentiates SDPA in fp32).
BF16_RATIO = 5e-3


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float = FP32_RATIO) -> None:
    """Assert `out` matches `ref`: max abs error <= 1e-6, or no NaN and ||ref - out||_2 / ||ref||_2 < ratio."""
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    ref, out = ref.detach().double(), out.detach().double()
    abs_err = (ref - out).abs().max().item() if ref.numel() else 0.0
    if abs_err <= 1e-6:
        return
    assert not out.isnan().any(), f"{name}: NaN in output"
    if ref.abs().max() <= 1e-12:
        # a zero reference (e.g. dq when a query sees only itself, which float64 reaches up to ~1e-16 by
        # cancellation) has no relative error: allow the fp32 rounding noise of a path that cancels the same way
        assert abs_err <= 1e-5, f"{name}: reference is zero, max abs error {abs_err:.3e} > 1e-5"
        return
    rel_err = ((ref - out).norm() / ref.norm()).item()
    assert rel_err < ratio, f"{name}: relative error {rel_err:.3e} >= {ratio:.1e} (max abs error {abs_err:.3e})"


def head_major(x: torch.Tensor, room: int) -> torch.Tensor:
    """`x` [B, L, H, D] as a view of a head-major [B, H, L + room, D] buffer whose room after each head is NaN (a
    decode cache that grows in place): the same values, strided, with unwritten memory beside them."""
    B, L, H, D = x.shape
    buffer = torch.full((B, H, L + room, D), float("nan"), dtype=x.dtype, device=x.device)
    buffer[:, :, :L] = x.transpose(1, 2)
    return buffer[:, :, :L].transpose(1, 2)
