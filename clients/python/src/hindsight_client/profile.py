"""Power-function EMA profiles: σ_rel ↔ γ and the per-update decay β.

Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2),
arXiv 2312.02696, Appendix C. Times are training images (``nimg``) throughout.

A power-function EMA with exponent γ read at time t averages the weights with the profile
``p(τ) = (γ + 1)/t · (τ/t)^γ`` on ``[0, t]`` (eq. 121), whose relative standard deviation is
``σ_rel = sqrt((γ + 1) / ((γ + 2)² (γ + 3)))`` (eq. 123). Valid widths are
``0 < σ_rel < sqrt(1/12)`` (γ > 0); like the server, widths narrower than σ_rel 1e-6
(γ > 1e6) are refused.
"""

from __future__ import annotations

import math

SIGMA_REL_MAX = math.sqrt(1.0 / 12.0)
"""The limit γ → 0; σ_rel must be strictly below it."""

SIGMA_REL_MIN = 1e-6
"""The narrowest width accepted (γ ≈ 1e6), as on the server."""

GAMMA_MAX = 1e6
"""The largest exponent accepted, as on the server."""


def gamma_to_sigma_rel(gamma: float) -> float:
    """σ_rel of exponent ``gamma`` (eq. 123). Raises ``ValueError`` unless ``0 < γ ≤ 1e6``."""
    gamma = float(gamma)
    if not (math.isfinite(gamma) and 0.0 < gamma <= GAMMA_MAX):
        raise ValueError(f"gamma {gamma} is out of range: it must satisfy 0 < gamma <= 1e6")
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Exponent γ of the width ``sigma_rel`` (eq. 126): the positive root of
    ``γ³ + 7γ² + (16 − s)γ + (12 − s) = 0`` with ``s = σ_rel⁻²``.

    The cubic is convex on γ > 0 and positive at ``sqrt(s)``, so Newton's method from there
    descends onto the root monotonically; it stops when a step no longer decreases γ (the
    last bit), not at a tolerance. Raises ``ValueError`` outside ``[1e-6, sqrt(1/12))``.
    """
    sigma_rel = float(sigma_rel)
    if not (math.isfinite(sigma_rel) and 0.0 < sigma_rel < SIGMA_REL_MAX):
        raise ValueError(
            f"sigma_rel {sigma_rel} is out of range: it must satisfy "
            "0 < sigma_rel < sqrt(1/12) ≈ 0.288675"
        )
    if sigma_rel < SIGMA_REL_MIN:
        raise ValueError(f"sigma_rel {sigma_rel} is below the smallest supported value 1e-6")
    s = 1.0 / (sigma_rel * sigma_rel)
    gamma = math.sqrt(s)
    for _ in range(200):
        # (γ + 2)²(γ + 3) − s(γ + 1) is the cubic with its large terms kept apart.
        value = (gamma + 2.0) ** 2 * (gamma + 3.0) - s * (gamma + 1.0)
        slope = (gamma + 2.0) * (3.0 * gamma + 8.0) - s
        step = value / slope
        nxt = gamma - step
        if math.isnan(nxt) or nxt >= gamma or step <= 0.0:
            break
        gamma = nxt
    if not gamma > 0.0:
        raise ValueError(f"sigma_rel {sigma_rel} is too close to sqrt(1/12): gamma is not > 0")
    return gamma


def beta(gamma: float, t_next: float, t_delta: float) -> float:
    """The decay that keeps an EMA on the power-function profile (eq. 127):
    ``β = (1 − t_delta/t_next)^(γ + 1)``, where ``t_next`` is the training time after the
    update and ``t_delta`` the images since the previous update.

    Chaining updates at ``t_1 < … < t_n`` gives the value held over ``(t_{i−1}, t_i]`` the
    weight ``(t_i/t_n)^(γ+1) − (t_{i−1}/t_n)^(γ+1)``: exactly the profile's mass there, for
    any spacing of the updates. Computed with ``log1p`` so it stays accurate late in training
    (``t_delta ≪ t_next``).
    """
    if t_delta >= t_next:
        return 0.0
    return math.exp((gamma + 1.0) * math.log1p(-t_delta / t_next))
