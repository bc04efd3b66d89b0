"""The fused rotary embedding (x * C + swap(x) * S) is bit-identical to the halves formula."""
import pytest
import torch

from gpu_worker import model as M


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_head_rotary_is_bit_identical_to_the_halves_formula(dtype):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 5, 64, generator=gen).to(dtype)
    cos, sin = torch.randn(3, 1, 5, 16, generator=gen), torch.randn(3, 1, 5, 16, generator=gen)
    c, s = cos.to(dtype), sin.to(dtype)
    x1, x2, rest = x[..., :16], x[..., 16:32], x[..., 32:]
    reference = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c, rest], dim=-1)
    assert torch.equal(M._apply_rotary(x, cos, sin), reference)
    wide_cos, wide_sin = M.rotary_for_heads(cos, sin, 64, dtype)  # as _text_blocks passes them
    assert torch.equal(M._apply_rotary(x, wide_cos, wide_sin), reference)
