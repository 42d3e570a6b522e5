"""Compute-optimal model size and tokens (Chinchilla), predicted loss, and wall-clock time for a budget.

Compute is C = 6 P D (P parameters, D tokens; Kaplan et al. 2020, Hoffmann et al. 2022). Each approach of Hoffmann et
al. 2022 ("Training Compute-Optimal Large Language Models", arXiv:2203.15556) is a power law P_opt = K C^a with
D_opt = C / (6 P_opt):

- approach1 (minimum over training curves): a = 0.4981, K = 0.09935, least-squares fit in log space to the paper's
  Table 3 (P, C) rows. Table 2 gives a = 0.50 (rounded). The 67B row is left out of the fit: its own numbers disagree
  (6 x 67e9 x 1.5e12 = 6.03e23, not the 5.76e23 printed).
- approach2 (IsoFLOP profiles): a = 0.49 (Table 2), with K set so that P_opt(5.76e23) = 63e9, the approach-2 size the
  paper gives for Gopher's budget (Section 3).
- approach3 (parametric fit): the closed-form minimum of L(N, D) = E + A/N^alpha + B/D^beta under C = 6ND, with the
  paper's constants E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28 (Section 3.3): a = beta/(alpha+beta).
  With these rounded constants it gives ~32B for Gopher's budget where the paper reports 40B.
- replication: the same minimum with the refit of Besiroglu et al. 2024 ("Chinchilla Scaling: A replication attempt",
  arXiv:2404.10102): E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658.

The predicted loss is L(N, D) with the constants of the selected approach's fit: Hoffmann et al.'s for approach1-3,
Besiroglu et al.'s for replication (nats per token on MassiveText; other data and tokenizers differ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_lite.planning.errors import PlanError

SECONDS_PER_DAY = 86400.0
GOPHER_FLOPS = 5.76e23


PAPERS = {
    "hoffmann": "Hoffmann et al. 2022, Training Compute-Optimal Large Language Models (arXiv:2203.15556)",
    "besiroglu": "Besiroglu et al. 2024, Chinchilla Scaling: A replication attempt (arXiv:2404.10102)",
}


@dataclass(frozen=True)
class LossFit:
    """L(N, D) = E + A / N^alpha + B / D^beta, with the paper (a ``PAPERS`` key) and the place in it."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    paper: str = ""
    where: str = ""

    @property
    def source(self) -> str:
        return f"{PAPERS[self.paper]}, {self.where}" if self.paper else self.where

    def loss(self, params: float, tokens: float) -> float:
        return self.E + self.A / params**self.alpha + self.B / tokens**self.beta

    def power_law(self) -> tuple[float, float]:
        """(K, a) of P_opt = K C^a: the minimum of L subject to C = 6 N D."""
        s = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
        a = self.beta / s
        return g / 6.0**a, a


    def constants(self) -> dict[str, float | str]:
        return {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta, "paper": self.paper,
                "source": self.source}


HOFFMANN = LossFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, paper="hoffmann",
                   where="Section 3.3 (Approach 3, parametric fit)")
BESIROGLU = LossFit(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658, paper="besiroglu",
                    where="their refit of Approach 3")

# name -> (K, a) of P_opt = K * C^a
APPROACHES: dict[str, tuple[float, float]] = {
    "approach1": (0.09935, 0.4981),
    "approach2": (63e9 / GOPHER_FLOPS**0.49, 0.49),
    "approach3": HOFFMANN.power_law(),
    "replication": BESIROGLU.power_law(),
}
APPROACH_FITS = {"approach1": HOFFMANN, "approach2": HOFFMANN, "approach3": HOFFMANN, "replication": BESIROGLU}
APPROACH_SOURCES = {  # name -> (paper, where the power law comes from)
    "approach1": ("hoffmann", "least-squares fit to the (P, C) rows of Table 3 (Approach 1), the 67B row left out"),
    "approach2": ("hoffmann", "exponent of Table 2 (Approach 2), K from 63B at 5.76e23 FLOPs (Section 3.2)"),
    "approach3": ("hoffmann", "minimum of its L(N, D) (Section 3.3) under C = 6ND"),
    "replication": ("besiroglu", "minimum of its refit L(N, D) under C = 6ND"),
}


def constants() -> dict:
    """Every constant ``plan_compute`` uses, with its source: the papers, the power laws and the loss fits."""
    return {
        "papers": dict(PAPERS),
        "approaches": {name: {"K": k, "a": a, "paper": APPROACH_SOURCES[name][0],
                              "source": f"{PAPERS[APPROACH_SOURCES[name][0]]}, {APPROACH_SOURCES[name][1]}"}
                       for name, (k, a) in APPROACHES.items()},
        "loss_fits": {"hoffmann": HOFFMANN.constants(), "besiroglu": BESIROGLU.constants()},
    }


def _positive(name: str, value: float | None) -> None:
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise PlanError(f"--{name} must be a positive number, got {value:g}")


def optimum(approach: str, flops: float | None = None, params: float | None = None,
            tokens: float | None = None) -> dict[str, float]:
    """The compute-optimal (flops, params, tokens) of one approach, given exactly one of the three."""
    if approach not in APPROACHES:
        raise PlanError(f"unknown approach '{approach}'; choose from {', '.join(APPROACHES)}")
    k, a = APPROACHES[approach]
    if flops is not None:
        c = flops
    elif params is not None:
        c = (params / k) ** (1.0 / a)
    elif tokens is not None:  # D = C / (6 K C^a) = C^(1-a) / (6K)
        c = (6.0 * k * tokens) ** (1.0 / (1.0 - a))
    else:
        raise PlanError("give one of --flops, --params or --tokens")
    p = k * c**a
    d = c / (6.0 * p)
    return {"flops": c, "params": p, "tokens": d, "loss": APPROACH_FITS[approach].loss(p, d)}


def plan_compute(flops: float | None = None, params: float | None = None, tokens: float | None = None,
                 approach: str = "approach1") -> dict:
    """C = 6PD and the Chinchilla optimum for the given budget.

    Exactly one of ``flops``, ``params``, ``tokens``: the headline numbers are ``approach``'s optimum. ``params`` with
    ``tokens``: the run as given (C = 6PD, not necessarily optimal), with each approach's optimum for that C beside it.
    """
    for name, value in (("flops", flops), ("params", params), ("tokens", tokens)):
        _positive(name, value)
    given = [x is not None for x in (flops, params, tokens)]
    if sum(given) == 0:
        raise PlanError("give one of --flops, --params or --tokens (or --params with --tokens)")
    if sum(given) > 1 and not (params is not None and tokens is not None and flops is None):
        raise PlanError("give one of --flops, --params or --tokens; only --params and --tokens combine")
    if approach not in APPROACHES:
        raise PlanError(f"unknown approach '{approach}'; choose from {', '.join(APPROACHES)}")
    fit = APPROACH_FITS[approach]
    if params is not None and tokens is not None:
        headline = {"flops": 6.0 * params * tokens, "params": float(params), "tokens": float(tokens),
                    "loss": fit.loss(params, tokens)}
        optima = {name: optimum(name, flops=headline["flops"]) for name in APPROACHES}
        optimal = False
    else:
        optima = {name: optimum(name, flops, params, tokens) for name in APPROACHES}
        headline = dict(optima[approach])
        optimal = True
    out = dict(headline)
    out.update(approach=approach if optimal else None, compute_optimal=optimal,
               tokens_per_param=headline["tokens"] / headline["params"], approaches=optima,
               loss_fit="besiroglu" if fit is BESIROGLU else "hoffmann", loss_source=fit.source,
               constants=constants())
    return out


def training_time(flops: float, gpus: int, peak_flops: float, mfu: float,
                  price_per_gpu_hour: float | None = None) -> dict[str, float]:
    """Wall-clock days and GPU-hours for ``flops`` at ``mfu`` of ``peak_flops`` per GPU (and cost when priced)."""
    if gpus <= 0:
        raise PlanError(f"--gpus must be a positive integer, got {gpus}")
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu must be in (0, 1], got {mfu:g}")
    _positive("peak-flops", peak_flops)
    gpu_seconds = flops / (peak_flops * mfu)
    out = {"gpus": gpus, "mfu": mfu, "peak_flops": peak_flops, "gpu_hours": gpu_seconds / 3600.0,
           "days": gpu_seconds / gpus / SECONDS_PER_DAY}
    if price_per_gpu_hour is not None:
        if price_per_gpu_hour < 0:
            raise PlanError(f"--price-per-gpu-hour must be >= 0, got {price_per_gpu_hour:g}")
        out["cost"] = out["gpu_hours"] * price_per_gpu_hour
    return out
