"""dynamic_routing against a plain-loop float64 transcription of the paper's Procedure 1."""

import math

import pytest
import torch

from capscore import ROUTINGS, DynamicRoutingConfig, build_routing, dynamic_routing, squash


def routing_reference(u_hat: torch.Tensor, iterations: int):
    """Procedure 1, one example at a time, explicit loops over i and j."""
    B, I, J, D = u_hat.shape
    v_all = torch.zeros(B, J, D, dtype=u_hat.dtype)
    c_all = torch.zeros(B, I, J, dtype=u_hat.dtype)
    for n in range(B):
        b = [[0.0] * J for _ in range(I)]
        for r in range(iterations):
            c = []
            for i in range(I):
                z = sum(math.exp(b[i][k]) for k in range(J))
                c.append([math.exp(b[i][j]) / z for j in range(J)])
            v = []
            for j in range(J):
                s_j = sum(c[i][j] * u_hat[n, i, j] for i in range(I))
                v.append(squash(s_j.unsqueeze(0))[0])
            if r < iterations - 1:
                for i in range(I):
                    for j in range(J):
                        b[i][j] += float(u_hat[n, i, j] @ v[j])
        v_all[n] = torch.stack(v)
        c_all[n] = torch.tensor(c, dtype=u_hat.dtype)
    return v_all, c_all


@pytest.mark.parametrize("iterations", [1, 2, 3, 4, 5])
def test_matches_plain_loop_reference_float64(iterations):
    torch.manual_seed(iterations)
    u_hat = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    v, c = dynamic_routing(u_hat, iterations)
    v_ref, c_ref = routing_reference(u_hat, iterations)
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c, c_ref, rtol=1e-10, atol=1e-12)


def test_couplings_sum_to_one_over_parents():
    u_hat = torch.randn(4, 20, 10, 16) * 3
    _, c = dynamic_routing(u_hat, 3)
    torch.testing.assert_close(c.sum(dim=2), torch.ones(4, 20))


def test_one_iteration_is_uniform_coupling():
    u_hat = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    v, c = dynamic_routing(u_hat, 1)
    torch.testing.assert_close(c, torch.full_like(c, 1 / 4))
    torch.testing.assert_close(v, squash(u_hat.mean(dim=1) * 5 / 4))


def test_routing_is_per_example_and_stateless():
    torch.manual_seed(5)
    u_hat = torch.randn(4, 8, 3, 5, dtype=torch.float64)
    v, c = dynamic_routing(u_hat, 3)
    v0, c0 = dynamic_routing(u_hat[:1], 3)  # b is not shared or averaged across the batch
    torch.testing.assert_close(v[:1], v0)
    torch.testing.assert_close(c[:1], c0)
    v_again, _ = dynamic_routing(u_hat, 3)  # b restarts at zero on every call
    torch.testing.assert_close(v, v_again)


def test_agreement_increases_coupling_to_agreeing_parent():
    # all children agree on parent 0; for parent 1 they cancel out (s_1 = 0, so no agreement)
    u_hat = torch.zeros(1, 30, 2, 4, dtype=torch.float64)
    vote = torch.tensor([1.0, 0.5, 0.0, 0.0], dtype=torch.float64)
    u_hat[:, :, 0] = vote
    u_hat[:, :, 1] = (
        vote * torch.tensor([(-1.0) ** i for i in range(30)], dtype=torch.float64)[:, None]
    )
    _, c1 = dynamic_routing(u_hat, 1)
    _, c3 = dynamic_routing(u_hat, 3)
    torch.testing.assert_close(c1, torch.full_like(c1, 0.5))
    assert (c3[0, :, 0] > 0.7).all()
    torch.testing.assert_close(c3.sum(-1), torch.ones(1, 30, dtype=torch.float64))


def test_detach_inner_same_forward_different_backward():
    torch.manual_seed(7)
    base = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    grads = {}
    for detach in (False, True):
        u_hat = base.clone().requires_grad_(True)
        v, _ = dynamic_routing(u_hat, 3, detach_inner=detach)
        (v * torch.arange(v.numel(), dtype=v.dtype).view_as(v)).sum().backward()
        grads[detach] = (v.detach(), u_hat.grad)
    torch.testing.assert_close(grads[False][0], grads[True][0])
    assert not torch.allclose(grads[False][1], grads[True][1])


def test_gradient_matches_finite_differences():
    torch.manual_seed(8)
    u_hat = torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u: dynamic_routing(u, 3)[0], (u_hat,))


def test_rejects_zero_iterations():
    with pytest.raises(ValueError, match="iterations"):
        dynamic_routing(torch.zeros(1, 2, 2, 2), 0)


@pytest.mark.parametrize("name", sorted(ROUTINGS))
@pytest.mark.parametrize("zero", [False, True])
def test_every_registered_routing_module_shapes_and_finite_gradients(name, zero):
    torch.manual_seed(0)
    B, I, J, D = 3, 7, 4, 5
    module = build_routing(ROUTINGS[name].config(), num_in=I, num_out=J, out_dim=D).double()
    u_hat = (torch.zeros if zero else torch.randn)(B, I, J, D, dtype=torch.float64)
    u_hat.requires_grad_(True)
    a = torch.rand(B, I, dtype=torch.float64) if module.needs_activations else None
    out = module(u_hat, a)
    assert out.poses.shape == (B, J, D) and out.activations.shape == (B, J)
    assert out.couplings.shape == (B, I, J)
    (out.poses.sum() + out.activations.sum()).backward()
    assert torch.isfinite(u_hat.grad).all()
    for p in module.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_dynamic_routing_module_equals_the_function():
    torch.manual_seed(1)
    u_hat = torch.randn(2, 6, 3, 4)
    module = build_routing(DynamicRoutingConfig(iterations=2), num_in=6, num_out=3, out_dim=4)
    out = module(u_hat)
    v, c = dynamic_routing(u_hat, 2)
    torch.testing.assert_close(out.poses, v)
    torch.testing.assert_close(out.couplings, c)
    torch.testing.assert_close(out.activations, v.norm(dim=-1))
