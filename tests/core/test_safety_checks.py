"""Issue #8 (safety): SGLDConfig rejects steps that overflow, and the pure loss checks every
estimator and monitor calls (sum reduction, dependence on the model, BatchNorm advice)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from slt_callbacks import SGLDConfig, estimate_llc
from slt_callbacks.core.config import MAX_SCALE, MIN_SCALE
from slt_callbacks.core.functional import (
    LossModule,
    NonFiniteLossError,
    batch_norm_reason,
    loss_depends_on_parameters,
    split_batch,
    sum_reduction_reason,
    trainable_parameters,
)

# -- SGLDConfig: values that pass the range checks but overflow inside the step ------------------


@pytest.mark.parametrize(
    ("kwargs", "fields"),
    [
        # Each was accepted before, then gave inf/0 in the step: noise exactly 0 in float32,
        # an underflowed step, a localization pull of 1e296.
        ({"noise_level": 1e-170}, "`step_size, noise_level`"),
        ({"step_size": 1e-300}, "`step_size`"),
        ({"localization": 1e300}, "`step_size, localization`"),
        ({"n_beta": 1e300}, "`step_size, n_beta`"),
        ({"step_size": 1e31}, "`step_size`"),
        ({"max_grad_norm": 1e-40}, "`max_grad_norm`"),
    ],
)
def test_config_rejects_steps_that_overflow_and_names_the_fields(kwargs, fields):
    (field,) = kwargs
    with pytest.raises(ValueError, match=rf"{fields}.*\[1e-30, 1e\+30\].*{field}="):
        SGLDConfig(**kwargs)


def test_config_bounds_leave_every_realistic_setting_alone():
    # Published transformer settings, closed-form test settings, and extremes people use.
    SGLDConfig(step_size=1e-3, n_beta=30.0, localization=200.0)
    SGLDConfig(step_size=1e-4, n_beta=1086.0, localization=1.0)
    SGLDConfig(step_size=1e-12, n_beta=1e9, localization=0.0)  # no localization at all
    SGLDConfig(step_size=1e-8, noise_level=1e-6)
    assert MIN_SCALE == 1e-30 and MAX_SCALE == 1e30


@pytest.mark.parametrize("field", ["dtype", "autocast", "backend"])
def test_config_names_the_field_for_an_unhashable_value(field):
    # dtype=[] used to raise an unnamed "TypeError: unhashable type: 'list'".
    with pytest.raises(ValueError, match=rf"`{field}` to be a string or None but got list"):
        SGLDConfig(**{field: []})


# -- sum reduction ---------------------------------------------------------------------------------


def regression(n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, x.sum(1, keepdim=True) + torch.randn(n, 1, generator=g)


@pytest.mark.parametrize("n", [2, 15, 16, 64])
def test_a_mean_passes_and_a_sum_is_flagged_whatever_the_batch(n):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    batch = regression(n)
    mean = lambda b: nn.functional.mse_loss(model(b[0]), b[1])  # noqa: E731
    summed = lambda b: nn.functional.mse_loss(model(b[0]), b[1], reduction="sum")  # noqa: E731
    penalised = lambda b: mean(b) + 10.0 * model.weight.square().sum()  # noqa: E731
    with torch.no_grad():
        assert sum_reduction_reason(mean, batch) is None
        assert sum_reduction_reason(penalised, batch) is None  # mean + constant: ratio 2
        reason = sum_reduction_reason(summed, batch)
    assert reason is not None and "sum-reduced" in reason and "Use a mean" in reason
    assert "1.00×" in reason  # a sum gives exactly 1, whatever the data


def test_sum_check_skips_what_it_cannot_judge():
    x, y = regression(1)
    assert split_batch((x, y)) is None  # one sample
    assert split_batch((torch.zeros(4, 3), torch.zeros(5, 1))) is None  # leaves disagree
    assert sum_reduction_reason(lambda b: torch.tensor(0.0), regression(8)) is None  # zero loss
    nan = lambda b: torch.tensor(math.nan)  # noqa: E731
    assert sum_reduction_reason(nan, regression(8)) is None
    first, second = split_batch({"x": torch.arange(5), "tag": "a", "w": torch.tensor(2.0)})
    assert first["x"].tolist() == [0, 1] and second["x"].tolist() == [2, 3, 4]
    assert first["tag"] == second["tag"] == "a" and first["w"] == 2.0


def test_estimate_llc_warns_about_a_sum_reduced_loss():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    data = [regression(16, seed=s) for s in range(4)]
    config = SGLDConfig(num_chains=1, num_draws=2, num_burnin_steps=0)

    def summed(m, b):
        return nn.functional.mse_loss(m(b[0]), b[1], reduction="sum")

    with pytest.warns(UserWarning, match=r"estimate_llc: `loss_fn` looks sum-reduced"):
        estimate_llc(model, summed, data, config=config, seed=0, on_failure="ignore")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*sum-reduced")
        estimate_llc(model, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), data,
                     config=config, seed=0, on_failure="ignore")  # fmt: skip


def test_nan_at_w_star_is_a_dedicated_value_error():
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.fill_(math.nan)
    config = SGLDConfig(num_chains=1, num_draws=2, num_burnin_steps=0)
    with pytest.raises(NonFiniteLossError, match=r"loss at the current weights is nan") as caught:
        estimate_llc(model, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]),
                     [regression()], config=config, seed=0)  # fmt: skip
    assert isinstance(caught.value, ValueError)  # what callers caught before still works


# -- dependence on the model, BatchNorm ------------------------------------------------------


def test_loss_dependence_on_the_parameters():
    model = nn.Linear(3, 1)
    batch = regression()
    params = trainable_parameters(model)
    uses = LossModule(model, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
    ignores = LossModule(model, lambda m, b: b[1].square().mean())
    detaches = LossModule(model, lambda m, b: nn.functional.mse_loss(m(b[0]).detach(), b[1]))
    assert loss_depends_on_parameters(uses, params, batch)
    assert not loss_depends_on_parameters(ignores, params, batch)
    assert not loss_depends_on_parameters(detaches, params, batch)
    assert model.weight.grad is None  # a forward only


def test_batch_norm_advice_names_the_layers_and_the_choice():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    assert batch_norm_reason(nn.Linear(2, 2), train_mode=False) is None
    eval_reason = batch_norm_reason(model, train_mode=False)
    train_reason = batch_norm_reason(model, train_mode=True)
    assert eval_reason is not None and train_reason is not None
    assert "(1)" in eval_reason and "running statistics" in eval_reason
    assert "-15,000" in eval_reason and "SGLDConfig(train_mode=...)" in eval_reason
    assert "batch's own statistics" in train_reason
    assert isinstance(nn.SyncBatchNorm(4), torch.nn.modules.batchnorm._BatchNorm)
