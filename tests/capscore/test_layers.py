"""squash, PrimaryCapsules, ClassCapsules: values against plain float64 references."""

import pytest
import torch

from capscore import ClassCapsules, DynamicRoutingConfig, PrimaryCapsules, squash


def squash_reference(s: torch.Tensor) -> torch.Tensor:
    """Paper eq. 1 written literally, vector by vector."""
    out = torch.zeros_like(s)
    for idx in range(s.shape[0]):
        n = s[idx].norm()
        if n > 0:
            out[idx] = (n**2 / (1 + n**2)) * s[idx] / n
    return out


def test_squash_matches_paper_formula_float64():
    torch.manual_seed(0)
    s = (
        torch.randn(64, 16, dtype=torch.float64)
        * torch.logspace(-3, 2, 64, dtype=torch.float64)[:, None]
    )
    torch.testing.assert_close(squash(s), squash_reference(s), rtol=1e-12, atol=1e-15)


def test_squash_norm_below_one_and_direction_kept():
    torch.manual_seed(1)
    s = torch.randn(1000, 8) * 10
    v = squash(s)
    norms = v.norm(dim=-1)
    assert (norms >= 0).all() and (norms < 1).all()
    cos = torch.nn.functional.cosine_similarity(v, s, dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos))
    # a long vector approaches length 1, a short one is shrunk quadratically
    assert squash(torch.tensor([[1e3, 0.0]])).norm() > 0.999
    torch.testing.assert_close(
        squash(torch.tensor([[1e-2, 0.0]], dtype=torch.float64)).norm(),
        torch.tensor(1e-4 / (1 + 1e-4), dtype=torch.float64),
    )


def test_squash_other_dim():
    s = torch.randn(3, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(squash(s, dim=1), squash(s.transpose(1, 2)).transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_squash_zero_input_finite_value_and_gradient(dtype):
    s = torch.zeros(4, 8, dtype=dtype, requires_grad=True)
    v = squash(s)
    assert torch.equal(v, torch.zeros_like(v))
    v.sum().backward()
    assert torch.isfinite(s.grad).all()
    # the true derivative of s|s|/(1+|s|^2) at 0 is 0
    assert s.grad.abs().max() < 1e-6


def test_squash_low_precision_no_underflow():
    s = torch.full((2, 8), 1e-3, dtype=torch.float16)
    v = squash(s)
    assert v.dtype == torch.float16
    assert (v.float().norm(dim=-1) > 0).all()


def test_primary_capsules_group_channels_at_one_position():
    torch.manual_seed(2)
    types, dim = 3, 4
    layer = PrimaryCapsules(in_channels=2, types=types, dim=dim, kernel=3, stride=2).double()
    x = torch.randn(2, 2, 9, 9, dtype=torch.float64)
    u = layer(x)
    y = layer.conv(x)  # [B, T*P, H, W]
    H, W = y.shape[2:]
    assert u.shape == (2, types * H * W, dim)
    for t in range(types):
        for row in range(H):
            for col in range(W):
                i = t * H * W + row * W + col
                expected = squash_reference(y[:, t * dim : (t + 1) * dim, row, col])
                torch.testing.assert_close(u[:, i], expected)


def test_class_capsule_predictions_equal_per_pair_matmul():
    torch.manual_seed(3)
    I, P, J, D = 7, 4, 3, 5
    layer = ClassCapsules(I, P, J, D, routing=DynamicRoutingConfig(iterations=2)).double()
    u = torch.randn(2, I, P, dtype=torch.float64)
    u_hat = layer.predictions(u)
    assert u_hat.shape == (2, I, J, D)
    W = layer.weight_IPK.view(I, P, J, D)
    for b in range(2):
        for i in range(I):
            for j in range(J):
                torch.testing.assert_close(u_hat[b, i, j], W[i, :, j, :].T @ u[b, i])


def test_class_capsules_parameter_shape_is_not_per_sample():
    layer = ClassCapsules(1152, 8, 10, 16, routing=DynamicRoutingConfig())
    assert [tuple(p.shape) for p in layer.parameters()] == [(1152, 8, 160)]
    assert sum(p.numel() for p in layer.parameters()) == 1152 * 10 * 8 * 16
