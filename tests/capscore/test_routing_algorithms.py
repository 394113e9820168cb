"""The registered routing algorithms: each against a plain-loop float64 transcription of its
paper, and invariants parametrised over ROUTINGS (a new entry is tested from its first line)."""

import math

import pytest
import torch

from capscore import (
    ROUTINGS,
    AttentionRoutingConfig,
    CapsNet,
    CapsNetConfig,
    EMRoutingConfig,
    UniformRoutingConfig,
    build_routing,
    dynamic_routing,
    routing_config,
)

B, I, J, D = 3, 7, 4, 5


def build(name: str, config=None, perturb: bool = False, num_in: int = I):
    """The routing module `name` in float64; `perturb` moves every parameter off its init."""
    config = config or ROUTINGS[name].config()
    module = build_routing(config, num_in=num_in, num_out=J, out_dim=D).double()
    if perturb:
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(0.3 * torch.randn_like(p))
    return module


def votes(module, zero: bool = False, batch: int = B, num_in: int = I, scale: float = 1.0):
    """(u_hat, a) for `module`: a is None unless the module weighs votes by activations."""
    make = torch.zeros if zero else torch.randn
    u_hat = scale * make(batch, num_in, J, D, dtype=torch.float64)
    a = None
    if module.needs_activations:
        a = torch.zeros(batch, num_in, dtype=torch.float64) if zero else torch.rand(batch, num_in)
        a = a.double()
    return u_hat, a


def vec_squash(s: list[float]) -> list[float]:
    """Sabour et al. eq. 1 on a plain list."""
    sq = sum(x * x for x in s)
    return [x * math.sqrt(sq) / (1 + sq) for x in s] if sq > 0 else [0.0] * len(s)


# --- plain-loop references, one example at a time ------------------------------------------


def uniform_reference(u_hat):
    """c_ij = 1/J; v_j = squash(sum_i c_ij u_hat_j|i)."""
    n_b, n_i, n_j, n_d = u_hat.shape
    v = torch.zeros(n_b, n_j, n_d, dtype=torch.float64)
    for n in range(n_b):
        for j in range(n_j):
            s = [sum(float(u_hat[n, i, j, h]) / n_j for i in range(n_i)) for h in range(n_d)]
            v[n, j] = torch.tensor(vec_squash(s), dtype=torch.float64)
    return v


def em_reference(u_hat, a, beta_u, beta_a, lambdas, eps, standardize):
    """Procedure 1 of Hinton, Sabour & Frosst 2018 (M-step, E-step) with the documented
    changes: the mass in the cost scaled by J / I, epsilon on each variance and division, and
    (`standardize`) the cost z-scored over parents."""
    n_b, n_i, n_j, n_d = u_hat.shape
    mu_all = torch.zeros(n_b, n_j, n_d, dtype=torch.float64)
    act_all = torch.zeros(n_b, n_j, dtype=torch.float64)
    r_all = torch.zeros(n_b, n_i, n_j, dtype=torch.float64)
    for n in range(n_b):
        V = [
            [[float(u_hat[n, i, j, h]) for h in range(n_d)] for j in range(n_j)] for i in range(n_i)
        ]
        R = [[1.0 / n_j] * n_j for _ in range(n_i)]
        for lam in lambdas:
            mu, var, costs = [], [], []
            for j in range(n_j):  # M-step
                Rp = [R[i][j] * float(a[n, i]) for i in range(n_i)]
                mass = sum(Rp)
                m_j = [
                    sum(Rp[i] * V[i][j][h] for i in range(n_i)) / (mass + eps) for h in range(n_d)
                ]
                v_j = [
                    sum(Rp[i] * (V[i][j][h] - m_j[h]) ** 2 for i in range(n_i)) / (mass + eps) + eps
                    for h in range(n_d)
                ]
                cost = sum(
                    (float(beta_u[j]) + math.log(math.sqrt(v_j[h]))) * mass * n_j / n_i
                    for h in range(n_d)
                )
                mu.append(m_j)
                var.append(v_j)
                costs.append(cost)
            if standardize:
                mean = sum(costs) / n_j
                std = math.sqrt(sum((c - mean) ** 2 for c in costs) / n_j + eps)
                costs = [(c - mean) / std for c in costs]
            act = [1 / (1 + math.exp(-lam * (float(beta_a[j]) - costs[j]))) for j in range(n_j)]
            for i in range(n_i):  # E-step
                p = []
                for j in range(n_j):
                    density = 1.0
                    for h in range(n_d):
                        density *= math.exp(-((V[i][j][h] - mu[j][h]) ** 2) / (2 * var[j][h]))
                        density /= math.sqrt(2 * math.pi * var[j][h])
                    p.append(act[j] * density)
                R[i] = [p_j / sum(p) for p_j in p]
        mu_all[n] = torch.tensor(mu, dtype=torch.float64)
        act_all[n] = torch.tensor(act, dtype=torch.float64)
        r_all[n] = torch.tensor(R, dtype=torch.float64)
    return mu_all, act_all, r_all


def attention_reference(u_hat, bias):
    """Efficient-CapsNet: A_j = U_j U_j^T / sqrt(D) built entry by entry, c_ij = softmax over
    j of sum_k A_j[i, k], s_j = sum_i (c_ij + b_ij) u_hat_j|i, v_j = squash(s_j)."""
    n_b, n_i, n_j, n_d = u_hat.shape
    v = torch.zeros(n_b, n_j, n_d, dtype=torch.float64)
    w = torch.zeros(n_b, n_i, n_j, dtype=torch.float64)
    for n in range(n_b):
        U = [
            [[float(u_hat[n, i, j, h]) for h in range(n_d)] for i in range(n_i)] for j in range(n_j)
        ]
        logit = [[0.0] * n_j for _ in range(n_i)]
        for j in range(n_j):
            A = [
                [
                    sum(U[j][i][h] * U[j][k][h] for h in range(n_d)) / math.sqrt(n_d)
                    for k in range(n_i)
                ]
                for i in range(n_i)
            ]
            for i in range(n_i):
                logit[i][j] = sum(A[i])
        for i in range(n_i):
            z = sum(math.exp(x) for x in logit[i])
            for j in range(n_j):
                w[n, i, j] = math.exp(logit[i][j]) / z + float(bias[i, j])
        for j in range(n_j):
            s = [sum(float(w[n, i, j]) * U[j][i][h] for i in range(n_i)) for h in range(n_d)]
            v[n, j] = torch.tensor(vec_squash(s), dtype=torch.float64)
    return v, w


# --- each algorithm equals its reference -----------------------------------------------------


def test_uniform_matches_plain_loop_and_dynamic_with_one_iteration():
    torch.manual_seed(0)
    module = build("uniform")
    u_hat, _ = votes(module)
    out = module(u_hat)
    v_ref = uniform_reference(u_hat)
    torch.testing.assert_close(out.poses, v_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.activations, v_ref.norm(dim=-1), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.couplings, torch.full((B, I, J), 1 / J, dtype=torch.float64))
    v_dyn, _ = dynamic_routing(u_hat, 1)
    torch.testing.assert_close(out.poses, v_dyn, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
@pytest.mark.parametrize("lambdas", [(0.01, 0.1), (1.0, 3.0)])
@pytest.mark.parametrize("cost_norm", ["standardize", "scale"])
def test_em_matches_plain_loop_reference_float64(iterations, lambdas, cost_norm):
    torch.manual_seed(iterations)
    config = EMRoutingConfig(
        iterations=iterations,
        lambda_first=lambdas[0],
        lambda_last=lambdas[1],
        cost_norm=cost_norm,
        epsilon=1e-6,
    )
    module = build("em", config, perturb=True)
    u_hat, a = votes(module)
    out = module(u_hat, a)
    mu, act, r = em_reference(
        u_hat,
        a,
        module.beta_u_J.detach(),
        module.beta_a_J.detach(),
        config.lambdas(),
        1e-6,
        cost_norm == "standardize",
    )
    torch.testing.assert_close(out.poses, mu, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.activations, act, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.couplings, r, rtol=1e-10, atol=1e-12)


def test_em_lambda_schedule_is_linear_and_ends_at_lambda_last():
    assert EMRoutingConfig(iterations=1, lambda_first=0.5, lambda_last=2.0).lambdas() == [2.0]
    assert EMRoutingConfig(iterations=3, lambda_first=1.0, lambda_last=3.0).lambdas() == [1, 2, 3]


def test_attention_matches_plain_loop_reference_float64():
    torch.manual_seed(1)
    module = build("attention", perturb=True)  # a non-zero prior B
    u_hat, _ = votes(module)
    out = module(u_hat)
    v_ref, w_ref = attention_reference(u_hat, module.bias_IJ.detach())
    torch.testing.assert_close(out.poses, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.activations, v_ref.norm(dim=-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.couplings, w_ref, rtol=1e-10, atol=1e-12)


def test_attention_couplings_minus_prior_are_a_distribution():
    # What Efficient-CapsNet guarantees: the softmax part sums to 1 over parents; the learned
    # prior B is added afterwards, so c + b is a distribution only while B = 0 (its init).
    torch.manual_seed(2)
    module = build("attention", perturb=True)
    u_hat, _ = votes(module, scale=3.0)
    c = module(u_hat).couplings - module.bias_IJ
    assert (c >= 0).all()
    torch.testing.assert_close(c.sum(-1), torch.ones(B, I, dtype=torch.float64))


@pytest.mark.parametrize("cost_norm", ["standardize", "scale"])
def test_em_prefers_the_parent_whose_votes_agree(cost_norm):
    torch.manual_seed(3)
    module = build("em", EMRoutingConfig(lambda_first=1.0, lambda_last=1.0, cost_norm=cost_norm))
    u_hat = torch.randn(1, 40, J, D, dtype=torch.float64)  # scattered votes for every parent
    u_hat[:, :, 0] = torch.randn(D, dtype=torch.float64) + 0.01 * torch.randn(40, D)  # agreeing
    out = module(u_hat, torch.ones(1, 40, dtype=torch.float64))
    assert out.activations[0].argmax() == 0
    assert (out.couplings[0, :, 0] > 0.9).all()


def test_em_requires_child_activations():
    module = build("em")
    with pytest.raises(ValueError, match="a_BI"):
        module(torch.randn(1, I, J, D, dtype=torch.float64))


# --- invariants of every registered routing --------------------------------------------------


@pytest.mark.parametrize("name", sorted(ROUTINGS))
def test_output_shapes_and_dtypes(name):
    module = build(name)
    out = module(*votes(module))
    assert out.poses.shape == (B, J, D) and out.poses.dtype == torch.float64
    assert out.activations.shape == (B, J)
    assert out.couplings.shape == (B, I, J)


@pytest.mark.parametrize("name", sorted(ROUTINGS))
@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
def test_couplings_at_init_are_a_distribution_over_parents(name, scale):
    torch.manual_seed(4)
    module = build(name)  # at init (attention's prior B = 0) every algorithm promises this
    c = module(*votes(module, scale=scale)).couplings
    assert (c >= 0).all()
    torch.testing.assert_close(c.sum(-1), torch.ones(B, I, dtype=c.dtype))


@pytest.mark.parametrize("name", sorted(ROUTINGS))
@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
def test_activations_in_unit_interval_and_outputs_finite(name, zero, scale):
    torch.manual_seed(5)
    module = build(name, perturb=True)
    out = module(*votes(module, zero=zero, scale=scale))
    for t in (out.poses, out.activations, out.couplings):
        assert torch.isfinite(t).all()
    assert ((out.activations >= 0) & (out.activations <= 1)).all()


@pytest.mark.parametrize("name", sorted(ROUTINGS))
@pytest.mark.parametrize("zero", [False, True])
def test_finite_gradients_to_votes_activations_and_every_parameter(name, zero):
    torch.manual_seed(6)
    module = build(name, perturb=True)
    u_hat, a = votes(module, zero=zero)
    inputs = [t.requires_grad_(True) for t in (u_hat, a) if t is not None]
    out = module(u_hat, a)
    weights = torch.randn_like(out.poses)  # a generic loss, not a symmetric one
    ((out.poses * weights).sum() + out.activations.square().sum()).backward()
    for t in [*inputs, *module.parameters()]:
        assert t.grad is not None and torch.isfinite(t.grad).all()
        if not zero:
            assert t.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(ROUTINGS))
def test_gradient_matches_finite_differences(name):
    torch.manual_seed(7)
    module = build(name, perturb=True, num_in=3)
    u_hat, a = votes(module, batch=1, num_in=3)
    u_hat.requires_grad_(True)

    def f(u):
        out = module(u, a)
        # dynamic's activations are float32 by design, too coarse for finite differences
        exact = out.activations.dtype == torch.float64
        return (out.poses, out.activations) if exact else out.poses

    assert torch.autograd.gradcheck(f, (u_hat,))


@pytest.mark.parametrize("name", sorted(ROUTINGS))
def test_batch_items_are_independent(name):
    torch.manual_seed(8)
    module = build(name, perturb=True)
    u_hat, a = votes(module)
    out = module(u_hat, a)
    u_other = u_hat.clone()
    u_other[1:] = torch.randn_like(u_other[1:])  # every other example changed
    alone = module(u_hat[:1], None if a is None else a[:1])
    mixed = module(u_other, a)
    for o in (alone, mixed):
        torch.testing.assert_close(o.poses[0], out.poses[0])
        torch.testing.assert_close(o.activations[0], out.activations[0])
        torch.testing.assert_close(o.couplings[0], out.couplings[0])


# --- in the model, and through the config ---------------------------------------------------


@pytest.mark.parametrize("name", sorted(ROUTINGS))
def test_tiny_capsnet_under_every_routing_trains(name):
    torch.manual_seed(9)
    model = CapsNet(CapsNetConfig.tiny(routing={"name": name}))
    images, targets = torch.rand(4, 1, 12, 12), torch.tensor([0, 1, 2, 3])
    out = model(images, targets)
    assert ((out.scores >= 0) & (out.scores <= 1)).all()
    loss = model.loss(out, images, targets)
    assert torch.isfinite(loss.total)
    loss.total.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize(
    "value, expected",
    [
        ({"name": "em", "iterations": 2}, EMRoutingConfig(iterations=2)),
        ({"name": "uniform"}, UniformRoutingConfig()),
        ({"name": "attention"}, AttentionRoutingConfig()),
    ],
)
def test_routing_config_from_dict(value, expected):
    assert routing_config(value) == expected
    assert CapsNetConfig.tiny(routing=value).routing == expected


@pytest.mark.parametrize(
    "value, match",
    [
        ({"name": "uniform", "iterations": 3}, "iterations"),
        ({"name": "attention", "iterations": 3}, "iterations"),
        ({"name": "em", "iterations": 0}, "routing.iterations"),
        ({"name": "em", "iterations": True}, "routing.iterations"),
        ({"name": "em", "lambda_first": 0}, "routing.lambda_first"),
        ({"name": "em", "lambda_last": float("nan")}, "routing.lambda_last"),
        ({"name": "em", "epsilon": -1e-6}, "routing.epsilon"),
        ({"name": "em", "cost_norm": "none"}, "routing.cost_norm"),
        ({"name": "em", "detach_inner": True}, "detach_inner"),
    ],
)
def test_bad_routing_config_names_the_key(value, match):
    with pytest.raises(ValueError, match=match):
        routing_config(value)
