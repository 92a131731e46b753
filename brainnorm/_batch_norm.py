"""Batch normalization layers (BatchNorm0d/1d/2d/3d)."""

from __future__ import annotations

import brainstate

from ._base import _affine_values, _Normalization, _pick, _RunningStatistics
from ._states import NormalizationParamState

__all__ = ["BatchNorm0d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class _BatchNorm(_RunningStatistics, _Normalization):
    num_spatial_dims: int

    def __init__(
        self,
        in_size,
        feature_axis=-1,
        *,
        track_running_stats: bool = True,
        epsilon=1e-5,
        momentum=0.99,
        affine: bool = True,
        use_scale=None,
        use_bias=None,
        bias_initializer=None,
        scale_initializer=None,
        bias_init=None,
        scale_init=None,
        axis_name=None,
        axis_index_groups=None,
        use_fast_variance: bool = False,
        unbiased_running_var: bool = False,
        use_running_average=None,
        name=None,
        dtype=None,
        param_dtype=None,
        param_type=NormalizationParamState,
        mean_type=brainstate.ShortTermState,
        unit=None,
    ):
        super().__init__(in_size, name=name)
        owner = self._owner
        expected_rank = self.num_spatial_dims + 1
        if len(self.in_size) != expected_rank:
            raise ValueError(
                f"{owner}: in_size must have {expected_rank} entries (spatial dims and channels), "
                f"got {self.in_size}."
            )
        self.affine = bool(affine)
        self._setup_statistics(
            feature_axis=feature_axis, epsilon=epsilon, momentum=momentum,
            use_scale=self.affine if use_scale is None else use_scale,
            use_bias=self.affine if use_bias is None else use_bias,
            scale_init=_pick(owner, "scale_initializer", scale_initializer, "scale_init", scale_init,
                             brainstate.nn.init.Constant(1.0)),
            bias_init=_pick(owner, "bias_initializer", bias_initializer, "bias_init", bias_init,
                            brainstate.nn.init.Constant(0.0)),
            track_running_stats=track_running_stats, unbiased_running_var=unbiased_running_var,
            use_running_average=use_running_average, axis_name=axis_name, axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance, dtype=dtype, param_dtype=param_dtype, param_type=param_type,
            mean_type=mean_type, unit=unit,
        )

    def update(self, x, mask=None, *, use_running_average=None):
        """Normalize ``x`` of shape ``(*batch, *in_size)``.

        Parameters
        ----------
        x : array_like or Quantity
            Any number of leading batch axes (zero included).
        mask : array_like of bool, optional
            Valid positions, broadcastable to ``x``.
        use_running_average : bool, optional
            Overrides the constructor's choice and ``environ['fit']``.

        Returns
        -------
        Array
            Same shape as ``x``.
        """
        x_m, unit, mask, n_batch = self._prepare_input(x, mask)
        training = self._is_training(use_running_average)
        scale, bias = _affine_values(self.weight)
        running = None
        if self.track_running_stats:
            self._stats_unit(x_m, unit)  # clear errors for units that do not fit, before anything runs
            running = (self.running_mean.value, self.running_var.value)
        y, new_mean, new_var = self._batch_norm(
            x_m, unit, mask, self._x_axes(self.feature_axes, x_m.ndim), training, scale, bias, running
        )
        if running is not None and training:
            self.running_mean.value = new_mean
            self.running_var.value = new_var
            self.num_batches_tracked.value = self.num_batches_tracked.value + 1
        return y


_BATCH_NORM_DOC = r"""{rank} batch normalization (Ioffe and Szegedy, 2015).

    .. math::

        y = \frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}}\gamma + \beta

    Statistics per channel over every batch axis and every non-feature axis of
    ``in_size``. In training the running statistics are updated as
    ``running = momentum * running + (1 - momentum) * batch`` (brainstate and
    flax convention; PyTorch's ``momentum`` is ``1 - momentum`` here). The
    mode is chosen per call: ``update(use_running_average=...)``, then the
    constructor's ``use_running_average``, then ``brainstate.environ`` key
    ``fit`` (True: training), else training.

    Parameters
    ----------
    in_size : int or sequence of int
        Per-sample shape without batch axes, {in_rank} entries ({layout}).
    feature_axis : int or sequence of int
        Channel axis counted within ``in_size`` (``0``: channels first).
    track_running_stats : bool
        Keep running statistics. False: batch statistics in training and eval.
    epsilon : float
        Added to the variance. Default 1e-5.
    momentum : float or None
        Weight of the old running value, in [0, 1]. None: cumulative average of
        every batch seen (PyTorch ``momentum=None``), counted by
        ``num_batches_tracked``.
    affine : bool
        Learn ``scale`` and ``bias`` (brainstate keyword); ``use_scale`` and
        ``use_bias`` override it per parameter.
    scale_initializer, bias_initializer : callable or array
        Initial scale (default 1) and bias (default 0); ``scale_init`` and
        ``bias_init`` are accepted as flax-style aliases.
    axis_name, axis_index_groups : optional
        Mapped axis (``vmap``/``pmap``/``shard_map``) to compute statistics
        over as well, exactly (sums and valid counts are combined).
    use_fast_variance : bool
        One-pass variance (flax parity); default False (robust shifted
        two-pass).
    unbiased_running_var : bool
        Update the running variance with the unbiased ``n / (n - 1)`` batch
        variance (PyTorch). Normalization always uses the biased one.
    use_running_average : bool, optional
        Fixed mode (True: evaluation).
    dtype : dtype, optional
        Output dtype (default: the input's floating dtype).
    param_dtype : dtype, optional
        Dtype of parameters and running statistics (default
        ``brainstate.environ.dftype()``).
    param_type : type
        State class of the parameters (``self.weight``, a dict with
        ``'scale'`` and ``'bias'``).
    mean_type : type
        State class of the running statistics (a ``ShortTermState`` by
        default; must not be a ``ParamState``).
    unit : brainunit.Unit, optional
        Unit of the running mean (the variance gets its square), for layers
        that first see Quantities inside ``jit``. Without it, the first eager
        training call with a Quantity input sets the unit.
    name : str, optional

    Attributes
    ----------
    weight : NormalizationParamState or None
    running_mean, running_var : brainstate.ShortTermState
        Shape of ``in_size`` with 1 at non-feature axes; Quantities once the
        layer has a unit (input in a compatible unit is converted to it, so
        the same data in V and mV normalize identically; an incompatible or
        missing unit raises and writes nothing).
    num_batches_tracked : brainstate.ShortTermState
        Number of training steps taken.

    Raises
    ------
    ValueError
        Wrong ``in_size`` rank, axes out of range, bad epsilon or momentum;
        at call time, input whose trailing shape is not ``in_size``, or a mask
        that does not broadcast.
    TypeError
        Floating mask.

    References
    ----------
    Ioffe, Szegedy. Batch Normalization: Accelerating Deep Network Training by
    Reducing Internal Covariate Shift. ICML 2015.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, brainnorm
    >>> bn = brainnorm.{name}({example_size})
    >>> x = jnp.arange(2 * {example_numel}, dtype=jnp.float32).reshape((2,) + bn.in_size)
    >>> with brainstate.environ.context(fit=True):
    ...     y = bn(x)
    >>> y.shape == x.shape, int(bn.num_batches_tracked.value)
    (True, 1)
    """


def _make(name, dims, layout, example_size, example_numel):
    cls = type(name, (_BatchNorm,), {"num_spatial_dims": dims, "__module__": __name__})
    cls.__doc__ = _BATCH_NORM_DOC.format(
        rank=f"{dims}-D" if dims else "0-D (feature vector)", in_rank=dims + 1, layout=layout, name=name,
        example_size=example_size, example_numel=example_numel,
    )
    return cls


BatchNorm0d = _make("BatchNorm0d", 0, "``(C,)``", "3", 3)
BatchNorm1d = _make("BatchNorm1d", 1, "``(L, C)`` channels last", "(4, 3)", 12)
BatchNorm2d = _make("BatchNorm2d", 2, "``(H, W, C)`` channels last", "(2, 2, 3)", 12)
BatchNorm3d = _make("BatchNorm3d", 3, "``(D, H, W, C)`` channels last", "(2, 2, 2, 3)", 24)
