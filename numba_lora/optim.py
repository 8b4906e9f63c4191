"""Optimizers over the LoRA factors of layers and adapters: AdamW, SGD, and gradient clipping.

Shaped like ``torch.optim``: an optimizer takes what to train (a
:class:`~numba_lora.LoraLinear`, a :class:`~numba_lora.LoraAdapter`, a list of
them, or a list of parameter-group dicts), keeps per-tensor state, and has
``step()``, ``zero_grad()``, ``state_dict()`` and ``load_state_dict()``.  Each
layer contributes two tensors, ``lora_A`` then ``lora_B``, in that order;
tensors are numbered across groups in order, as torch numbers parameters.

The arithmetic of one tensor's update is one kernel call
(:func:`numba_lora.kernels.train.adamw_step`,
:func:`~numba_lora.kernels.train.sgd_step`), made under the layer's write lock
so that no forward sees a half-updated factor.  A is updated in place inside
the layer's stacked ``[W; A]`` buffer (never rebound).

Example
-------
>>> import numpy as np
>>> from numba_lora import LoraLinear
>>> from numba_lora.optim import AdamW
>>> layer = LoraLinear(np.eye(4), rank=2, alpha=4.0, seed=0)
>>> opt = AdamW(layer, lr=1e-2)
>>> Y, ctx = layer.forward_train(np.ones((3, 4)))
>>> _ = layer.backward(Y - 1.0, ctx)
>>> opt.step()
>>> opt.zero_grad()
"""

from __future__ import annotations

import abc
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any, Union

import numpy as np

from .adapter import LoraAdapter
from .errors import LoraConfigError, LoraNonFiniteError, LoraShapeError, LoraStateError, \
    LoraTypeError
from .kernels import train as train_kernels
from .layer import LoraLinear

__all__ = ["AdamW", "SGD", "clip_grad_norm"]

#: What an optimizer takes: a layer, an adapter, an iterable of those, or param groups
#: (dicts with "params" and per-group hyperparameters).
ParamsLike = Union[LoraLinear, LoraAdapter, Iterable[Union[LoraLinear, LoraAdapter]],
                   Sequence[dict[str, Any]]]

_FACTORS = ("lora_A", "lora_B")


def _layers_of(params, what="params"):
    """The layers of a layer, an adapter, or an iterable of those, in order."""
    if isinstance(params, LoraLinear):
        return [params]
    if isinstance(params, LoraAdapter):
        return params.layers()
    if isinstance(params, (str, bytes, dict)) or not hasattr(params, "__iter__"):
        raise LoraTypeError(
            f"{what} must be a LoraLinear, a LoraAdapter or an iterable of them, got "
            f"{type(params).__name__}")
    layers = []
    for item in params:
        if isinstance(item, LoraLinear):
            layers.append(item)
        elif isinstance(item, LoraAdapter):
            layers.extend(item.layers())
        else:
            raise LoraTypeError(
                f"{what} must hold LoraLinear layers or LoraAdapters, got {type(item).__name__}")
    return layers


def _real(value, what, low=None, high=None, low_open=False, high_open=True):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise LoraConfigError(f"{what} must be a real number, got {type(value).__name__} {value!r}")
    out = float(value)
    ok = math.isfinite(out)
    if ok and low is not None:
        ok = out > low if low_open else out >= low
    if ok and high is not None:
        ok = out < high if high_open else out <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}, "
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        where = f" in {lo}{hi or 'inf)'}" if lo else ""
        raise LoraConfigError(f"{what} must be finite{where}, got {out!r}")
    return out


class _Optimizer(abc.ABC):
    """What AdamW and SGD share: groups, tensors, per-tensor state, (de)serialisation."""

    _HYPER = ()        # names of a group's hyperparameters, besides "params"
    _STATE_ARRAYS = ()  # names of per-tensor state arrays

    def __init__(self, params, defaults):
        self.defaults = dict(defaults)
        groups = list(params) if isinstance(params, (list, tuple)) and params and all(
            isinstance(g, dict) for g in params) else [{"params": params}]
        self.param_groups = []
        seen = set()
        for i, group in enumerate(groups):
            unknown = set(group) - set(self._HYPER) - {"params"}
            if unknown:
                raise LoraConfigError(
                    f"param group {i} has unknown keys {sorted(unknown)}; known: "
                    f"{['params', *self._HYPER]}")
            if "params" not in group:
                raise LoraConfigError(f"param group {i} has no 'params'")
            layers = _layers_of(group["params"], f"param group {i}'s params")
            for layer in layers:
                if id(layer) in seen:
                    raise LoraConfigError("a layer appears twice in the optimizer's params")
                seen.add(id(layer))
            full = dict(self.defaults)
            full.update({k: v for k, v in group.items() if k != "params"})
            full["params"] = layers
            self._check_group(full, i)
            self.param_groups.append(full)
        if not seen:
            raise LoraConfigError("optimizer got an empty list of layers")
        # state[k] for tensor number k: {"step": int, <array name>: ndarray}.
        self.state = {}

    # ------------------------------------------------------------ structure
    def _tensors(self):
        """(k, group, layer, factor index) for every tensor, numbered in order."""
        k = 0
        for group in self.param_groups:
            for layer in group["params"]:
                for f in range(2):
                    yield k, group, layer, f
                    k += 1

    @abc.abstractmethod
    def _check_group(self, group, i):
        """Refuse a parameter group whose settings are out of range (each optimizer's own)."""

    def _check_all(self):
        for i, group in enumerate(self.param_groups):
            self._check_group(group, i)
        for group in self.param_groups:
            for layer in group["params"]:
                if layer.is_merged:
                    raise LoraStateError(
                        "cannot update a merged layer's factors (W holds the old update); "
                        "unmerge() it before training")

    # ----------------------------------------------------------------- step
    def zero_grad(self) -> None:
        """:meth:`LoraLinear.zero_grad` on every layer (nothing is written)."""
        for group in self.param_groups:
            for layer in group["params"]:
                layer.zero_grad()

    def step(self) -> None:
        """Update every factor that has a gradient (one kernel call per tensor).

        Factors without a gradient (no backward since the last
        ``zero_grad``, as a disabled layer) are skipped and their step
        counts do not advance, as torch skips parameters whose ``grad`` is
        None.

        Raises
        ------
        LoraConfigError
            If a group's hyperparameter is out of range (NaN lr, ...).
        LoraStateError
            If a layer is merged.

        Either error is raised before any factor or state is touched.
        """
        self._check_all()
        for k, group, layer, f in self._tensors():
            with layer._lock.write():
                param, grad = layer._factors_for_update()[f]
                if grad is None:
                    continue
                state = self.state.get(k)
                if state is None:
                    state = self.state[k] = self._new_state(param)
                self._update(param, grad, state, group, f)
                layer._version += 1

    def _new_state(self, param):
        state = {"step": 0}
        for name in self._STATE_ARRAYS:
            state[name] = np.zeros_like(param)
        return state

    # ---------------------------------------------------------- state dicts
    def state_dict(self) -> dict:
        """The optimizer's state as plain Python and NumPy values (copies).

        ``{"state": {k: {"step": int, <array>: ndarray, ...}}, "param_groups":
        [{<hyperparameters>, "params": [k, ...]}]}``, tensors numbered as in
        torch (group by group, layer by layer, ``lora_A`` before ``lora_B``).
        Loading it into an optimizer over the same layers and resuming gives
        the same bits as an uninterrupted run.
        """
        groups = []
        k = 0
        for group in self.param_groups:
            n = 2 * len(group["params"])
            entry = {key: value for key, value in group.items() if key != "params"}
            entry["params"] = list(range(k, k + n))
            groups.append(entry)
            k += n
        state = {}
        for key, entry in self.state.items():
            state[key] = {name: (value.copy() if isinstance(value, np.ndarray) else value)
                          for name, value in entry.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what :meth:`state_dict` returned (for the same structure of layers).

        Everything is checked first (group and tensor counts, every array's
        shape and dtype against the layer's factor); a refusal leaves the
        optimizer as it was.

        Raises
        ------
        LoraConfigError
            If the structure, a hyperparameter or a step count does not fit.
        LoraShapeError
            If a state array's shape or dtype does not fit its tensor.
        """
        if not isinstance(state_dict, dict) or set(state_dict) != {"state", "param_groups"}:
            raise LoraConfigError("state_dict must be a dict with 'state' and 'param_groups'")
        groups = state_dict["param_groups"]
        if not isinstance(groups, (list, tuple)) or len(groups) != len(self.param_groups):
            raise LoraConfigError(
                f"state_dict has {len(groups) if isinstance(groups, (list, tuple)) else '?'} "
                f"param groups, this optimizer {len(self.param_groups)}")
        tensors = list(self._tensors())
        new_groups = []
        k = 0
        for i, (mine, theirs) in enumerate(zip(self.param_groups, groups)):
            n = 2 * len(mine["params"])
            if not isinstance(theirs, dict) or list(theirs.get("params", ())) != list(
                    range(k, k + n)):
                raise LoraConfigError(f"param group {i} of the state_dict does not hold the "
                                      f"same tensors ({n} from number {k})")
            group = {key: theirs[key] for key in self._HYPER if key in theirs}
            missing = set(self._HYPER) - set(group)
            if missing:
                raise LoraConfigError(f"param group {i} of the state_dict lacks {sorted(missing)}")
            group["params"] = mine["params"]
            self._check_group(group, i)
            new_groups.append(group)
            k += n
        new_state = {}
        state = state_dict["state"]
        if not isinstance(state, dict):
            raise LoraConfigError("state_dict['state'] must be a dict")
        for key, entry in state.items():
            if isinstance(key, (bool, np.bool_)) or not isinstance(key, numbers.Integral) or not (
                    0 <= key < len(tensors)):
                raise LoraConfigError(f"state_dict has state for tensor {key!r}, which does not "
                                      f"exist ({len(tensors)} tensors)")
            _, _, layer, f = tensors[key]
            param = (layer._A, layer._B)[f]
            if not isinstance(entry, dict) or set(entry) != {"step", *self._STATE_ARRAYS}:
                raise LoraConfigError(
                    f"state of tensor {key} must have keys {['step', *self._STATE_ARRAYS]}")
            step = entry["step"]
            if isinstance(step, (bool, np.bool_)) or not isinstance(step, numbers.Integral) or \
                    step < 0:
                raise LoraConfigError(f"state of tensor {key}: step must be an int >= 0, "
                                      f"got {step!r}")
            loaded = {"step": int(step)}
            for name in self._STATE_ARRAYS:
                array = entry[name]
                if not isinstance(array, np.ndarray) or array.shape != param.shape or \
                        array.dtype != param.dtype:
                    raise LoraShapeError(
                        f"state of tensor {key} ({_FACTORS[f]}): {name} must be an array of "
                        f"shape {param.shape} and dtype {param.dtype}, got "
                        f"{getattr(array, 'shape', type(array).__name__)} "
                        f"{getattr(array, 'dtype', '')}")
                loaded[name] = np.array(array, order="C", copy=True)
            new_state[int(key)] = loaded
        for mine, group in zip(self.param_groups, new_groups):
            mine.update(group)
        self.state = new_state

    def __repr__(self):
        layers = sum(len(g["params"]) for g in self.param_groups)
        return f"{type(self).__name__}({len(self.param_groups)} groups, {layers} layers)"


class AdamW(_Optimizer):
    """AdamW over the LoRA factors, step for step as ``torch.optim.AdamW`` on CPU.

    Parameters
    ----------
    params : LoraLinear, LoraAdapter, iterable of them, or list of dicts
        What to train.  Dicts are parameter groups as in torch:
        ``{"params": <layers/adapters>, "lr": ..., ...}``, each key
        overriding the defaults below for that group.
    lr : float, default 1e-3
        Learning rate.
    betas : (float, float), default (0.9, 0.999)
        Decay rates of the first and second moment averages, each in [0, 1).
    eps : float, default 1e-8
        Added to the second moment's square root.
    weight_decay : float, default 1e-2
        Decoupled: ``param *= 1 - lr * weight_decay`` each step.
    lr_b_ratio : float, default 1.0
        LoRA+: ``lora_B`` is trained at ``lr * lr_b_ratio`` (the LoRA+
        paper suggests 16), ``lora_A`` at ``lr``.

    Notes
    -----
    Each tensor's update is :func:`numba_lora.kernels.train.adamw_step`:
    torch's single-tensor AdamW order (torch's default on CPU), operation for
    operation, in the factors' dtype; see that kernel for the one place
    (torch's SIMD ``sqrt``) where torch may round differently.  Each tensor
    keeps its own step count, like torch.  ``param_groups`` is a list of
    dicts that may be changed between steps (learning-rate schedules); the
    values are checked at every step.

    See Also
    --------
    SGD : Plain or momentum SGD over the same parameters.
    clip_grad_norm : Clip the gradients before a step.
    numba_lora.kernels.train.adamw_step : The update of one tensor.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import AdamW, LoraLinear
    >>> layer = LoraLinear(np.eye(4), rank=2, alpha=4.0, seed=0)
    >>> opt = AdamW(layer, lr=1e-2)
    >>> Y, ctx = layer.forward_train(np.ones((3, 4)))
    >>> _ = layer.backward(Y, ctx)              # loss 0.5 * ||Y||^2: dY = Y
    >>> B0 = layer.lora_b.copy()
    >>> opt.step()                              # Adam's first step moves by ~lr
    >>> bool(np.allclose(np.abs(layer.lora_b - B0), 1e-2))
    True
    >>> opt.zero_grad()
    >>> layer.grad_a is None
    True
    """

    _HYPER = ("lr", "betas", "eps", "weight_decay", "lr_b_ratio")
    _STATE_ARRAYS = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: ParamsLike, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, lr_b_ratio: float = 1.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      lr_b_ratio=lr_b_ratio))

    def _check_group(self, group, i):
        where = f"param group {i}: "
        _real(group["lr"], where + "lr", 0.0)
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise LoraConfigError(f"{where}betas must be a pair of floats, got {betas!r}")
        group["betas"] = (_real(betas[0], where + "beta1", 0.0, 1.0),
                          _real(betas[1], where + "beta2", 0.0, 1.0))
        _real(group["eps"], where + "eps", 0.0)
        _real(group["weight_decay"], where + "weight_decay", 0.0)
        _real(group["lr_b_ratio"], where + "lr_b_ratio", 0.0)

    def _update(self, param, grad, state, group, f):
        state["step"] += 1
        lr = float(group["lr"]) * (float(group["lr_b_ratio"]) if f == 1 else 1.0)
        beta1, beta2 = group["betas"]
        train_kernels.adamw_step(param, grad, state["exp_avg"], state["exp_avg_sq"],
                                 state["step"], lr, beta1, beta2, float(group["eps"]),
                                 float(group["weight_decay"]))


class SGD(_Optimizer):
    """SGD with momentum over the LoRA factors, as ``torch.optim.SGD`` on CPU.

    Parameters
    ----------
    params : LoraLinear, LoraAdapter, iterable of them, or list of dicts
        What to train, as for :class:`AdamW` (dicts are parameter groups).
    lr : float, default 1e-3
        Learning rate.
    momentum : float, default 0
        Momentum factor (0: plain SGD, no buffer).
    dampening : float, default 0
        Dampening of the momentum (the gradient enters the buffer times
        ``1 - dampening``).
    weight_decay : float, default 0
        L2 penalty added to the gradient (``grad + weight_decay * param``).
    nesterov : bool, default False
        Nesterov momentum (needs momentum > 0 and dampening 0).
    lr_b_ratio : float, default 1.0
        ``lora_B`` at ``lr * lr_b_ratio``.

    Notes
    -----
    Each tensor's update is :func:`numba_lora.kernels.train.sgd_step`, in
    torch's single-tensor order with its fused adds (equal to torch 2.13 bit
    for bit in float32 and float64 in our checks).  The state of a tensor is
    its step count and, with momentum, its ``momentum_buffer``.

    See Also
    --------
    AdamW : Adam with decoupled weight decay.
    clip_grad_norm : Clip the gradients before a step.
    numba_lora.kernels.train.sgd_step : The update of one tensor.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import SGD, LoraLinear
    >>> layer = LoraLinear(np.eye(4), rank=2, alpha=4.0, seed=0)
    >>> opt = SGD(layer, lr=0.1)
    >>> Y, ctx = layer.forward_train(np.ones((3, 4)))
    >>> _ = layer.backward(Y, ctx)
    >>> B0, gB = layer.lora_b.copy(), layer.grad_b.copy()
    >>> opt.step()                              # B -= lr * dL/dB
    >>> bool(np.allclose(layer.lora_b, B0 - 0.1 * gB))
    True
    """

    _HYPER = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "lr_b_ratio")
    _STATE_ARRAYS = ("momentum_buffer",)

    def __init__(self, params: ParamsLike, lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 lr_b_ratio: float = 1.0) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      lr_b_ratio=lr_b_ratio))

    def _check_group(self, group, i):
        where = f"param group {i}: "
        _real(group["lr"], where + "lr", 0.0)
        momentum = _real(group["momentum"], where + "momentum", 0.0)
        dampening = _real(group["dampening"], where + "dampening")
        _real(group["weight_decay"], where + "weight_decay", 0.0)
        _real(group["lr_b_ratio"], where + "lr_b_ratio", 0.0)
        if not isinstance(group["nesterov"], (bool, np.bool_)):
            raise LoraConfigError(f"{where}nesterov must be True or False, got "
                                  f"{group['nesterov']!r}")
        if group["nesterov"] and (momentum <= 0 or dampening != 0):
            raise LoraConfigError(f"{where}nesterov needs momentum > 0 and dampening 0")

    def _update(self, param, grad, state, group, f):
        first = state["step"] == 0
        state["step"] += 1
        lr = float(group["lr"]) * (float(group["lr_b_ratio"]) if f == 1 else 1.0)
        train_kernels.sgd_step(param, grad, state["momentum_buffer"], lr,
                               float(group["momentum"]), float(group["dampening"]),
                               float(group["weight_decay"]), int(bool(group["nesterov"])),
                               int(first))


def clip_grad_norm(params: ParamsLike | _Optimizer, max_norm: float, *,
                   error_if_nonfinite: bool = False) -> float:
    """Scale all factor gradients so that their global 2-norm is at most ``max_norm``.

    torch's ``clip_grad_norm_`` semantics: the total norm is the 2-norm of
    every gradient together (here computed in float64); if
    ``max_norm / (total + 1e-6) < 1``, every gradient is multiplied by that
    coefficient (computed in the gradients' dtype, as torch does).  Layers
    without a gradient are left out.

    Parameters
    ----------
    params : LoraLinear, LoraAdapter, or iterable of them (or an optimizer)
        Whose gradients to clip (an optimizer's: every layer of its groups).
    max_norm : float
        Finite and >= 0.
    error_if_nonfinite : bool, default False
        Raise :class:`~numba_lora.LoraNonFiniteError` (touching nothing)
        when the total norm is NaN or infinite.  If False, as in torch, the
        gradients are then scaled by a NaN coefficient.

    Returns
    -------
    float
        The total norm before clipping.

    See Also
    --------
    AdamW, SGD : Optimizers whose step follows the clipping.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import LoraLinear, clip_grad_norm
    >>> layer = LoraLinear(np.eye(4), rank=2, alpha=4.0, seed=0)
    >>> Y, ctx = layer.forward_train(np.ones((3, 4)))
    >>> _ = layer.backward(Y, ctx)
    >>> total = clip_grad_norm(layer, 1.0)
    >>> total > 1.0
    True
    >>> norm = np.sqrt((layer.grad_a ** 2).sum() + (layer.grad_b ** 2).sum())
    >>> bool(np.isclose(norm, 1.0, rtol=1e-5))
    True
    """
    if isinstance(params, _Optimizer):
        params = [layer for group in params.param_groups for layer in group["params"]]
    layers = _layers_of(params)
    max_norm = _real(max_norm, "max_norm", 0.0)
    grads = []
    for layer in layers:
        for _, grad in layer._factors_for_update():
            if grad is not None:
                grads.append((layer, grad))
    if not grads:
        return 0.0
    squares = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for _, grad in grads:
            flat = grad.reshape(-1).astype(np.float64)
            squares += float(flat @ flat)
    total = math.sqrt(squares)
    if not math.isfinite(total) and error_if_nonfinite:
        raise LoraNonFiniteError(
            f"the total norm of the gradients is {total}; no gradient was changed")
    for layer, grad in grads:
        t = grad.dtype.type
        with np.errstate(all="ignore"):
            # torch: clamp(max_norm / (total + 1e-6), max=1.0) in the dtype
            # (an infinite total gives 0, a NaN total NaN).
            coef = np.minimum(t(max_norm) / (t(total) + t(1e-6)), t(1.0))
        if coef == 1:
            continue  # multiplying by 1 changes nothing
        with layer._lock.write(), np.errstate(all="ignore"):
            np.multiply(grad, coef, out=grad)
    return total
