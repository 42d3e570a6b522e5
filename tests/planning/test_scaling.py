"""Chinchilla sizing: Table 3 of Hoffmann et al. 2022 (Approach 1) within 2%, and the parametric loss."""

from __future__ import annotations

import pytest

from megatron_lite.planning.errors import PlanError
from megatron_lite.planning.scaling import BESIROGLU, HOFFMANN, constants, optimum, plan_compute, training_time

# (parameters, FLOPs, tokens), Table 3
TABLE3 = [
    (400e6, 1.92e19, 8.0e9), (1e9, 1.21e20, 20.2e9), (10e9, 1.23e22, 205.1e9), (67e9, 5.76e23, 1.5e12),
    (175e9, 3.85e24, 3.7e12), (280e9, 9.90e24, 5.9e12), (520e9, 3.43e25, 11.0e12), (1e12, 1.27e26, 21.2e12),
    (10e12, 1.30e28, 216.2e12),
]


@pytest.mark.parametrize("params,flops,tokens", TABLE3)
def test_table3_from_flops(params: float, flops: float, tokens: float) -> None:
    r = plan_compute(flops=flops)
    assert r["params"] == pytest.approx(params, rel=0.02)
    # The 67B row prints 1.5T tokens, but its own FLOPs give 5.76e23 / (6 * 67e9) = 1.43T.
    expected = flops / (6 * params) if params == 67e9 else tokens
    assert r["tokens"] == pytest.approx(expected, rel=0.02)
    assert r["flops"] == pytest.approx(6 * r["params"] * r["tokens"])


@pytest.mark.parametrize("params,flops,tokens", [row for row in TABLE3 if row[0] != 67e9])
def test_table3_from_params_and_tokens(params: float, flops: float, tokens: float) -> None:
    r = plan_compute(params=params)
    assert r["flops"] == pytest.approx(flops, rel=0.02)
    assert r["tokens"] == pytest.approx(tokens, rel=0.02)
    assert plan_compute(tokens=tokens)["params"] == pytest.approx(params, rel=0.02)


def test_approaches_at_gopher_budget() -> None:
    a = {k: v["params"] for k, v in plan_compute(flops=5.76e23)["approaches"].items()}
    assert a["approach1"] == pytest.approx(67e9, rel=0.02)
    assert a["approach2"] == pytest.approx(63e9, rel=1e-6)
    assert 25e9 < a["approach3"] < 45e9


def test_parametric_loss_and_its_minimum() -> None:
    assert HOFFMANN.loss(70e9, 1.4e12) == pytest.approx(1.69 + 406.4 / 70e9**0.34 + 410.7 / 1.4e12**0.28)
    best = optimum("approach3", flops=1e22)
    for scale in (0.5, 2.0):  # moving off the optimum along C = 6ND raises the loss
        p = best["params"] * scale
        assert HOFFMANN.loss(p, 1e22 / (6 * p)) > best["loss"]


def test_params_and_tokens_together() -> None:
    r = plan_compute(params=1e9, tokens=1e11)
    assert r["flops"] == 6e20 and not r["compute_optimal"]


def test_loss_uses_the_fit_of_the_approach() -> None:
    run = plan_compute(params=1e9, tokens=2e10, approach="replication")
    assert run["loss"] == pytest.approx(BESIROGLU.loss(1e9, 2e10)) and run["loss_fit"] == "besiroglu"
    assert plan_compute(params=1e9, tokens=2e10)["loss"] == pytest.approx(HOFFMANN.loss(1e9, 2e10))
    opt = plan_compute(flops=1e22, approach="replication")
    assert opt["loss"] == pytest.approx(BESIROGLU.loss(opt["params"], opt["tokens"]))
    assert "arXiv:2404.10102" in opt["loss_source"]


def test_constants_name_their_sources() -> None:
    c = constants()
    assert c["approaches"]["approach1"]["K"] == 0.09935 and "Table 3" in c["approaches"]["approach1"]["source"]
    assert c["approaches"]["approach2"]["a"] == 0.49 and "Table 2" in c["approaches"]["approach2"]["source"]
    assert c["loss_fits"]["hoffmann"]["E"] == 1.69 and "arXiv:2203.15556" in c["loss_fits"]["hoffmann"]["source"]
    assert c["loss_fits"]["besiroglu"]["B"] == 2085.43 and "arXiv:2404.10102" in c["loss_fits"]["besiroglu"]["source"]
    assert plan_compute(flops=1e20)["constants"] == c


def test_training_time() -> None:
    t = training_time(1e24, gpus=1000, peak_flops=989e12, mfu=0.4, price_per_gpu_hour=2.0)
    gpu_seconds = 1e24 / (989e12 * 0.4)
    assert t["gpu_hours"] == pytest.approx(gpu_seconds / 3600)
    assert t["days"] == pytest.approx(gpu_seconds / 1000 / 86400)
    assert t["cost"] == pytest.approx(2 * t["gpu_hours"])


@pytest.mark.parametrize("kw", [dict(flops=0), dict(params=-5), dict(tokens=float("nan")), dict(), 
                                dict(flops=1e20, params=1e9)])
def test_bad_budget(kw: dict) -> None:
    with pytest.raises(PlanError):
        plan_compute(**kw)
