"""Routing between capsule layers: a registry of algorithms, each a module with its own config.

Shape legend (suffixes on tensor names):
    B  batch
    I  input (child) capsules, e.g. 1,152 primary capsules
    J  output (parent) capsules, e.g. 10 class capsules
    D  output pose dimension, e.g. 16

Every routing module takes the prediction vectors u_hat [B, I, J, D] (and, if its class sets
``needs_activations``, the children's activations a [B, I]) and returns a ``RoutingOutput``:
parent poses, parent activations and the couplings. ``ClassCapsules`` builds its routing from
the config through ``build_routing``, so an algorithm with learned parameters or one that needs
input activations is added here, as one ``ROUTINGS`` entry, without touching its callers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from capscore.functional import squash


@dataclass
class RoutingOutput:
    poses: torch.Tensor
    """[B, J, D] parent capsules v_j."""
    activations: torch.Tensor
    """[B, J] how present each parent is, in [0, 1] (the length |v_j| for dynamic routing), in
    float32 (float64 for float64 votes, except dynamic's)."""
    couplings: torch.Tensor
    """[B, I, J] the coupling coefficients of the final iteration."""


def dynamic_routing(
    u_hat_BIJD: torch.Tensor,
    iterations: int,
    detach_inner: bool = False,
    bias_JD: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing-by-agreement (Sabour et al. 2017, Procedure 1).

    Args:
        u_hat_BIJD: prediction vectors u_hat_{j|i} = W_ij u_i.
        iterations: r >= 1; r = 1 gives uniform couplings 1/J.
        detach_inner: stop gradients through u_hat in every iteration but the last (the
            official code does not, hence off by default).
        bias_JD: optional bias added to s_j before squashing (the official code's, opt-in).

    Returns:
        (v_BJD, c_BIJ): parent capsules and the couplings used in the last iteration.
    """
    if iterations < 1:
        raise ValueError(f"routing iterations must be >= 1, got {iterations}")
    B, I, J, _ = u_hat_BIJD.shape
    # b_ij are per-example routing logits: they start at zero on every call (not a parameter,
    # not shared across the batch). Kept at [B, I, J], never at u_hat's [B, I, J, D], and in
    # at least float32 so the agreement sums do not accumulate in bf16/fp16 under autocast.
    b_BIJ = u_hat_BIJD.new_zeros(
        B, I, J, dtype=torch.promote_types(u_hat_BIJD.dtype, torch.float32)
    )
    # Both sums over I run as batched row-vector x matrix products over (B, J): c_j^T U_j and
    # v_j^T U_j^T. (einsum lowers them to slow bmm shapes on CPU; see BENCHMARKS.md.)
    u_BJID = u_hat_BIJD.transpose(1, 2)
    u_inner_BJID = u_BJID.detach() if detach_inner else u_BJID
    for it in range(iterations):
        last = it == iterations - 1
        u = u_BJID if last else u_inner_BJID
        c_BIJ = torch.softmax(b_BIJ, dim=2)  # over parents J: each child splits its vote
        c_BJ1I = c_BIJ.transpose(1, 2).unsqueeze(2).to(u.dtype)
        s_BJD = (c_BJ1I @ u).squeeze(2)  # s_j = sum_i c_ij u_hat_j|i
        if bias_JD is not None:
            s_BJD = s_BJD + bias_JD
        v_BJD = squash(s_BJD)
        if not last:  # agreement update; none after the final iteration
            a_BJ1I = v_BJD.unsqueeze(2) @ u.transpose(2, 3)  # u_hat_j|i . v_j
            b_BIJ = b_BIJ + a_BJ1I.squeeze(2).transpose(1, 2).to(b_BIJ.dtype)
    return v_BJD, c_BIJ


# --- registered algorithms ------------------------------------------------------------------


@dataclass(kw_only=True)
class DynamicRoutingConfig:
    """Routing-by-agreement, Sabour et al. 2017."""

    name: Literal["dynamic"] = "dynamic"
    """Registry key (fixed per config class)."""
    iterations: int = 3
    """Routing iterations r (1 = uniform coupling 1/J, no agreement step)."""
    detach_inner: bool = False
    """Stop gradients through u_hat in all but the last iteration (faster, not the paper)."""
    bias: bool = False
    """Add a learned bias to s_j before squashing, as the official code does (not in 6.8M)."""

    def __post_init__(self) -> None:
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"routing.iterations must be an integer >= 1, got {self.iterations!r}")


class DynamicRouting(nn.Module):
    """Procedure 1 of Sabour et al. 2017 as a module (its only parameter: the optional bias)."""

    needs_activations = False

    def __init__(self, config: DynamicRoutingConfig, *, num_in: int, num_out: int, out_dim: int):
        super().__init__()
        self.config = config
        self.bias_JD = nn.Parameter(torch.zeros(num_out, out_dim)) if config.bias else None

    def forward(
        self,
        u_hat_BIJD: torch.Tensor,
        a_BI: torch.Tensor | None = None,
        iterations: int | None = None,
    ) -> RoutingOutput:
        cfg = self.config
        r = cfg.iterations if iterations is None else iterations
        v_BJD, c_BIJ = dynamic_routing(u_hat_BIJD, r, cfg.detach_inner, self.bias_JD)
        return RoutingOutput(poses=v_BJD, activations=v_BJD.float().norm(dim=-1), couplings=c_BIJ)


def _check_positive(config: object, name: str) -> None:
    """ValueError naming `routing.<name>` unless the field is a finite number > 0."""
    value = getattr(config, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value <= 0:
        raise ValueError(f"routing.{name} must be a finite number > 0, got {value!r}")


# --- uniform: no agreement ------------------------------------------------------------------


@dataclass(kw_only=True)
class UniformRoutingConfig:
    """No routing: every child splits its vote equally over the parents (c_ij = 1/J).

    The baseline that isolates what agreement adds: the same network and loss as `dynamic`,
    with the couplings fixed instead of iterated (equal to `dynamic` with iterations=1).
    """

    name: Literal["uniform"] = "uniform"
    """Registry key (fixed per config class)."""


class UniformRouting(nn.Module):
    """v_j = squash(sum_i u_hat_j|i / J), activations |v_j|, couplings 1/J everywhere."""

    needs_activations = False

    def __init__(self, config: UniformRoutingConfig, *, num_in: int, num_out: int, out_dim: int):
        super().__init__()
        self.config = config

    def forward(self, u_hat_BIJD: torch.Tensor, a_BI: torch.Tensor | None = None) -> RoutingOutput:
        B, I, J, _ = u_hat_BIJD.shape
        v_BJD = squash(u_hat_BIJD.sum(dim=1) / J)
        # Same dtype rule as dynamic's couplings: at least float32.
        dtype = torch.promote_types(u_hat_BIJD.dtype, torch.float32)
        c_BIJ = u_hat_BIJD.new_full((B, I, J), 1.0 / J, dtype=dtype)
        return RoutingOutput(poses=v_BJD, activations=v_BJD.to(dtype).norm(dim=-1), couplings=c_BIJ)


# --- em: Gaussian mixture routing (Hinton, Sabour & Frosst 2018) ----------------------------


@dataclass(kw_only=True)
class EMRoutingConfig:
    """EM routing, Hinton, Sabour & Frosst 2018 (Procedure 1), on vector votes.

    The inverse temperature runs linearly from `lambda_first` (iteration 1) to `lambda_last`
    (iteration r); with one iteration it is `lambda_last`. The paper sets a fixed schedule as
    a hyper-parameter and gives no values; the linear ramp from 1 to 3 is the one of the widely
    used public implementation (Zhang's Matrix-Capsules-EM-Tensorflow) that also standardises
    the cost, our default.
    """

    name: Literal["em"] = "em"
    """Registry key (fixed per config class)."""
    iterations: int = 3
    """EM iterations r (each an M-step then an E-step, as in Procedure 1)."""
    lambda_first: float = 1.0
    """Inverse temperature lambda of the first M-step."""
    lambda_last: float = 3.0
    """Inverse temperature lambda of the last M-step (the one that gives the activations)."""
    cost_norm: Literal["standardize", "scale"] = "standardize"
    """"scale": the mass sum_i R_ij a_i in the cost times J / I, the paper's formula up to a
    rescaling of lambda and beta_a (needs lambda ~100x smaller: 0.01 -> 0.1 keeps the paper
    net's sigmoid unsaturated at init). "standardize": the cost of each parent also z-scored
    over the J parents before beta_a (trains well with the margin loss; see EMRouting)."""
    epsilon: float = 1e-6
    """Variance floor added to every sigma^2 (and the cost's variance over parents), and guard
    on the division by sum_i R_ij a_i."""

    def __post_init__(self) -> None:
        r = self.iterations
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"routing.iterations must be an integer >= 1, got {r!r}")
        for name in ("lambda_first", "lambda_last", "epsilon"):
            _check_positive(self, name)
        if self.cost_norm not in ("standardize", "scale"):
            raise ValueError(
                f"routing.cost_norm must be 'standardize' or 'scale', got {self.cost_norm!r}"
            )

    def lambdas(self, iterations: int | None = None) -> list[float]:
        """The inverse temperature of each iteration (of `iterations`, default the config's)."""
        r = self.iterations if iterations is None else iterations
        if r < 1:
            raise ValueError(f"routing iterations must be >= 1, got {r}")
        lo, hi = self.lambda_first, self.lambda_last
        return [hi] if r == 1 else [lo + (hi - lo) * t / (r - 1) for t in range(r)]


def _em_m_step(
    rw_BJI: torch.Tensor,
    V_BJID: torch.Tensor,
    beta_u_J: torch.Tensor,
    beta_a_J: torch.Tensor,
    lam: float,
    eps: float,
    standardize: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """M-step for all parents. rw = R_ij * a_i. Returns (mu_BJD, var_BJD, logit_BJ, diff2_BJID)
    where a_j = sigmoid(logit_j) and diff2 = (V - mu)^2 (reused by the E-step)."""
    _, J, I, _ = V_BJID.shape
    mass_BJ1 = rw_BJI.sum(dim=2, keepdim=True)  # sum_i R_ij a_i
    rw_BJ1I = rw_BJI.unsqueeze(2)
    mu_BJD = (rw_BJ1I @ V_BJID).squeeze(2) / (mass_BJ1 + eps)
    # Two-pass variance (weighted mean of (V - mu)^2), never E[V^2] - mu^2, which cancels
    # catastrophically when the votes agree closely, the case routing is meant to find.
    diff2_BJID = (V_BJID - mu_BJD.unsqueeze(2)).square()
    var_BJD = (rw_BJ1I @ diff2_BJID).squeeze(2) / (mass_BJ1 + eps) + eps
    # cost_j = sum_h (beta_u + log sigma_j^h) * sum_i R_ij a_i, with the mass scaled by J / I
    # (see EMRouting) so the cost does not grow with the number of children.
    log_sigma_BJD = 0.5 * var_BJD.log()
    cost_BJ = (beta_u_J.unsqueeze(-1) + log_sigma_BJD).sum(-1) * mass_BJ1.squeeze(2) * (J / I)
    if standardize:  # z-score over parents; + eps keeps sqrt's gradient finite at equal costs
        mean_BJ1 = cost_BJ.mean(dim=1, keepdim=True)
        var_BJ1 = (cost_BJ - mean_BJ1).square().mean(dim=1, keepdim=True)
        cost_BJ = (cost_BJ - mean_BJ1) / (var_BJ1 + eps).sqrt()
    logit_BJ = lam * (beta_a_J - cost_BJ)
    return mu_BJD, var_BJD, logit_BJ, diff2_BJID


def _em_e_step(
    diff2_BJID: torch.Tensor, var_BJD: torch.Tensor, logit_BJ: torch.Tensor
) -> torch.Tensor:
    """E-step: R_ij = a_j p_j(V_ij) / sum_k a_k p_k(V_ik), in log space. Returns R [B, J, I]."""
    # log p_j(V_ij) = -sum_h [(V_ij^h - mu_j^h)^2 / (2 sigma_j^h^2) + log(2 pi sigma_j^h^2) / 2]
    mahal_BJI = (diff2_BJID @ (0.5 / var_BJD).unsqueeze(-1)).squeeze(-1)
    log_norm_BJ1 = 0.5 * torch.log(2 * math.pi * var_BJD).sum(-1, keepdim=True)
    log_p_BJI = -mahal_BJI - log_norm_BJ1
    # log a_j = logsigmoid(logit_j): exact even where a_j underflows to 0
    return torch.softmax(F.logsigmoid(logit_BJ).unsqueeze(-1) + log_p_BJI, dim=1)  # over J


def em_routing(
    u_hat_BIJD: torch.Tensor,
    a_BI: torch.Tensor,
    beta_u_J: torch.Tensor,
    beta_a_J: torch.Tensor,
    lambdas: list[float],
    eps: float,
    standardize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Procedure 1 of Hinton, Sabour & Frosst 2018: one M-step and one E-step per lambda.

    Returns (mu_BJD, a_BJ, R_BIJ): parent poses, parent activations in (0, 1) and the
    assignment probabilities of the final E-step (a distribution over parents per child).
    All statistics run in at least float32 (means and variances of 1,152 votes in bf16 would
    be noise); the poses are returned in u_hat's dtype, the rest in the routing dtype.
    """
    dtype = torch.promote_types(u_hat_BIJD.dtype, torch.float32)
    V_BJID = u_hat_BIJD.transpose(1, 2).to(dtype)
    B, J, I, _ = V_BJID.shape
    a_B1I = a_BI.to(dtype).unsqueeze(1)
    beta_u_J, beta_a_J = beta_u_J.to(dtype), beta_a_J.to(dtype)
    R_BJI = V_BJID.new_full((B, J, I), 1.0 / J)  # R_ij = 1 / |Omega_{L+1}|
    for lam in lambdas:
        mu_BJD, var_BJD, logit_BJ, diff2_BJID = _em_m_step(
            R_BJI * a_B1I, V_BJID, beta_u_J, beta_a_J, lam, eps, standardize
        )
        R_BJI = _em_e_step(diff2_BJID, var_BJD, logit_BJ)
    return mu_BJD.to(u_hat_BIJD.dtype), torch.sigmoid(logit_BJ), R_BJI.transpose(1, 2)


class EMRouting(nn.Module):
    """EM routing (Hinton, Sabour & Frosst 2018, Procedure 1) between vector capsules.

    Each parent j is a Gaussian with mean mu_j and a variance sigma_j^h^2 per pose dimension h,
    fitted to the votes u_hat_j|i of the children weighted by R_ij a_i; its activation is
    a_j = sigmoid(lambda (beta_a - sum_h cost_j^h)), cost_j^h = (beta_u + log sigma_j^h) *
    sum_i R_ij a_i. Learned: beta_u and beta_a, one of each per parent (the paper's are per
    capsule type, and each class capsule is its own type), zeros at init.

    Where this departs from the paper (all in the routing unless said otherwise):
    - Vector votes: u_hat_j|i = W_ij u_i (8 -> 16 dims, `ClassCapsules`) instead of 4x4 pose
      matrices M_i W_ij. The Gaussian is per vote component in both, so with D = 16 the
      routing arithmetic is the paper's; only how votes are made differs.
    - No coordinate addition (the paper adds each child's scaled receptive-field centre to
      the first two vote components in the class layer).
    - Child activations a_i are the primary capsule lengths (given by the model), not a
      separate logistic unit per primary capsule.
    - Cost normalisation, always: the mass sum_i R_ij a_i in the cost is multiplied by J / I
      (mean 1 when every child is fully active), since with I = 1,152 children the raw cost
      saturates the sigmoid. lambda (beta_a - k C) = (k lambda)(beta_a / k - C) for the
      constant k = J / I, so with cost_norm="scale" this is exactly the paper's formula with
      lambda scaled by J / I and beta_a by I / J: a reparametrisation, not a new procedure.
    - Cost normalisation, cost_norm="standardize" (default): a_j = sigmoid(lambda (beta_a -
      z_j)), z_j = (cost_j - mean_k cost_k) / sqrt(var_k cost_k + epsilon) over the J
      parents, as in Zhang's public TensorFlow implementation. Not in the paper: a_j then
      depends on how a parent's cost compares with the other parents', not on its absolute
      value. Why: sum_h log sigma_h ~ -80 at init in the paper net, an offset beta_u must first
      learn away; in a 300-step check on the tiny net "scale" left the absent classes'
      activations near 0.5 (lambda 0.01 -> 0.1; at chance accuracy with lambda >= 0.1 -> 1),
      "standardize" (lambda 1 -> 3) brought them to 0.1 with the present ones at 1.0.
    - lambda: a linear ramp (`EMRoutingConfig`); the paper gives no values.
    - epsilon: a floor on each variance and a guard on the division by the mass (the paper
      writes neither); with a = 0 the parents get mu = 0 and sigma^2 = epsilon.
    - Loss: the model puts a_j into the margin loss; the paper uses the spread loss.
    - Couplings: the R_ij of the final E-step (Procedure 1 ends each iteration with one); it
      does not change the returned poses or activations.
    """

    needs_activations = True

    def __init__(self, config: EMRoutingConfig, *, num_in: int, num_out: int, out_dim: int):
        super().__init__()
        self.config = config
        self.beta_u_J = nn.Parameter(torch.zeros(num_out))
        self.beta_a_J = nn.Parameter(torch.zeros(num_out))

    def forward(
        self,
        u_hat_BIJD: torch.Tensor,
        a_BI: torch.Tensor | None = None,
        iterations: int | None = None,
    ) -> RoutingOutput:
        if a_BI is None:
            raise ValueError("em routing needs the children's activations a_BI")
        cfg = self.config
        mu_BJD, a_BJ, R_BIJ = em_routing(
            u_hat_BIJD,
            a_BI,
            self.beta_u_J,
            self.beta_a_J,
            cfg.lambdas(iterations),
            cfg.epsilon,
            cfg.cost_norm == "standardize",
        )
        return RoutingOutput(poses=mu_BJD, activations=a_BJ, couplings=R_BIJ)


# --- attention: Efficient-CapsNet self-attention routing (Mazzia et al. 2021) ---------------


@dataclass(kw_only=True)
class AttentionRoutingConfig:
    """Non-iterative self-attention routing, Mazzia, Salvetti & Chiaberge 2021."""

    name: Literal["attention"] = "attention"
    """Registry key (fixed per config class)."""


def attention_routing(
    u_hat_BIJD: torch.Tensor, bias_IJ: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Efficient-CapsNet routing: c_ij = softmax_j(sum_k A_j[i, k]), A_j = U_j U_j^T / sqrt(D).

    Returns (v_BJD, w_BIJ): parents squash(sum_i (c_ij + b_ij) u_hat_j|i) and the weights
    c_ij + b_ij that made them.
    """
    B, I, J, D = u_hat_BIJD.shape
    u_BJID = u_hat_BIJD.transpose(1, 2)
    # Row sums of A_j without building A_j ([B, J, I, I], 13 M floats a sample in the paper
    # net): sum_k u_i . u_k = u_i . (sum_k u_k), one [I, D] @ [D, 1] product per (b, j).
    total_BJD1 = u_BJID.sum(dim=2).unsqueeze(-1)
    dtype = torch.promote_types(u_BJID.dtype, torch.float32)  # softmax in fp32 at least
    logits_BJI = (u_BJID @ total_BJD1).squeeze(-1).to(dtype) / math.sqrt(D)
    c_BJI = torch.softmax(logits_BJI, dim=1)  # over parents J
    w_BJI = c_BJI + bias_IJ.t().to(c_BJI.dtype)  # the learned prior is added after the softmax
    s_BJD = (w_BJI.unsqueeze(2).to(u_BJID.dtype) @ u_BJID).squeeze(2)
    return squash(s_BJD), w_BJI.transpose(1, 2)


class AttentionRouting(nn.Module):
    """Self-attention routing of Efficient-CapsNet (Mazzia, Salvetti & Chiaberge 2021).

    One pass, no iterations: per parent j the agreement of every pair of children,
    A_j = U_j U_j^T / sqrt(D) (U_j: the I votes for j), is summed over one child axis; a softmax
    over parents turns those sums into couplings c_ij; a learned prior B [I, J] (zeros at init)
    is added, s_j = sum_i (c_ij + b_ij) u_hat_j|i, v_j = squash(s_j), activation |v_j|. This is
    the paper's eqs. and its public code (FCCaps), where B is added after the softmax (so
    c + b is a distribution over parents only while B = 0).

    Departures: A_j's row sums are computed as u_i . sum_k u_k, never materialising A_j (same
    values, memory O(I D) instead of O(I^2) per parent). The squash is this package's (Sabour
    et al. eq. 1), not Efficient-CapsNet's (1 - e^-|s|) s / |s|: both give lengths in [0, 1),
    and sharing one squash with `dynamic`/`uniform` keeps the margin loss's scale the same, so
    a comparison isolates the routing.
    """

    needs_activations = False

    def __init__(self, config: AttentionRoutingConfig, *, num_in: int, num_out: int, out_dim: int):
        super().__init__()
        self.config = config
        self.bias_IJ = nn.Parameter(torch.zeros(num_in, num_out))

    def forward(self, u_hat_BIJD: torch.Tensor, a_BI: torch.Tensor | None = None) -> RoutingOutput:
        v_BJD, w_BIJ = attention_routing(u_hat_BIJD, self.bias_IJ)
        lengths_BJ = v_BJD.to(w_BIJ.dtype).norm(dim=-1)
        return RoutingOutput(poses=v_BJD, activations=lengths_BJ, couplings=w_BIJ)


RoutingConfig = (
    DynamicRoutingConfig | UniformRoutingConfig | EMRoutingConfig | AttentionRoutingConfig
)
"""Any registered routing config."""


@dataclass(frozen=True)
class RoutingSpec:
    """One routing algorithm: its module class and its keyword-only config class."""

    module: type[nn.Module]
    config: type
    description: str

    @property
    def keys(self) -> tuple[str, ...]:
        """The config's field names (``name`` first): what a user may set for this algorithm."""
        return tuple(f.name for f in fields(self.config))

    @property
    def has_iterations(self) -> bool:
        """Whether the number of iterations can be chosen (at build time, or per forward: the
        module's forward then takes `iterations`)."""
        return "iterations" in self.keys


ROUTINGS: dict[str, RoutingSpec] = {
    "dynamic": RoutingSpec(
        DynamicRouting, DynamicRoutingConfig, "routing-by-agreement (Sabour et al. 2017)"
    ),
    "uniform": RoutingSpec(
        UniformRouting, UniformRoutingConfig, "no agreement: c_ij = 1/J (baseline for routing)"
    ),
    "em": RoutingSpec(
        EMRouting, EMRoutingConfig, "EM routing on vector votes (Hinton, Sabour & Frosst 2018)"
    ),
    "attention": RoutingSpec(
        AttentionRouting,
        AttentionRoutingConfig,
        "non-iterative self-attention routing (Efficient-CapsNet, Mazzia et al. 2021)",
    ),
}
"""Routing algorithms by config name (`model.routing.name`); a new algorithm is one entry."""


def routing_config(value: RoutingConfig | dict[str, Any] | None = None) -> RoutingConfig:
    """A routing config from a config object or a dict such as {"name": "dynamic", ...}."""
    if value is None:
        return DynamicRoutingConfig()
    if isinstance(value, dict):
        value = dict(value)
        name = value.pop("name", "dynamic")
        if name not in ROUTINGS:
            raise ValueError(f"routing.name must be one of {sorted(ROUTINGS)}, got {name!r}")
        try:
            return ROUTINGS[name].config(**value)
        except TypeError as err:  # an unknown keyword
            raise ValueError(f"routing ({name}): {err}") from None
    spec = ROUTINGS.get(getattr(value, "name", None))  # type: ignore[arg-type]
    if spec is None or not isinstance(value, spec.config):
        raise ValueError(f"routing must be one of {sorted(ROUTINGS)}'s configs, got {value!r}")
    return value


def build_routing(config: RoutingConfig, *, num_in: int, num_out: int, out_dim: int) -> nn.Module:
    """The routing module for `config` between num_in children and num_out parents."""
    spec = ROUTINGS[config.name]
    return spec.module(config, num_in=num_in, num_out=num_out, out_dim=out_dim)
