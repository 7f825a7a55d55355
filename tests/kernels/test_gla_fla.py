"""Our GLA against flash-linear-attention (in the `test` extra): its pure-PyTorch reference, and its `chunk_gla`
kernel as our `fla` backend (on the GPU, or under the Triton interpreter on CPU)."""

import fla.ops.gla.naive as fla_naive
import pytest
import torch
import torch.nn.functional as F
from linearize.kernels.gla import gated_linear_attention, naive_recurrent_gla

from tests.kernels._close import assert_close
from tests.kernels._devices import TRITON_DEVICE, needs_triton_device


def _inputs(B=2, T=37, H=2, Hkv=2, K=16, V=16, seed=0):
    torch.manual_seed(seed)
    return {
        "q": torch.randn(B, T, H, K),
        "k": torch.randn(B, T, Hkv, K),
        "v": torch.randn(B, T, Hkv, V),
        "g": F.logsigmoid(torch.randn(B, T, Hkv, K) * 4) / 16,
        "initial_state": torch.randn(B, Hkv, K, V),
    }


def test_our_reference_agrees_with_fla_naive_recurrent_gla():
    x = _inputs()
    # fla's reference fixes the scale at K ** -0.5 and has no GQA
    theirs_o, theirs_state = fla_naive.naive_recurrent_gla(
        x["q"], x["k"], x["v"], x["g"], initial_state=x["initial_state"], output_final_state=True
    )
    ours_o, ours_state = naive_recurrent_gla(**x, scale=x["q"].shape[-1] ** -0.5, output_final_state=True)
    assert_close("o", theirs_o, ours_o)
    assert_close("state", theirs_state, ours_state)


@pytest.mark.triton
@needs_triton_device
def test_fla_backend_matches_reference_with_gqa():
    x = _inputs(H=4, Hkv=2)
    ref_o, ref_state = gated_linear_attention(**x, output_final_state=True, backend="reference")
    x = {name: t.to(TRITON_DEVICE) for name, t in x.items()}
    o, state = gated_linear_attention(**x, output_final_state=True, backend="fla")
    assert_close("o", ref_o, o.cpu())
    assert_close("state", ref_state, state.cpu())
