"""The saddle-to-saddle reference problem and the quickstart that trains it.

Default suite: the problem's pieces against their closed forms, and a tiny run of the
quickstart (four monitors in a real Trainer, CSV logger, the plot). Slow (``-m slow``): the
targets of the quickstart run with ``config="auto"`` (its default: no hand tuning) and with a
config chosen by hand: one ``acquire`` event per loss drop within a factor 1.3 in step, and
the final plateau's λ̂ within 15% of the reduced-rank-regression value; ``SGLDConfig()``
throughout misses the final value.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

from slt_callbacks import SGLDConfig, estimate_llc
from slt_callbacks.core.theory import gaussian_nll
from slt_callbacks.reference import DeepLinearNet, SaddleProblem, loss_drop_steps, teacher_matrix

EXAMPLE = Path(__file__).parents[1] / "examples" / "quickstart.py"


def _quickstart():
    """examples/quickstart.py as a module (examples are scripts, not a package)."""
    if "quickstart_example" not in sys.modules:
        spec = importlib.util.spec_from_file_location("quickstart_example", EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["quickstart_example"] = module
        spec.loader.exec_module(module)
    return sys.modules["quickstart_example"]


def _train(problem: SaddleProblem, steps: int) -> tuple[DeepLinearNet, list[float]]:
    """Plain SGD on the problem, as the quickstart's Trainer does it, without Lightning.
    Returns the loss on the whole training set after each step (a minibatch's loss scatters
    enough on the last plateau to fake a drop)."""
    x, y = problem.data()
    model = problem.model()
    opt = torch.optim.SGD(model.parameters(), lr=problem.lr)
    g = torch.Generator().manual_seed(problem.seed + 3)
    losses = []
    while len(losses) < steps:
        for idx in torch.randperm(problem.num_samples, generator=g).split(problem.batch_size):
            loss = gaussian_nll(model, (x[idx], y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                losses.append(float(gaussian_nll(model, (x, y))))
            if len(losses) == steps:
                break
    return model, losses


# -- the reference problem ----------------------------------------------------------------------


def test_teacher_has_exactly_the_requested_singular_values() -> None:
    t = teacher_matrix(6, 5, [10.0, 3.0, 1.0], generator=torch.Generator().manual_seed(0))
    assert t.shape == (5, 6)
    s = torch.linalg.svdvals(t.double())
    torch.testing.assert_close(s[:3], torch.tensor([10.0, 3.0, 1.0], dtype=torch.float64),
                               rtol=1e-5, atol=0)  # fmt: skip — float32 round-off
    assert s[3:].abs().max() < 1e-5


def test_problem_plateaus_lambda_and_data_are_consistent() -> None:
    problem = SaddleProblem(singular_values=(10.0, 3.0, 1.0))
    assert problem.plateau_losses == (55.0, 5.0, 0.5, 0.0)
    assert problem.true_lambda == 16.0  # Aoyagi & Watanabe, M=6, H=5, N=6, r=3
    x, y = problem.data()
    torch.testing.assert_close(y, x @ problem.teacher().T)
    # The teacher itself reaches loss 0 and the student starts on the first plateau.
    student = problem.model()
    start = float(gaussian_nll(student, (x, y)))
    assert start == pytest.approx(problem.plateau_losses[0], rel=0.1)  # 1024 samples
    assert student.end_to_end().abs().max() < 1e-4  # tiny initialisation


def test_problem_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="decreasing order"):
        SaddleProblem(singular_values=(1.0, 3.0))
    with pytest.raises(ValueError, match="at most min"):
        SaddleProblem(widths=(6, 2, 6), singular_values=(3.0, 2.0, 1.0))
    with pytest.raises(ValueError, match="`lr`"):
        SaddleProblem(lr=0.0)
    with pytest.raises(ValueError, match="widths"):
        SaddleProblem(widths=(6,))



def test_true_lambda_beyond_depth_two_is_aoyagis_deep_linear_value() -> None:
    from slt_callbacks.core import theory

    deep = getattr(theory, "deep_linear_lambda", None)
    problem = SaddleProblem(widths=(6, 5, 5, 6))
    if deep is None:
        with pytest.raises(NotImplementedError, match="deep_linear_lambda"):
            _ = problem.true_lambda
        return
    assert problem.true_lambda == deep((6, 5, 5, 6), 3)
    # The deep formula at depth 2 is reduced-rank regression (the value used for depth 2).
    assert deep((6, 5, 6), 3) == SaddleProblem().true_lambda


def test_loss_drop_steps_finds_midpoint_crossings() -> None:
    steps = list(range(10))
    losses = [55, 55, 29, 5, 5, 5, 2, 0.4, 0.1, 0.0]
    assert loss_drop_steps(steps, losses, [55, 5, 0.5, 0]) == [2, 6, 8]
    assert loss_drop_steps(steps[:4], losses[:4], [55, 5, 0.5, 0]) == [2, None, None]
    with pytest.raises(ValueError, match="decreasing"):
        loss_drop_steps(steps, losses, [1, 2])


def test_sgd_learns_one_mode_at_a_time_where_theory_says() -> None:
    problem = SaddleProblem(singular_values=(10.0, 3.0, 1.0))
    model, losses = _train(problem, 500)
    drops = loss_drop_steps(range(1, len(losses) + 1), losses, problem.plateau_losses)
    assert None not in drops
    # Separated in log(step): each drop at least 2x later than the one before.
    assert all(b > 2 * a for a, b in itertools.pairwise(drops))
    # Balanced small-init theory (ln(s/u0) / (2 s lr)) within 25%: the init is random, not
    # balanced, so u0 is only its typical size.
    for measured, predicted in zip(drops, problem.predicted_drop_steps(), strict=True):
        assert measured == pytest.approx(predicted, rel=0.25)
    # At the end every layer has rank r = 3: the unlearned directions stay at init scale.
    for layer in model.layers:
        s = torch.linalg.svdvals(layer.weight.detach())
        assert (s > 0.1).sum() == 3 and s[3:].max() < 1e-2


# -- the quickstart, tiny -------------------------------------------------------------------------


def test_quickstart_runs_end_to_end_and_plots(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    qs = _quickstart()
    problem = SaddleProblem(singular_values=(10.0, 3.0))
    config = SGLDConfig(num_chains=2, num_draws=20, num_burnin_steps=10)
    result = qs.run(problem, steps=200, out=tmp_path / "run", config=config, per_decade=4,
                    verbose=False)  # fmt: skip
    assert result["drop_steps"][0] is not None and result["drop_steps"][1] is not None
    history = result["llc"].history
    assert [r["step"] for r in history][-1] == 200
    assert history[0]["status"] == "not_a_minimum"  # the origin is a saddle
    csv = Path(result["trainer"].logger.log_dir) / "metrics.csv"
    from slt_callbacks.plots import read_metrics_csv

    rows = read_metrics_csv(csv)
    assert sum("slt/llc" in r for r in rows) == len(history)
    assert sum("train_loss" in r for r in rows) == 200
    assert sum("dataset_loss" in r for r in rows) == 200
    png = tmp_path / "run.png"
    qs.plot_run(rows, result["stages"].events, png, loss_key="dataset_loss",
                true_lambda=problem.true_lambda)
    assert png.stat().st_size > 10_000
    text = qs.summary(problem, result)
    assert problem.true_lambda == 15.0  # rank 2: (2·7·12 − 7²)/8 + 1/8
    assert text.count("\n") >= 3 and "  15  (" in text  # the final plateau vs true λ
    curves = qs.curves(problem, result)
    assert len(curves["steps"]) == len(curves["llc"]) == len(curves["status"])
    assert curves["final_true_lambda"] == problem.true_lambda


# -- the targets (slow) ---------------------------------------------------------------------------


def _final_plateau(history: list[dict], last_drop: int) -> list[dict]:
    """Estimates well past the last drop (2x its step): the network sits at the minimum."""
    return [r for r in history if r["step"] >= 2 * last_drop]


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    [
        pytest.param("default", marks=pytest.mark.xfail(strict=False, reason=(
            "measured 2026-12-02 with SGLDConfig() = ε 1e-3, γ 100 throughout: events at 42, "
            "115 and 316 for the drops at 40, 112 and 295, but the final plateau reads 19.04 "
            "against 16 (+19%): ε·nβ·λ_max ≈ 3 is coarse for this model"))),
        "auto",
        "gamma1",
    ],
)  # fmt: skip
def test_quickstart_finds_every_drop_and_the_final_lambda(tmp_path, config: str) -> None:
    """The targets of the quickstart: each loss drop gives exactly one ``acquire`` event within
    a factor 1.3 in step, and the final plateau's λ̂ is within 15% of the reduced-rank value.
    ``auto``: ``LLCMonitor(config="auto")``, the demo's default (measured 2026-12-02: events
    at 42, 115, 316, plateau 16.19, +1%); ``default``: ``SGLDConfig()`` throughout;
    ``gamma1``: weak localization and long chains chosen by hand."""
    qs = _quickstart()
    problem = SaddleProblem()
    result = qs.run(problem, steps=2000, out=tmp_path / "run", config=qs.CONFIGS[config],
                    verbose=False)  # fmt: skip
    drops = result["drop_steps"]
    # Through the public record of the run: the CSV the logger wrote, and the events.
    from slt_callbacks.plots import read_metrics_csv

    rows = read_metrics_csv(Path(result["trainer"].logger.log_dir) / "metrics.csv")
    codes = {r["step"]: r["slt/diag/status_code"] for r in rows if "slt/diag/status_code" in r}
    history = [{"step": r["step"], "llc": r["slt/llc"], "status": codes[r["step"]]}
               for r in rows if "slt/llc" in r]  # fmt: skip
    events = [e for e in result["stages"].events if e.component is None]
    assert None not in drops
    for drop in drops:
        near = [e for e in events if drop / 1.3 <= e.step <= drop * 1.3]
        assert len(near) == 1, f"drop at {drop}: events {[(e.step, e.kind) for e in events]}"
        assert str(getattr(near[0].kind, "value", near[0].kind)) == "acquire"
    assert len(events) == len(drops), [(e.step, e.kind) for e in events]
    plateau = _final_plateau(history, drops[-1])
    assert plateau and all(r["status"] == 0 for r in plateau)  # Status.HEALTHY.code
    mean = sum(r["llc"] for r in plateau) / len(plateau)
    assert mean == pytest.approx(problem.true_lambda, rel=0.15)


@pytest.mark.slow
def test_final_minimum_reads_the_reduced_rank_value_with_weak_localization() -> None:
    """At the end of training the network is at a minimal-rank true parameter; with γ = 1 and
    long chains λ̂ is within 15% of Aoyagi & Watanabe's value (measured: −2% at ε = 1e-4,
    +2% at 2e-4; γ = 100, the default, reads −26%)."""
    problem = SaddleProblem()
    model, _ = _train(problem, 2000)
    x, y = problem.data()
    pool = list(zip(x.split(problem.batch_size), y.split(problem.batch_size), strict=True))
    # Every hyperparameter explicit: the default ε changed (1e-3), which reads 2x too high here.
    config = SGLDConfig(step_size=1e-4, localization=1.0, num_draws=2000, num_burnin_steps=500)
    result = estimate_llc(model, gaussian_nll, pool, config=config, seed=0)
    assert result.healthy, result.reasons
    # 4 chains: standard error ≈ 0.6 (chain std ≈ 1.1); 15% is 2.4, four standard errors.
    assert result.llc_mean == pytest.approx(problem.true_lambda, rel=0.15)
    assert math.isfinite(result.llc_std)
