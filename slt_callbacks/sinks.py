"""Where numbers go: every Lightning logger, plus a few W&B extras.

Our callbacks produce numbers at *their* schedule (an LLC estimate at step 1,000, a Hessian
trace at step 3,162), not at the user's logging cadence. They must not disturb the user's
``LightningModule`` logging: no ``self.log`` (which would feed ``callback_metrics``, the
progress bar, ``EarlyStopping`` and ``ModelCheckpoint``), no ``trainer.log``. A
:class:`MetricSink` therefore talks to ``trainer.loggers`` directly, the way Lightning's
``LearningRateMonitor`` does, and only on global rank zero.

Scalar metrics go to every logger. W&B offers more, and a :class:`MetricSink` uses it when a
:class:`~lightning.pytorch.loggers.WandbLogger` is among the loggers; each extra is a no-op
otherwise:

- :meth:`~MetricSink.log`: scalar metrics, to every logger (``log_metrics``);
- :meth:`~MetricSink.define_metrics`: plot ``slt/*`` against ``trainer/global_step``;
- :meth:`~MetricSink.update_config`: settings into ``run.config``;
- :meth:`~MetricSink.alert`: ``run.alert``, an e-mail or Slack notification;
- :meth:`~MetricSink.log_table`: a ``wandb.Table`` of all rows so far;
- :meth:`~MetricSink.summary_update`: ``run.summary``;
- :meth:`~MetricSink.log_line_series`: several lines in one chart (``wandb.plot.line_series``).

Why the extras are skipped for other loggers rather than mapped onto ``log_hyperparams``:
hyperparameters are a run's *inputs* (TensorBoard's HParams view and MLflow's params compare
runs by them, and MLflow refuses to change a param once set, so a second update would raise);
a summary holds *results*, which already reach every logger as metrics through :meth:`log`.
Tables, charts and alerts have no portable equivalent.

The extras must never crash a training run (W&B may be misconfigured, a run may be offline,
the service may have died): a failing extra is reported once with ``rank_zero_warn`` and
training goes on. ``wandb`` itself is imported only inside the extra that needs it, so this
module works where wandb is not installed.
"""

from __future__ import annotations

import functools
import numbers
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["STEP_METRIC", "AlertLevel", "MetricSink"]

STEP_METRIC = "trainer/global_step"
"""The x-axis ``WandbLogger`` logs with every row: Lightning's ``trainer.global_step``."""

AlertLevel = Literal["INFO", "WARN", "ERROR"]
_ALERT_LEVELS = ("INFO", "WARN", "ERROR")
# W&B documents titles of "less than 64 characters"; longer ones are cut, not refused, so that
# a long component name in a title cannot turn a warning into a crash.
_MAX_TITLE_LEN = 63

_F = TypeVar("_F", bound=Callable[..., None])


def _wandb_extra(method: _F) -> _F:
    """Guard a W&B helper: rank zero only, only with a WandbLogger, and never raising.

    Any exception is reported once per extra and swallowed. Public methods validate their
    arguments *before* calling a guarded ``_do_*`` helper, so that programming errors in a
    callback still raise instead of disappearing into a warning.
    """

    @functools.wraps(method)
    def guarded(self: MetricSink, *args: Any, **kwargs: Any) -> None:
        if not self._active() or not self._wandb_loggers:
            return
        try:
            method(self, *args, **kwargs)
        except Exception as error:  # any W&B failure: report once, keep training
            self._warn_once(method.__name__.removeprefix("_do_"), error)

    return guarded  # type: ignore[return-value]


class MetricSink:
    """Send metrics to every Lightning logger, and W&B extras to a ``WandbLogger``.

    Construct one per callback in ``setup`` with :meth:`from_trainer`. Nothing is written on
    any rank but global rank zero.

    Args:
        loggers: The loggers to write to, usually ``trainer.loggers``.
        is_global_zero: Whether this process writes. ``None`` (default) reads Lightning's
            ``rank_zero_only.rank`` at each call, which the ``Trainer`` sets when it launches
            its processes; :meth:`from_trainer` passes ``trainer.is_global_zero``.
        clock: Seconds on a monotonic clock; the alert throttle measures time with it.

    Example:
        >>> from unittest.mock import MagicMock
        >>> logger = MagicMock(spec=Logger)
        >>> sink = MetricSink([logger], is_global_zero=True)
        >>> sink.log({"slt/llc": torch.tensor(2.5), "slt/llc_std": None}, step=100)
        >>> logger.log_metrics.call_args
        call({'slt/llc': 2.5}, step=100)
    """

    def __init__(
        self,
        loggers: Iterable[Logger],
        *,
        is_global_zero: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._loggers = list(loggers)
        self._wandb_loggers = [lg for lg in self._loggers if isinstance(lg, WandbLogger)]
        self._is_global_zero = is_global_zero
        self._clock = clock
        self._defined_prefixes: set[str] = set()
        self._last_alert: dict[str, float] = {}  # title -> clock() when last sent
        self._tables: dict[str, tuple[list[str], list[list[Any]]]] = {}  # key -> columns, rows
        self._warned: set[str] = set()

    @classmethod
    def from_trainer(cls, trainer: pl.Trainer) -> MetricSink:
        """A sink writing to ``trainer.loggers`` on global rank zero."""
        return cls(trainer.loggers, is_global_zero=trainer.is_global_zero)

    @property
    def has_wandb(self) -> bool:
        """Whether a ``WandbLogger`` receives the W&B extras."""
        return bool(self._wandb_loggers)

    # -- scalar metrics: every logger ----------------------------------------------------

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Send scalar metrics to every logger, as ``logger.log_metrics(metrics, step=step)``.

        One-element tensors and numpy scalars become floats; ``None`` values are dropped (a
        monitor that could not compute a number says so elsewhere, it does not log a fake
        one); NaN is kept, because a NaN estimate is information. Nothing is sent when no
        value is left.

        Args:
            metrics: ``{name: number}``, e.g. ``{"slt/llc": 3.2}``.
            step: The training step, ``trainer.global_step``.

        Raises:
            ValueError: A value is neither a number, a one-element tensor nor ``None``, or
                ``step`` is not a non-negative int.
        """
        if not _is_int(step) or step < 0:
            raise ValueError(f"Expected argument `step` to be a non-negative int but got {step!r}")
        converted = {key: _scalar(key, value) for key, value in metrics.items()}
        scalars = {key: number for key, number in converted.items() if number is not None}
        if not scalars or not self._active():
            return
        for logger in self._loggers:
            logger.log_metrics(scalars, step=int(step))

    # -- W&B extras ----------------------------------------------------------------------

    def define_metrics(self, prefix: str = "slt/") -> None:
        """Plot every ``{prefix}*`` metric against ``trainer/global_step`` in W&B.

        W&B's default x-axis is its own ``_step`` counter, which advances at every
        ``wandb.log`` call, so metrics logged by callbacks at their own schedule would not line
        up with the training step. ``WandbLogger`` already maps ``*`` to
        ``trainer/global_step``; defining the prefix explicitly keeps our metrics on that axis
        even when a user replaces the default. Defined once per prefix.
        """
        if prefix in self._defined_prefixes:
            return
        self._do_define_metrics(prefix)

    @_wandb_extra
    def _do_define_metrics(self, prefix: str) -> None:
        for experiment in self._experiments():
            experiment.define_metric(STEP_METRIC)
            experiment.define_metric(f"{prefix}*", step_metric=STEP_METRIC)
        self._defined_prefixes.add(prefix)

    def update_config(self, config: Mapping[str, Any]) -> None:
        """Record settings (e.g. the SGLD hyperparameters) in the W&B run config.

        LLC values are only comparable at equal ``n_beta``, localization and step size, so a
        monitor records them where the run's dashboard shows them. Values may change (a resumed
        run, a second ``fit``); the last one wins.
        """
        self._do_update_config({key: _plain(value) for key, value in config.items()})

    @_wandb_extra
    def _do_update_config(self, config: dict[str, Any]) -> None:
        for experiment in self._experiments():
            experiment.config.update(config, allow_val_change=True)

    def alert(
        self,
        title: str,
        text: str,
        *,
        level: AlertLevel = "WARN",
        wait_duration_s: float = 300.0,
    ) -> None:
        """Send a W&B alert (e-mail or Slack, as the user's W&B settings say).

        An alert with a given ``title`` is sent at most once per ``wait_duration_s``: W&B
        enforces this on its server through ``wait_duration``, and the sink enforces it here as
        well, because an offline run records every alert and would deliver a flood on
        ``wandb sync``.

        Args:
            title: Short and stable (it is the throttling key); cut to 63 characters.
            text: The message; say what happened, at which step, and what to do about it.
            level: ``"INFO"``, ``"WARN"`` or ``"ERROR"``.
            wait_duration_s: Minimum seconds between two alerts with this title.

        Raises:
            ValueError: ``level`` or ``wait_duration_s`` is invalid.
        """
        if level not in _ALERT_LEVELS:
            raise ValueError(
                f"Expected argument `level` to be one of {_ALERT_LEVELS} but got {level!r}"
            )
        if not isinstance(wait_duration_s, numbers.Real) or not wait_duration_s > 0:
            raise ValueError(
                "Expected argument `wait_duration_s` to be a positive number of seconds but got"
                f" {wait_duration_s!r}"
            )
        title = title[:_MAX_TITLE_LEN]
        now = self._clock()
        last = self._last_alert.get(title)
        if last is not None and now - last < wait_duration_s:
            return
        self._do_alert(title, text, level, float(wait_duration_s), now)

    @_wandb_extra
    def _do_alert(self, title: str, text: str, level: str, wait_s: float, now: float) -> None:
        for experiment in self._experiments():
            experiment.alert(title=title, text=text, level=level, wait_duration=wait_s)
        self._last_alert[title] = now

    def log_table(
        self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int
    ) -> None:
        """Append ``rows`` to the W&B table ``key`` and log the whole table.

        A ``wandb.Table`` is logged as an immutable snapshot, so the sink keeps every row
        logged so far and logs all of them each time; the latest snapshot in the run is the
        complete table (e.g. one row per detected stage).

        Args:
            key: The table's name, e.g. ``"slt/stages"``.
            columns: Column names; the same for every call with this ``key``.
            rows: New rows, each with one value per column.
            step: The training step.

        Raises:
            ValueError: ``columns`` differ from an earlier call, or a row has the wrong length.
        """
        columns = list(columns)
        known = self._tables.get(key)
        if known is not None and known[0] != columns:
            raise ValueError(
                f"Expected argument `columns` of table {key!r} to stay {known[0]} but got {columns}"
            )
        new_rows = [[_plain(value) for value in row] for row in rows]
        for row in new_rows:
            if len(row) != len(columns):
                raise ValueError(
                    f"Expected each row of table {key!r} to have {len(columns)} values"
                    f" ({columns}) but got {row!r}"
                )
        if not self._active() or not self._wandb_loggers:
            return  # keep no rows that nobody will see
        all_rows = self._tables.setdefault(key, (columns, []))[1]
        all_rows.extend(new_rows)
        self._do_log_table(key, columns, all_rows, step)

    @_wandb_extra
    def _do_log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        for logger in self._wandb_loggers:
            # WandbLogger.log_table builds the wandb.Table and adds `trainer/global_step`.
            logger.log_table(key, columns=columns, data=[list(row) for row in rows], step=step)

    def summary_update(self, values: Mapping[str, Any]) -> None:
        """Write ``values`` to the W&B run summary (the numbers shown in the runs table).

        W&B's summary of a metric defaults to its last logged value; use this for results
        that are not a metric's last value, e.g. the number of stages detected.
        """
        self._do_summary_update({key: _plain(value) for key, value in values.items()})

    @_wandb_extra
    def _do_summary_update(self, values: dict[str, Any]) -> None:
        for experiment in self._experiments():
            experiment.summary.update(values)

    def log_line_series(
        self,
        key: str,
        xs: Sequence[float],
        ys_by_name: Mapping[str, Sequence[float]],
        title: str = "",
        *,
        step: int | None = None,
        xname: str = "step",
    ) -> None:
        """Log several lines in one W&B chart, e.g. the LLC of each attention head.

        Args:
            key: The chart's name, e.g. ``"slt/llc_by_component"``.
            xs: The shared x values (usually training steps).
            ys_by_name: ``{line name: y values}``, each as long as ``xs``.
            title: The chart's title.
            step: The training step this chart belongs to (``None``: W&B's own counter).
            xname: The x-axis label.

        Raises:
            ValueError: A line's length differs from ``xs``.
        """
        xs = [_plain(x) for x in xs]
        ys = {name: [_plain(y) for y in values] for name, values in ys_by_name.items()}
        for name, values in ys.items():
            if len(values) != len(xs):
                raise ValueError(
                    f"Expected line {name!r} of {key!r} to have {len(xs)} values (one per x)"
                    f" but got {len(values)}"
                )
        self._do_log_line_series(key, xs, ys, title, step, xname)

    @_wandb_extra
    def _do_log_line_series(
        self,
        key: str,
        xs: list[Any],
        ys: dict[str, list[Any]],
        title: str,
        step: int | None,
        xname: str,
    ) -> None:
        import wandb  # only here: this module must import without wandb

        chart = wandb.plot.line_series(
            xs=xs, ys=list(ys.values()), keys=list(ys), title=title, xname=xname
        )
        for logger in self._wandb_loggers:
            logger.log_metrics({key: chart}, step=step)

    def log_image(self, key: str, figure: Any, step: int) -> None:
        """Log a matplotlib figure (or anything ``wandb.Image`` takes) as a W&B image."""
        self._do_log_image(key, figure, step)

    @_wandb_extra
    def _do_log_image(self, key: str, figure: Any, step: int) -> None:
        for logger in self._wandb_loggers:
            logger.log_image(key, images=[figure], step=step)

    # -- checkpointing -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The accumulated table rows, so that a resumed run logs complete tables."""
        return {"tables": {key: [cols, rows] for key, (cols, rows) in self._tables.items()}}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._tables = {
            key: (list(cols), [list(row) for row in rows])
            for key, (cols, rows) in state_dict["tables"].items()
        }

    # -- internals -----------------------------------------------------------------------

    def _active(self) -> bool:
        if self._is_global_zero is not None:
            return self._is_global_zero
        return getattr(rank_zero_only, "rank", 0) == 0

    def _experiments(self) -> list[Any]:
        return [logger.experiment for logger in self._wandb_loggers]

    def _warn_once(self, extra: str, error: Exception) -> None:
        if extra in self._warned:
            return
        self._warned.add(extra)
        rank_zero_warn(
            f"`MetricSink.{extra}` failed with {type(error).__name__}: {error}. Training goes on;"
            f" further failures of `{extra}` are not reported."
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _scalar(key: str, value: Any) -> float | None:
    """``value`` as a float for a logger, or ``None`` to drop it."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"Expected metric {key!r} to be a one-element tensor but got shape"
                f" {tuple(value.shape)}"
            )
        return float(value.item())
    if isinstance(value, numbers.Real):  # int, float, bool, numpy scalars
        return float(value)
    raise ValueError(
        f"Expected metric {key!r} to be a number, a one-element tensor or None but got"
        f" {type(value).__name__}: {value!r}"
    )


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars as Python numbers, for W&B's JSON; anything else as is."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, numbers.Integral) and not isinstance(value, (int, bool)):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (int, float)):
        return float(value)
    return value
