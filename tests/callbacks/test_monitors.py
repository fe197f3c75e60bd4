"""The three monitors in a real Trainer: what they log, when, on what, and what they refuse."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from slt_callbacks import SGLDConfig, estimate_llc
from slt_callbacks.callbacks import (
    HessianTraceMonitor,
    LLCMonitor,
    TrainingStepLoss,
    WeightNormMonitor,
)
from slt_callbacks.callbacks import _calibration as calibration_module
from slt_callbacks.callbacks._base import check_strategy, derive_seed, draw_training_batches
from slt_callbacks.callbacks._distributed import check_chain_split
from slt_callbacks.core.curvature import fisher_trace, hessian_trace
from slt_callbacks.executors import sampler_key
from slt_callbacks.records import LLCRecord
from slt_callbacks.schedule import Schedule

from .helpers import (
    FAST,
    TinyRegressor,
    loader,
    make_trainer,
    read_csv_metrics,
    regression_set,
    rows_with,
)

DIAG = ["acceptance", "clipped_fraction", "drift", "frac_below_init", "num_diverged", "status_code"]


def csv_rows(trainer) -> list[dict[str, str]]:
    return read_csv_metrics(Path(trainer.logger.log_dir) / "metrics.csv")


def fit_quietly(trainer, model, *args, **kwargs) -> None:
    # Estimates of a model in training are mostly "not a minimum"; the warnings are tested
    # on their own below.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LLCMonitor at step")
        trainer.fit(model, *args, **kwargs)


# -- what is logged, and when -----------------------------------------------------------------


def test_every_metric_key_arrives_at_the_scheduled_steps(tmp_path):
    llc = LLCMonitor(
        config=FAST,
        schedule=[0, 3, 8],
        components={"first": "net.0.*", "last": ["net.3.weight", "net.3.bias"]},
        datasets={"small": [regression_set(16, seed=1).tensors]},
    )
    hessian = HessianTraceMonitor(schedule=Schedule(every=4), num_probes=4)
    norms = WeightNormMonitor(schedule=4, components={"first": "net.0.*"})
    trainer = make_trainer(tmp_path, [llc, hessian, norms])
    fit_quietly(trainer, TinyRegressor(), loader())

    rows = csv_rows(trainer)
    keys = {key for row in rows for key, value in row.items() if value and key.startswith("slt/")}
    assert keys == {
        "slt/llc", "slt/llc_std", "slt/llc_seconds",
        "slt/llc/first", "slt/llc/last", "slt/llc_std/first", "slt/llc_std/last",
        "slt/llc_data/small", "slt/llc_data_std/small",
        *(f"slt/diag/{name}" for name in DIAG),
        "slt/hessian_trace", "slt/hessian_trace_stderr",
        "slt/fisher_trace", "slt/fisher_trace_stderr",
        "slt/weight_norm", "slt/weight_norm/first",
    }  # fmt: skip
    assert [s for s, _ in rows_with(rows, "slt/llc")] == [0, 3, 8]
    assert [s for s, _ in rows_with(rows, "slt/llc_data/small")] == [0, 3, 8]
    assert [s for s, _ in rows_with(rows, "slt/hessian_trace")] == [0, 4, 8]
    assert [s for s, _ in rows_with(rows, "slt/weight_norm/first")] == [0, 4, 8]
    # What was logged is what the history keeps.
    assert [v for _, v in rows_with(rows, "slt/llc")] == pytest.approx(
        [h["llc"] for h in llc.history]
    )
    assert [h["step"] for h in hessian.history] == [0, 4, 8]
    assert set(hessian.history[0]) == {
        "step", "hessian_trace", "hessian_trace_stderr", "fisher_trace", "fisher_trace_stderr",
    }  # fmt: skip
    assert set(norms.history[0]) == {"step", "weight_norm", "weight_norm/first"}
    status_codes = {int(v) for _, v in rows_with(rows, "slt/diag/status_code")}
    assert status_codes <= set(range(6))
    assert all(LLCRecord.from_dict(h).status == h["status"] for h in llc.history)
    # The data-restricted estimate (16 samples) runs at the global nβ (128/log 128 here), not
    # at 16/log 16: λ̂ values are only comparable at one temperature.
    assert llc.last_dataset_results["small"].n_beta == pytest.approx(llc.n_beta)
    # The user's own metric is logged at every step, as without monitors.
    assert len(rows_with(rows, "train_loss")) == 8
    assert set(trainer.callback_metrics) == {"train_loss"}


def test_zero_configuration_with_a_dict_returning_training_step(tmp_path):
    monitor = LLCMonitor(config=FAST)  # default schedule, loss and data
    trainer = make_trainer(tmp_path, [monitor], max_steps=5)
    fit_quietly(trainer, TinyRegressor(return_dict=True), loader())
    assert [h["step"] for h in monitor.history] == Schedule().steps_until(5)
    assert all(math.isfinite(h["llc"]) for h in monitor.history)
    assert monitor.history[0]["loss"] is None  # no training batch seen at step 0
    # Every record names the sampler behind it, one for the whole run with a fixed config.
    assert {h["sampler"] for h in monitor.history} == {sampler_key(FAST)}
    assert all(h["loss"] > 0 for h in monitor.history[1:])
    # The default 16 batches of 16 would need 256 samples; the training set has 128, so the
    # monitor takes one pass (8 batches) rather than repeating samples, which would inflate n.
    assert monitor.n_beta == pytest.approx(128 / math.log(128))


def test_default_data_are_fixed_draws_from_the_dataset_through_the_transfer_hooks(tmp_path):
    class Hooked(TinyRegressor):
        def on_after_batch_transfer(self, batch, dataloader_idx):
            x, y = batch
            self.seen = getattr(self, "seen", 0) + 1
            return x, y

    monitor = LLCMonitor(config=FAST, schedule=[0])
    trainer = make_trainer(tmp_path, [monitor], max_steps=1)
    module = Hooked()
    fit_quietly(trainer, module, loader())
    assert module.seen == 8 + 1  # our 8 batches (one pass of 128 samples), then training's
    expected = draw_training_batches(
        loader(), num_batches=16,
        generator=torch.Generator().manual_seed(derive_seed(0, 0, 0, "data")), owner="test",
    )  # fmt: skip
    assert len(monitor._batches) == 8
    for ours, theirs in zip(monitor._batches, expected, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_once_per_optimizer_step_under_gradient_accumulation(tmp_path):
    calls = []

    class Counting(WeightNormMonitor):
        def _measure(self, trainer, pl_module, step):
            calls.append(step)
            return super()._measure(trainer, pl_module, step)

    monitor = Counting(schedule=1)
    trainer = make_trainer(tmp_path, [monitor], max_steps=3, accumulate_grad_batches=2)
    trainer.fit(TinyRegressor(), loader())
    assert calls == [0, 1, 2, 3]
    assert [h["step"] for h in monitor.history] == [0, 1, 2, 3]


def test_skips_the_sanity_check_and_fast_dev_run(tmp_path):
    class WithValidation(TinyRegressor):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", nn.functional.mse_loss(self(batch[0]), batch[1]))

    monitors = [LLCMonitor(config=FAST), HessianTraceMonitor(), WeightNormMonitor()]
    trainer = make_trainer(tmp_path, monitors, fast_dev_run=True)
    trainer.fit(WithValidation(), loader(), loader(shuffle=False))
    assert all(m.history == [] for m in monitors)

    norms = WeightNormMonitor(schedule=1)
    trainer = make_trainer(tmp_path, [norms], max_steps=2, num_sanity_val_steps=2)
    trainer.fit(WithValidation(), loader(), loader(shuffle=False))
    assert [h["step"] for h in norms.history] == [0, 1, 2]


def test_explicit_loss_fn_and_data_override_the_defaults(tmp_path):
    class NoLoss(TinyRegressor):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.manual = True  # something training_step does that the default would repeat
            return loss

    def loss_fn(model, batch):
        return nn.functional.l1_loss(model(batch[0]), batch[1])

    data = DataLoader(regression_set(64, seed=3), batch_size=8)
    monitor = LLCMonitor(config=FAST, schedule=[0, 2], loss_fn=loss_fn, data=data)
    hessian = HessianTraceMonitor(schedule=[0], loss_fn=loss_fn, data=data, num_batches=2)
    trainer = make_trainer(tmp_path, [monitor, hessian], max_steps=2)
    fit_quietly(trainer, NoLoss(), loader())
    assert [b[0].shape[0] for b in monitor._batches] == [8] * 8  # one pass over `data`
    assert len(hessian._batches) == 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(monitor._batches, data, strict=False))


def test_training_step_without_a_loss_asks_for_loss_fn(tmp_path):
    class ReturnsNothing(TinyRegressor):
        def training_step(self, batch, batch_idx):
            super().training_step(batch, batch_idx)
            return None

    trainer = make_trainer(tmp_path, [LLCMonitor(config=FAST)])
    with pytest.raises(ValueError, match=r"returned NoneType\. Pass `loss_fn="):
        trainer.fit(ReturnsNothing(), loader())
    assert trainer.global_step == 0


def test_manual_optimization_needs_an_explicit_loss_fn(tmp_path):
    class Manual(TinyRegressor):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    trainer = make_trainer(tmp_path, [HessianTraceMonitor()])
    with pytest.raises(MisconfigurationException, match=r"manual optimization.*`loss_fn="):
        trainer.fit(Manual(), loader())


# -- bad configuration: before any training step ----------------------------------------------


class StepCounter(Callback):
    def __init__(self):
        self.batches = 0

    def on_train_batch_start(self, *args):
        self.batches += 1


def per_sample_loss(model, batch):
    return (model(batch[0]) - batch[1]).pow(2).squeeze(-1)


def ignores_the_model(model, batch):
    return batch[1].square().mean()


@pytest.mark.parametrize(
    ("monitor", "trainer_kwargs", "error", "match"),
    [
        (
            lambda: WeightNormMonitor(),
            {"logger": False},
            MisconfigurationException,
            r"Cannot use `WeightNormMonitor` callback with `Trainer` that has no logger",
        ),
        (
            lambda: LLCMonitor(config=FAST, components={"enc": "encoder.*"}),
            {},
            ValueError,
            r"`components\['enc'\]`: the glob 'encoder\.\*' matches no trainable parameter\. "
            r"Parameters are named like \['net\.0\.weight'",
        ),
        (
            lambda: WeightNormMonitor(components={"enc": "encoder.*"}),
            {},
            ValueError,
            r"the glob 'encoder\.\*' matches no trainable parameter",
        ),
        (
            lambda: HessianTraceMonitor(schedule=[100]),
            {"max_steps": 8},
            MisconfigurationException,
            r"`schedule` = Schedule\(steps=\[100\]\) never fires within max_steps = 8 \(its "
            r"first step is 100\)",
        ),
        (
            lambda: HessianTraceMonitor(schedule=Schedule(every=10, start=50)),
            {"max_steps": -1, "max_epochs": 2},
            MisconfigurationException,
            r"never fires within the estimated number of training steps = 16",
        ),
        (
            lambda: LLCMonitor(config=FAST, loss_fn=per_sample_loss),
            {},
            ValueError,
            r"LLCMonitor \(first batch of `data`\): Expected `loss_fn` to return a scalar loss "
            r".* shape \(16,\); reduce it with \.mean\(\)",
        ),
        (
            lambda: LLCMonitor(config=FAST, datasets={"bad": [torch.zeros(3)]}),
            {},
            ValueError,
            r"first batch of `datasets\['bad'\]`",
        ),
        (
            lambda: LLCMonitor(config=replace(FAST, num_chains=1), data=iter([])),
            {},
            ValueError,
            r"expected `data` to yield at least one batch",
        ),
        # Issue #8: whatever the schedule. Before, this failed only at the first estimate
        # (step 5 here, after 5 training steps; step 1000 with schedule=[1000]).
        (
            lambda: LLCMonitor(config=FAST, schedule=[5], loss_fn=ignores_the_model),
            {},
            ValueError,
            r"LLCMonitor \(first batch of `data`\): the loss returned by `loss_fn` does not "
            r"depend on any trainable parameter",
        ),
        (
            lambda: LLCMonitor(config=FAST, schedule=[5], data=[regression_set(1).tensors]),
            {},
            ValueError,
            r"`data` holds 1 sample\(s\), too few for the default n_beta",
        ),
        # Before, the Hessian monitor logged 0.0 for such a loss, silently.
        (
            lambda: HessianTraceMonitor(schedule=[5], loss_fn=ignores_the_model),
            {},
            ValueError,
            r"HessianTraceMonitor .* does not depend on any trainable parameter",
        ),
    ],
)
def test_bad_configuration_fails_before_any_training_step(
    tmp_path, monitor, trainer_kwargs, error, match
):
    counter = StepCounter()
    trainer = make_trainer(tmp_path, [monitor(), counter], **trainer_kwargs)
    with pytest.raises(error, match=match):
        trainer.fit(TinyRegressor(), loader())
    assert counter.batches == 0


def test_a_fully_frozen_model_is_refused_before_the_first_step(tmp_path):
    class Frozen(TinyRegressor):
        def __init__(self):
            super().__init__()
            self.net.requires_grad_(False)

        def configure_optimizers(self):
            return None  # nothing to train: Lightning runs without an optimizer

    for monitor in (LLCMonitor(config=FAST, schedule=[5]), HessianTraceMonitor(schedule=[5])):
        counter = StepCounter()
        trainer = make_trainer(tmp_path, [monitor, counter])
        with pytest.raises(ValueError, match=r"no trainable parameter"):
            trainer.fit(Frozen(), loader())
        assert counter.batches == 0


def test_an_iterable_training_set_asks_for_data(tmp_path):
    class Stream(IterableDataset):
        def __iter__(self):
            return iter(regression_set(32))

    trainer = make_trainer(tmp_path, [HessianTraceMonitor()])
    with pytest.raises(ValueError, match=r"iterable-style Stream .* Pass `data=`"):
        trainer.fit(TinyRegressor(), DataLoader(Stream(), batch_size=8))


def test_two_monitors_of_one_kind_need_distinct_prefixes(tmp_path):
    a, b = WeightNormMonitor(), WeightNormMonitor()
    assert a.state_key == b.state_key
    # Lightning itself refuses callbacks whose checkpoint states would collide.
    with pytest.raises(RuntimeError, match=r"state_key` must be unique"):
        make_trainer(tmp_path, [a, b])

    fine = WeightNormMonitor(prefix="slt/fine/", schedule=[0])
    coarse = WeightNormMonitor(schedule=[0])
    assert fine.state_key != coarse.state_key
    trainer = make_trainer(tmp_path, [fine, coarse], max_steps=1)
    trainer.fit(TinyRegressor(), loader())
    rows = csv_rows(trainer)
    assert rows_with(rows, "slt/fine/weight_norm") == rows_with(rows, "slt/weight_norm")


def test_sharded_strategies_are_refused_with_a_reason():
    trainer = SimpleNamespace(strategy=FSDPStrategy(), world_size=2)
    with pytest.raises(MisconfigurationException, match=r"cannot run with FSDPStrategy: the "
                       r"parameters are sharded .* Use strategy=\"ddp\""):
        check_strategy(trainer, "LLCMonitor")
    check_strategy(SimpleNamespace(strategy=DDPStrategy(), world_size=2), "LLCMonitor")
    with pytest.raises(MisconfigurationException, match=r"num_chains=2 cannot be split across 4"):
        check_chain_split(FAST, 4, "LLCMonitor")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"config": {"step_size": 1}}, r"`config` to be an SGLDConfig, 'auto' or None"),
        ({"schedule": "often"}, r"`schedule` to be a Schedule, a list of steps"),
        ({"components": ["net.*"]}, r"`components` to be a mapping from name to selector"),
        ({"datasets": {"a/b": []}}, r"keys of `datasets` to be non-empty strings without '/'"),
        ({"datasets": {"a": torch.zeros(2)}},
         r"`datasets\['a'\]` to be an iterable of batches .*bare Tensor"),
        ({"data": torch.zeros(4, 2)}, r"`data` to be None or an iterable of batches"),
        ({"loss_fn": "mse"}, r"`loss_fn` to be None or a callable"),
        ({"seed": -1}, r"`seed` to be a non-negative int but got -1"),
        ({"prefix": ""}, r"`prefix` to be a non-empty string"),
        ({"calibration": {"num_draws": 10}}, r"`calibration` only applies with config='auto'"),
        ({"criteria": 0.5}, r"`criteria` to be a HealthCriteria or None"),
    ],
)
def test_llc_monitor_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLCMonitor(**kwargs)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (HessianTraceMonitor, {"num_probes": 0}, r"`num_probes` to be a positive int but got 0"),
        (HessianTraceMonitor, {"num_batches": True}, r"`num_batches` to be a positive int"),
        (HessianTraceMonitor, {"chunk_size": 0}, r"`chunk_size` to be None or a positive int"),
        (HessianTraceMonitor, {"fisher": "yes"}, r"`fisher` to be a bool"),
        (WeightNormMonitor, {"components": "net.*"}, r"`components` to be None or a mapping"),
        (WeightNormMonitor, {"trainable_only": 1}, r"`trainable_only` to be a bool"),
    ],
)
def test_other_monitor_arguments_are_validated(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


# -- numbers: the monitors hand the core exactly what they should --------------------------------


def test_weight_norms_match_the_flattened_parameters(tmp_path):
    monitor = WeightNormMonitor(schedule=[4], components={"first": "net.0.*"})
    model = TinyRegressor()
    trainer = make_trainer(tmp_path, [monitor], max_steps=4)
    trainer.fit(model, loader())
    params = dict(model.named_parameters())
    flat = torch.cat([p.detach().double().flatten() for p in params.values()])
    first = torch.cat([params["net.0.weight"].detach().double().flatten(),
                       params["net.0.bias"].detach().double().flatten()])  # fmt: skip
    (entry,) = monitor.history
    assert entry["weight_norm"] == pytest.approx(float(torch.linalg.vector_norm(flat)), rel=1e-6)
    assert entry["weight_norm/first"] == pytest.approx(float(torch.linalg.vector_norm(first)))


def test_hessian_monitor_reproduces_the_core_estimators(tmp_path):
    monitor = HessianTraceMonitor(schedule=[3], num_probes=8, seed=7)
    model = TinyRegressor()
    trainer = make_trainer(tmp_path, [monitor], max_steps=3)
    trainer.fit(model, loader())
    (entry,) = monitor.history
    (batch,) = monitor._batches
    generator = torch.Generator().manual_seed(derive_seed(7, 3, 0, "hessian"))
    h = hessian_trace(model, TrainingStepLoss(), batch, num_probes=8, generator=generator)
    f = fisher_trace(model, TrainingStepLoss(), batch)
    assert (entry["hessian_trace"], entry["hessian_trace_stderr"]) == (h.value, h.stderr)
    assert (entry["fisher_trace"], entry["fisher_trace_stderr"]) == (f.value, f.stderr)
    # The Fisher oracle: mean squared per-sample gradient norm, one backward per sample.
    model.eval()  # as the estimators evaluate: dropout off
    norms = []
    for x, y in zip(*batch, strict=True):
        loss = nn.functional.mse_loss(model(x[None]), y[None])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        norms.append(sum(float(g.pow(2).sum()) for g in grads))
    assert entry["fisher_trace"] == pytest.approx(sum(norms) / len(norms), rel=1e-5)


def test_bf16_mixed_precision_and_a_partly_frozen_model(tmp_path):
    class PartlyFrozen(TinyRegressor):
        def __init__(self):
            super().__init__()
            self.net[0].requires_grad_(False)

    model = PartlyFrozen()
    frozen = model.net[0].weight.detach().clone()
    monitors = [
        LLCMonitor(config=FAST, schedule=[0, 4], components={"last": "net.3.*"}),
        HessianTraceMonitor(schedule=[0, 4], num_probes=4),
        WeightNormMonitor(schedule=[0, 4]),
    ]
    trainer = make_trainer(tmp_path, monitors, max_steps=4, precision="bf16-mixed")
    fit_quietly(trainer, model, loader())
    assert torch.equal(model.net[0].weight, frozen)
    llc, hessian, norms = (m.history[-1] for m in monitors)
    assert all(math.isfinite(v) for v in (llc["llc"], hessian["hessian_trace"]))
    trainable = torch.cat([p.detach().flatten() for p in model.net[3].parameters()])
    assert norms["weight_norm"] == pytest.approx(float(torch.linalg.vector_norm(trainable)))
    # The chains ran in fp32 on fp32 weights, not in bf16 under the trainer's autocast.
    assert monitors[0].last_result.loss_trace.dtype == torch.float32

    with pytest.raises(ValueError, match=r"the glob 'net\.0\.\*' matches no trainable"):
        trainer = make_trainer(tmp_path, [WeightNormMonitor(components={"f": "net.0.*"})])
        trainer.fit(PartlyFrozen(), loader())


# -- health, hand-off, snapshots ------------------------------------------------------------------


def test_unhealthy_estimates_warn_once_per_step_and_keep_their_status(tmp_path):
    reckless = replace(FAST, step_size=10.0)
    monitor = LLCMonitor(config=reckless, schedule=[0, 2])
    trainer = make_trainer(tmp_path, [monitor], max_steps=2)
    with pytest.warns(UserWarning, match=r"LLCMonitor at step \d: (all_)?diverged: .*Reduce "
                      r"step_size \(now 10\)") as caught:  # fmt: skip
        trainer.fit(TinyRegressor(), loader())
    ours = [w for w in caught if "LLCMonitor at step" in str(w.message)]
    assert [str(w.message).split(":")[0] for w in ours] == [
        "LLCMonitor at step 0", "LLCMonitor at step 2",
    ]  # fmt: skip
    assert {h["status"] for h in monitor.history} <= {"diverged", "all_diverged"}
    rows = csv_rows(trainer)
    assert all(v > 0 for _, v in rows_with(rows, "slt/diag/num_diverged"))
    assert all(v >= 4 for _, v in rows_with(rows, "slt/diag/status_code"))


def test_records_are_handed_to_every_callback_that_wants_them(tmp_path):
    class Listener(Callback):
        def __init__(self):
            self.records = []

        def on_llc_record(self, trainer, pl_module, record):
            self.records.append((trainer.global_step, record))

    listener = Listener()
    monitor = LLCMonitor(config=FAST, schedule=[0, 2, 5], components={"first": "net.0.*"})
    trainer = make_trainer(tmp_path, [monitor, listener], max_steps=5)
    fit_quietly(trainer, TinyRegressor(), loader())
    assert [step for step, _ in listener.records] == [0, 2, 5]
    assert [r.to_dict() for _, r in listener.records] == monitor.history
    first, *rest = (r for _, r in listener.records)
    assert first.loss is None  # no training batch yet at step 0
    assert all(r.loss is not None and r.loss > 0 for r in rest)
    assert all(set(r.components) == {"first"} and r.seconds > 0 for r in rest)


def test_snapshots_let_a_user_recompute_the_estimate(tmp_path):
    snapshots = tmp_path / "snapshots"
    monitor = LLCMonitor(config=FAST, schedule=[0, 3], snapshot_dir=snapshots,
                         datasets={"small": [regression_set(16, seed=1).tensors]})
    trainer = make_trainer(tmp_path, [monitor], max_steps=3)
    fit_quietly(trainer, TinyRegressor(), loader())
    assert sorted(p.name for p in snapshots.iterdir()) == [
        "data-small.pt", "data.pt", "run.pt", "step_00000000.pt", "step_00000003.pt",
    ]  # fmt: skip
    snapshot = torch.load(snapshots / "step_00000003.pt", weights_only=True)
    data = torch.load(snapshots / "data.pt", weights_only=True)
    model = TinyRegressor()
    model.load_state_dict(snapshot["state_dict"])
    again = estimate_llc(model, TrainingStepLoss(), data, seed=snapshot["seed"],
                         config=SGLDConfig.from_dict(snapshot["config"]), on_failure="ignore")
    assert snapshot["step"] == 3
    assert again.llc_mean == monitor.history[-1]["llc"]


def test_config_auto_shows_its_sweep_and_survives_a_checkpoint(tmp_path, monkeypatch):
    """The calibration policy itself (never at step 0, provisional until verified at a
    minimum) is tested in tests/callbacks/test_autocal.py; here: the sweep is kept and drawn
    and the monitor's choice survives a checkpoint."""
    calls = []
    real = calibration_module.calibrate

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(calibration_module, "calibrate", counting)
    options = {"base": FAST, "step_sizes": [1e-5, 1e-4], "num_draws": 10,
               "num_burnin_steps": 5, "num_chains": 2, "num_power_iterations": 0}  # fmt: skip
    monitor = LLCMonitor(config="auto", schedule=[1, 2, 3], calibration=options)
    trainer = make_trainer(tmp_path, [monitor], max_steps=3)
    with warnings.catch_warnings():
        # Mid-training, w* is no minimum: the config stays provisional and says so.
        warnings.filterwarnings("ignore", message="LLCMonitor")
        fit_quietly(trainer, TinyRegressor(), loader())
    assert len(calls) >= 1 and len(monitor.history) == 3
    # The sweep behind the choice is kept and drawn (a PNG next to the CSV logs: no W&B here).
    assert [p.step_size for p in monitor.last_calibration.table][:2] == [1e-5, 1e-4]
    png = tmp_path / "csv" / "version_0" / "slt_calibration.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    state = roundtrip(monitor.state_dict())
    resumed = LLCMonitor(config="auto", calibration=options)
    resumed.load_state_dict(state)
    assert resumed.active_config == monitor.active_config
    assert resumed.history == monitor.history


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dicts_are_plain_and_load_with_weights_only(tmp_path):
    monitors = [
        LLCMonitor(config=FAST, schedule=[0, 2]),
        HessianTraceMonitor(schedule=[0, 2]),
        WeightNormMonitor(schedule=[0, 2]),
    ]
    fit_quietly(make_trainer(tmp_path, monitors, max_steps=2), TinyRegressor(), loader())
    for monitor in monitors:
        state = roundtrip(monitor.state_dict())
        assert state["last_step"] == 2 and len(state["history"]) == 2
        fresh = LLCMonitor(config=FAST) if isinstance(monitor, LLCMonitor) else type(monitor)()
        fresh.load_state_dict(state)
        assert fresh.history == monitor.history
    assert roundtrip(monitors[0].state_dict())["config"] == FAST.to_dict()
    with pytest.warns(UserWarning, match=r"differs from this monitor's .* not comparable"):
        LLCMonitor().load_state_dict(monitors[0].state_dict())


# -- issue #8: no fault of ours stops a training run ----------------------------------------------


class PoisonAt(Callback):
    """Turns one weight NaN after optimizer step ``step``: the run diverged from there on
    (a training loss that turns NaN mid-run). Training itself goes on, with NaN weights."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.net[0].weight[0, 0] = math.nan


def our_warnings(caught, text):
    return [str(w.message) for w in caught if text in str(w.message)]


def test_a_loss_that_turns_nan_mid_run_is_a_failed_step_not_a_dead_run(tmp_path):
    # Before: `ValueError: The loss at the current weights is nan` from LLCMonitor ended fit.
    llc = LLCMonitor(config=FAST, schedule=[0, 3, 5])
    hessian = HessianTraceMonitor(schedule=[0, 3, 5], num_probes=2)
    norms = WeightNormMonitor(schedule=[0, 3, 5])
    trainer = make_trainer(tmp_path, [PoisonAt(2), llc, hessian, norms], max_steps=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyRegressor(), loader())
    assert trainer.global_step == 6  # training went to the end
    assert [h["status"] for h in llc.history][1:] == ["failed", "failed"]
    assert [f["kind"] for f in llc.failures] == ["nonfinite_loss"] * 2
    assert [f["step"] for f in hessian.failures] == [3, 5]
    assert hessian.history[1]["status"] == "failed"
    assert math.isnan(hessian.history[1]["hessian_trace"])
    assert "loss at the current weights is nan" in llc.failures[0]["reason"]
    # Warned once per kind, not once per step.
    assert len(our_warnings(caught, "LLCMonitor: the measurement at step 3 failed")) == 1
    assert our_warnings(caught, "LLCMonitor: the measurement at step 5") == []
    assert len(our_warnings(caught, "HessianTraceMonitor: the measurement at step 3")) == 1
    # Visible in the logger: NaN λ̂, status code 6, a counter of failures per monitor.
    rows = csv_rows(trainer)
    assert rows_with(rows, "slt/failures/llc") == [(3, 1.0), (5, 2.0)]
    assert rows_with(rows, "slt/failures/hessian") == [(3, 1.0), (5, 2.0)]
    assert [v for s, v in rows_with(rows, "slt/diag/status_code") if s > 0] == [6.0, 6.0]
    assert all(math.isnan(v) for s, v in rows_with(rows, "slt/llc") if s > 0)
    # The failures survive a checkpoint.
    resumed = LLCMonitor(config=FAST)
    resumed.load_state_dict(roundtrip(llc.state_dict()))
    assert resumed.failures == llc.failures


def test_on_failure_raise_keeps_the_old_behaviour(tmp_path):
    for monitor, error in [
        (LLCMonitor(config=FAST, schedule=[3], on_failure="raise"), "loss at the current"),
        (HessianTraceMonitor(schedule=[3], on_failure="raise"), "not finite"),
    ]:
        trainer = make_trainer(tmp_path, [PoisonAt(2), monitor], max_steps=6)
        with pytest.raises(ValueError, match=error):
            fit_quietly(trainer, TinyRegressor(), loader())
        assert trainer.global_step == 3
    with pytest.raises(ValueError, match=r"`on_failure` to be 'warn', 'raise' or 'ignore'"):
        WeightNormMonitor(on_failure="skip")


def test_any_runtime_error_inside_a_measurement_is_caught_with_its_reason(tmp_path):
    class Flaky(Callback):
        """Fine for the setup checks, then raises the way an unsupported kernel does."""

        armed = False

        def on_train_batch_start(self, *args):
            self.armed = True

        def __call__(self, model, batch):
            if self.armed:
                raise RuntimeError("derivative for aten::fancy_kernel_backward is not implemented")
            return nn.functional.mse_loss(model(batch[0]), batch[1])

    flaky = Flaky()
    monitor = HessianTraceMonitor(schedule=[2], loss_fn=flaky, on_failure="ignore")
    trainer = make_trainer(tmp_path, [monitor, flaky], max_steps=3)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*measurement at step")  # "ignore": silent
        trainer.fit(TinyRegressor(), loader())
    (failure,) = monitor.failures
    assert failure["kind"] == "no_double_backward" and "fancy_kernel" in failure["reason"]

    class TypeBug(Flaky):
        def __call__(self, model, batch):
            if self.armed:
                raise TypeError("a bug in user code is not swallowed")
            return nn.functional.mse_loss(model(batch[0]), batch[1])

    bug = TypeBug()
    trainer = make_trainer(tmp_path, [HessianTraceMonitor(schedule=[2], loss_fn=bug), bug])
    with pytest.raises(TypeError, match="not swallowed"):
        trainer.fit(TinyRegressor(), loader())


# -- issue #8: schedules fire on the first optimizer step at or after each scheduled step -------


class TwoOptimizers(TinyRegressor):
    """Manual optimization with one optimizer per layer: global_step moves by 2 per batch."""

    def __init__(self):
        super().__init__(dropout=0.0)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        loss = nn.functional.mse_loss(self(batch[0]), batch[1])
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()
            opt.zero_grad()
        return loss

    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.05),
                torch.optim.SGD(self.net[3].parameters(), lr=0.05)]  # fmt: skip


def mse(model, batch):
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def test_manual_optimization_with_two_optimizers_serves_every_scheduled_step(tmp_path):
    # Before: global_step 0, 2, 4, ... never equals 1, 3, 5, so these measured only step 0,
    # and the default log schedule lost its odd steps.
    odd = WeightNormMonitor(schedule=[0, 1, 3, 5])
    default = WeightNormMonitor(prefix="slt/default/")
    llc = LLCMonitor(config=FAST, schedule=[3], loss_fn=mse)
    trainer = make_trainer(tmp_path, [odd, default, llc], max_steps=14)
    fit_quietly(trainer, TwoOptimizers(), loader())
    assert trainer.global_step == 14
    assert [h["step"] for h in odd.history] == [0, 2, 4, 6]
    assert [h["step"] for h in default.history] == [0, 2, 4, 6, 8, 10, 14]  # 1..13 served
    assert [h["step"] for h in llc.history] == [4]
    # The pointer is checkpointed: a resumed monitor does not re-serve step 5.
    resumed = WeightNormMonitor(schedule=[0, 1, 3, 5, 9])
    resumed.load_state_dict(roundtrip(odd.state_dict()))
    assert resumed._next_due is None  # [0, 1, 3, 5] is exhausted
    legacy = {"history": odd.history, "last_step": 4}  # a checkpoint without the pointer
    resumed.load_state_dict(legacy)
    assert resumed._next_due == 5


def test_accumulation_still_measures_once_per_optimizer_step(tmp_path):
    monitor = WeightNormMonitor(schedule=[0, 1, 3])
    trainer = make_trainer(tmp_path, [monitor], max_steps=4, accumulate_grad_batches=3)
    trainer.fit(TinyRegressor(), loader())
    assert [h["step"] for h in monitor.history] == [0, 1, 3]


# -- issue #8: checks before the first step, snapshots, BatchNorm ---------------------------------


def summed_mse(model, batch):
    return nn.functional.mse_loss(model(batch[0]), batch[1], reduction="sum")


def test_a_sum_reduced_loss_is_flagged_before_the_first_step(tmp_path):
    # Before: λ̂ ~ 16x too large (batch size 16), labelled healthy, with no hint.
    counter = StepCounter()

    class Halt(Exception):
        pass

    class Stop(Callback):
        def on_train_start(self, trainer, pl_module):
            raise Halt  # after the monitors' checks, before any step

    monitor = LLCMonitor(config=FAST, schedule=[1000], loss_fn=summed_mse)
    trainer = make_trainer(tmp_path, [monitor, Stop(), counter], max_steps=2000)
    with (
        pytest.warns(UserWarning, match=r"LLCMonitor \(first batch of `data`\): `loss_fn` "
                     r"looks sum-reduced .* add up to 1\.00× .* Use a mean"),
        pytest.raises(Halt),
    ):  # fmt: skip
        trainer.fit(TinyRegressor(), loader())
    assert counter.batches == 0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*sum-reduced")
        trainer = make_trainer(tmp_path, [LLCMonitor(config=FAST, schedule=[0], loss_fn=mse)],
                               max_steps=1)  # fmt: skip
        fit_quietly(trainer, TinyRegressor(), loader())


def test_batch_norm_models_are_told_what_the_mode_does(tmp_path):
    class WithBatchNorm(TinyRegressor):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                     nn.Linear(8, 1))  # fmt: skip

    trainer = make_trainer(tmp_path, [LLCMonitor(config=FAST, schedule=[0])], max_steps=1)
    with pytest.warns(UserWarning, match=r"LLCMonitor: The model has BatchNorm layers \(net\.1\)"
                      r"\. It is evaluated in eval mode: .*running statistics.*-15,000.*"
                      r"SGLDConfig\(train_mode=\.\.\.\)"):  # fmt: skip
        fit_quietly(trainer, WithBatchNorm(), loader())
    config = replace(FAST, train_mode=True)
    trainer = make_trainer(tmp_path, [LLCMonitor(config=config, schedule=[0])], max_steps=1)
    with pytest.warns(UserWarning, match=r"train mode \(SGLDConfig\(train_mode=True\)\)"):
        fit_quietly(trainer, WithBatchNorm(), loader())


def test_snapshots_are_written_atomically(tmp_path, monkeypatch):
    # Before: torch.save wrote straight to step_*.pt, so a kill mid-write left a truncated
    # file that does not load (and an OSError from a full disk ended the run).
    snapshots = tmp_path / "snapshots"
    real_save = torch.save

    def dies_mid_write(obj, f, *args, **kwargs):
        if "step_00000003" in str(f):
            Path(f).write_bytes(b"PK\x03\x04 half a zip")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dies_mid_write)
    monitor = LLCMonitor(config=FAST, schedule=[0, 3, 5], snapshot_dir=snapshots)
    trainer = make_trainer(tmp_path, [monitor], max_steps=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_quietly(trainer, TinyRegressor(), loader())
    assert trainer.global_step == 5
    names = sorted(p.name for p in snapshots.iterdir())
    # nothing half-written
    assert names == ["data.pt", "run.pt", "step_00000000.pt", "step_00000005.pt"]
    for name in names:
        torch.load(snapshots / name, weights_only=True)
    assert [(f["step"], f["kind"]) for f in monitor.failures] == [(3, "io_error")]
    assert our_warnings(caught, "No space left on device")


def test_a_resumed_run_serves_the_same_steps_as_an_uninterrupted_one(tmp_path):
    # The pointer travels in the checkpoint: after a resume at global_step 4 (two optimizers),
    # scheduled step 5 is served at 6, as without the interruption.
    def monitor():
        return WeightNormMonitor(schedule=[0, 1, 3, 5, 9])

    whole = monitor()
    fit_quietly(make_trainer(tmp_path / "whole", [whole], max_steps=12), TwoOptimizers(),
                loader(shuffle=False))  # fmt: skip
    first = monitor()
    trainer = make_trainer(tmp_path / "a", [first], max_steps=4)
    fit_quietly(trainer, TwoOptimizers(), loader(shuffle=False))
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    second = monitor()
    trainer = make_trainer(tmp_path / "b", [second], max_steps=12)
    fit_quietly(trainer, TwoOptimizers(), loader(shuffle=False), ckpt_path=tmp_path / "half.ckpt")
    assert [h["step"] for h in whole.history] == [0, 2, 4, 6, 10]
    assert [h["step"] for h in second.history] == [h["step"] for h in whole.history]
