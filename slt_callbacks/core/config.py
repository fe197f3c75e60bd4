"""The SGLD hyperparameters of an LLC estimate, as one frozen, validated object."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch

from .._checks import check_int, check_number, check_optional_int

Backend = Literal["auto", "vmap", "loop"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
"""Sampling dtypes by name (names, not ``torch.dtype``, so the config fits a YAML file)."""

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
"""Reduced-precision matmul dtypes for ``autocast`` (master weights stay in ``dtype``)."""

DEFAULT_MAX_BATCHES = 128
"""Batches drawn into the pool when ``num_batches`` is None (one pass over ``data``, capped)."""

MIN_SCALE = 1e-30
"""Smallest scale a term of the SGLD step may have (see :data:`MAX_SCALE`)."""

MAX_SCALE = 1e30
"""Largest scale a term of the SGLD step may have.

The step is -(ε/2)·(nβ·∇L + γ·(w − w*)) + σ·√ε·ξ, computed in float32 by default.
float32's normal numbers span about 1.2e-38 to 3.4e38. The factors ε, ε·nβ, ε·γ and σ·√ε
multiply gradients, distances and noise of order 1 (up to ~1e8 for large models or
losses), so keeping each factor inside [1e-30, 1e30] leaves that much room on both sides
before the product overflows to inf or underflows to 0 (``noise_level=1e-170`` gives noise
that is exactly 0 in float32: no sampling at all, silently). Values outside are rejected
with the fields named; nothing a real experiment needs lies outside.
"""


@dataclass(frozen=True, kw_only=True)
class SGLDConfig:
    r"""Hyperparameters of the SGLD chains behind one LLC estimate.

    The chains sample the localized tempered posterior
    :math:`p(w) \propto \exp(-n\beta L_n(w) - \tfrac{\gamma}{2}\lVert w - w^*\rVert^2)` with

    .. math::

        \Delta w = -\tfrac{\epsilon}{2}\bigl(n\beta\,\nabla L_m(w) + \gamma (w - w^*)\bigr)
                   + \sigma\sqrt{\epsilon}\,\xi,\qquad \xi \sim N(0, I)

    and :math:`\hat\lambda = n\beta\,(\mathbb{E}_w[L_m(w)] - L_n(w^*))` (Lau et al. 2023,
    "The Local Learning Coefficient: A Singularity-Aware Complexity Measure").

    LLC values are only comparable at equal ``step_size``, ``n_beta`` and ``localization``:
    keep one config for every checkpoint of a run.

    Args:
        step_size: ε. Too large biases λ̂ upward and eventually diverges; too small and the
            chains do not mix within ``num_burnin_steps``. Rule of thumb: keep
            ε·nβ·(top Hessian eigenvalue) below 0.1, or use :func:`~slt_callbacks.calibrate`.
            The default 1e-3 is chosen for training runs of real networks: with γ = 100 the
            pull relaxes in ~1/(εγ) = 10 steps, well inside the 100 burn-in steps (at 1e-4 it
            takes 100, and λ̂ then halves when ε is halved); on the test zoo of transformers
            and CNNs (16 batches, default nβ) acceptance was 0.71–0.76 and more, and halving
            ε moved λ̂ by about one standard error (``benchmarks/results/
            calibration_cpu.md``). For closed-form checks at large nβ it is far too large
            (ε·nβ·λ_max ≫ 1): calibrate there.
        n_beta: nβ, inverse temperature times sample size (they only ever appear as a
            product). ``None``: Watanabe's WBIC temperature n/log n, with n the number of
            samples in the batch pool (``num_batches`` × batch size).
        localization: γ, the strength of the pull back to w*. Larger values keep chains near
            w* when w* is not a minimum (during training) but bias λ̂ low at singular points;
            use 1 for comparisons with closed-form coefficients (or let
            :func:`~slt_callbacks.calibrate` choose it). The default 100 holds the chains of
            a network in training, which sits near saddles; γ = 300 cut acceptance on the
            zoo transformers to 0.5–0.65 at the same ε.
        num_chains: independent chains; λ̂ is reported as their mean and std.
        num_draws: SGLD steps after burn-in whose losses enter the average.
        num_burnin_steps: SGLD steps before the draws, discarded.
        noise_level: σ, a multiplier on the injected noise (1 is the correct Langevin noise;
            other values sample a different temperature and are for experiments only).
        max_grad_norm: if set, each chain's minibatch gradient is clipped to this L2 norm
            before scaling by nβ; a guard against rare exploding steps (biases λ̂ if it bites
            often; ``result.diagnostics`` counts how often it did).
        dtype: ``"float32"``, ``"float64"`` or None (the model's dtype; half precision is
            sampled in float32).
        autocast: ``"bfloat16"`` or ``"float16"`` runs the chains' forward and backward passes
            (and the loss at w*) under :func:`torch.autocast` with that dtype, keeping the
            chains' weights and the update in ``dtype``. Faster where the hardware has
            reduced-precision matrix units; check on your model that λ̂ is unchanged
            (``benchmarks/speed.py`` does so for an MLP). None: full precision.
        num_batches: batches drawn from ``data`` into the pool the chains sample from.
            None: one pass over ``data``, at most 128 batches. The pool defines L_n.
        backend: ``"vmap"`` (all chains in one batched forward/backward), ``"loop"`` (one
            forward per chain; for models vmap cannot handle), or ``"auto"``: on a CPU the
            fast path for ``nn.Sequential`` stacks of ``nn.Linear`` where it applies, else
            loop for a model whose loss costs at least 2e7 FLOPs on one batch (where
            batching stops paying on a CPU) and vmap below; on a GPU vmap. vmap falls back
            to loop with a logged reason.
        train_mode: sample with the model in train mode (dropout on, BatchNorm on batch
            statistics). Default eval, as the estimator assumes a fixed function of w.
        max_memory: bytes the chains may use beyond the model and the data, or ``"auto"``
            (80% of the memory free on the model's device). Chains are then advanced in
            chunks that fit; the numbers are the same as unchunked at the same seed (except
            for a loss that draws random numbers itself, dropout in ``train_mode``).
            None (default): every component's chains at once.
    """

    step_size: float = 1e-3
    n_beta: float | None = None
    localization: float = 100.0
    num_chains: int = 4
    num_draws: int = 200
    num_burnin_steps: int = 100
    noise_level: float = 1.0
    max_grad_norm: float | None = None
    dtype: str | None = None
    autocast: str | None = None
    num_batches: int | None = None
    backend: Backend = "auto"
    train_mode: bool = False
    # -- chains (issue #10): memory budget ---------------------------------------------
    max_memory: int | str | None = None
    # -- end chains ----------------------------------------------------------------------

    def __post_init__(self) -> None:
        # Stored back through the checks: numpy scalars become plain numbers, which
        # checkpoints loaded with weights_only=True require.
        def store(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        # Names first: `dtype=[]` must say `dtype`, not fail inside a dict lookup.
        for name in ("dtype", "autocast", "backend"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(
                    f"Expected argument `{name}` to be a string or None but got "
                    f"{type(value).__name__} {value!r}."
                )

        store("step_size", check_number("step_size", self.step_size, strict=True))
        if self.n_beta is not None:
            store("n_beta", check_number("n_beta", self.n_beta, strict=True))
        store("localization", check_number("localization", self.localization))
        store("num_chains", check_int("num_chains", self.num_chains))
        store("num_draws", check_int("num_draws", self.num_draws, minimum=2))
        store("num_burnin_steps", check_int("num_burnin_steps", self.num_burnin_steps, minimum=0))
        store("noise_level", check_number("noise_level", self.noise_level, strict=True))
        if self.max_grad_norm is not None:
            store("max_grad_norm", check_number("max_grad_norm", self.max_grad_norm, strict=True))
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(
                f"Expected argument `dtype` to be one of {sorted(DTYPES)} or None but got "
                f"{self.dtype!r}."
            )
        if self.autocast is not None and self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(
                f"Expected argument `autocast` to be one of {sorted(AUTOCAST_DTYPES)} or None "
                f"but got {self.autocast!r}."
            )
        store("num_batches", check_optional_int("num_batches", self.num_batches))
        if self.backend not in ("auto", "vmap", "loop"):
            raise ValueError(
                "Expected argument `backend` to be 'auto', 'vmap' or 'loop' but got "
                f"{self.backend!r}."
            )
        if not isinstance(self.train_mode, bool):
            raise ValueError(
                f"Expected argument `train_mode` to be a bool but got {self.train_mode!r}."
            )
        # -- chains (issue #10): memory budget -----------------------------------------
        if not (self.max_memory is None or (isinstance(self.max_memory, str)
                and self.max_memory == "auto")):
            try:
                store("max_memory", check_int("max_memory", self.max_memory))
            except ValueError:
                raise ValueError(
                    "Expected argument `max_memory` to be a number of bytes (a positive int), "
                    f"'auto' or None but got {self.max_memory!r}."
                ) from None
        # -- end chains ------------------------------------------------------------------
        self._check_step_scales()

    def _check_step_scales(self) -> None:
        """Every factor of the SGLD step within [MIN_SCALE, MAX_SCALE] (see there for why);
        the error names each field involved."""
        eps = self.step_size
        terms = [
            ("step_size", "step_size", eps, True),
            ("step_size, noise_level", "sqrt(step_size) * noise_level (the noise scale)",
             math.sqrt(eps) * self.noise_level, True),
            ("step_size, localization", "step_size * localization (the pull to w*)",
             eps * self.localization, self.localization > 0),
        ]  # fmt: skip
        if self.n_beta is not None:
            terms.append(("step_size, n_beta", "step_size * n_beta (the gradient scale)",
                          eps * self.n_beta, True))  # fmt: skip
        if self.max_grad_norm is not None:
            terms.append(("max_grad_norm", "max_grad_norm", self.max_grad_norm, True))
        for fields_, what, value, has_floor in terms:
            low = has_floor and not value >= MIN_SCALE
            if low or not value <= MAX_SCALE:
                values = ", ".join(f"{f.strip()}={getattr(self, f.strip())!r}"
                                   for f in fields_.split(","))  # fmt: skip
                expected = (
                    f"argument `{fields_}` to be" if fields_ == what
                    else f"SGLDConfig fields `{fields_}` to give {what}"
                )  # fmt: skip
                raise ValueError(
                    f"Expected {expected} in [{MIN_SCALE:g}, {MAX_SCALE:g}] but got "
                    f"{value:.3g} ({values}): outside that range the SGLD step overflows to "
                    "inf or underflows to 0 in float32."
                )

    @property
    def num_steps(self) -> int:
        """Total SGLD steps per chain (burn-in plus draws)."""
        return self.num_burnin_steps + self.num_draws

    def resolved_n_beta(self, num_samples: int) -> float:
        """nβ, with the default n/log n for a pool of ``num_samples`` samples."""
        if self.n_beta is not None:
            return float(self.n_beta)
        if num_samples < 2:
            raise ValueError(
                "Cannot derive the default n_beta = n/log n from a pool of "
                f"{num_samples} sample(s); pass `n_beta` explicitly."
            )
        return num_samples / math.log(num_samples)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for a logger's hyperparameters or a checkpoint."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SGLDConfig:
        """Inverse of :meth:`to_dict`; unknown keys are rejected with their names."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown SGLDConfig field(s) {unknown}; known: {sorted(known)}.")
        return cls(**values)
