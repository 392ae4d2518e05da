"""Elementwise reparametrizations θ_i = f(ψ_i) of selected parameters (identity on the others).

For an elementwise map the Jacobian is diagonal, so every derivative object has a closed form:

==================  =========================================
J u                 f'(ψ) ⊙ u
Jᵀ w                f'(ψ) ⊙ w
Σ_k g_k ∇²φ_k u     g ⊙ f''(ψ) ⊙ u
J⁻¹ t, J⁻ᵀ c        t / f'(ψ),  c / f'(ψ)
log|det J|          Σ log|f'(ψ)|
diag J              f'(ψ)
==================  =========================================

Built in: :class:`Scale` (θ = c ⊙ ψ), :class:`Exp` (θ = exp ψ, onto (0, ∞)) and :class:`Softplus`
(θ = log(1 + e^ψ), onto (0, ∞)). This module also holds the small helpers (name selection, layout checks) the
other kinds share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ...errors import ReparamError
from .base import Params, Reparametrization

# ---------------------------------------------------------------------------------------------- shared helpers


def _as_names(params: str | Sequence[str] | None, kind: str) -> tuple[str, ...] | None:
    """Normalize a ``params`` argument (one name, a sequence of names, or None) and validate its type."""
    if params is None:
        return None
    if isinstance(params, str):
        return (params,)
    if not isinstance(params, Sequence) or not all(isinstance(n, str) for n in params):
        raise ReparamError(f"{kind}: params must be a parameter name or a list of names, got {params!r}")
    names = tuple(params)
    if not names:
        raise ReparamError(f"{kind}: params is empty; name at least one parameter")
    if len(set(names)) != len(names):
        raise ReparamError(f"{kind}: params repeats names: {list(names)}")
    return names


def _check_known(names: Sequence[str], available: Sequence[str], kind: str) -> None:
    """Every name must be one of the bound θ names (the problem's selected parameters)."""
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ReparamError(
            f"{kind}: parameter(s) {unknown} are not among the problem's selected parameters {list(available)}"
        )


def _check_bound(r: Reparametrization) -> None:
    if not r.theta_names:
        raise ReparamError(f"the {r.kind} reparametrization is not bound to a parameter layout; call bind() "
                           "(curvdist.geometry.reparam.reparametrize does it)")


def _check_tensors(r: Reparametrization, tensors: Sequence[Tensor], which: str) -> Params:
    """Check that ``tensors`` match the bound ψ (``which="psi"``) or θ (``which="theta"``) layout."""
    _check_bound(r)
    names, shapes = (r.psi_names, r.psi_shapes) if which == "psi" else (r.theta_names, r.theta_shapes)
    symbol = "ψ" if which == "psi" else "θ"
    if isinstance(tensors, Tensor) or len(tensors) != len(shapes):
        got = "a single tensor" if isinstance(tensors, Tensor) else f"{len(tensors)} tensors"
        raise ReparamError(f"{r.kind}: expected {len(shapes)} {symbol} tensors {list(names)}, got {got}")
    for n, t, s in zip(names, tensors, shapes):
        if tuple(t.shape) != tuple(s):
            raise ReparamError(f"{r.kind}: {symbol} tensor '{n}' has shape {tuple(t.shape)}, expected {tuple(s)}")
    return tuple(tensors)


def _check_factor_value(value: float | Tensor, what: str) -> None:
    """A scale factor must be finite and non-zero (otherwise θ = c ψ is not invertible)."""
    if isinstance(value, Tensor):
        if not value.is_floating_point() and value.dtype not in (torch.int32, torch.int64):
            raise ReparamError(f"{what} must be a real tensor, got dtype {value.dtype}")
        if value.numel() == 0:
            raise ReparamError(f"{what} is an empty tensor")
        if not bool(torch.isfinite(value).all()):
            raise ReparamError(f"{what} contains NaN or inf entries")
        if bool((value == 0).any()):
            raise ReparamError(f"{what} contains zero entries; θ = c ⊙ ψ is not invertible where c = 0")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReparamError(f"{what} must be a number or a tensor, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ReparamError(f"{what} is {value!r}; it must be finite")
    if value == 0:
        raise ReparamError(f"{what} is zero; θ = c ψ is not invertible where c = 0")


def _like(c: float | Tensor, x: Tensor) -> float | Tensor:
    """A factor in the dtype and on the device of ``x`` (plain numbers pass through)."""
    return c.to(dtype=x.dtype, device=x.device) if isinstance(c, Tensor) else c


# ---------------------------------------------------------------------------------------------- base class


class Elementwise(Reparametrization):
    """θ = f(ψ) entrywise on the selected parameters, θ = ψ on the others; ψ has θ's names and shapes.

    Subclasses implement the scalar function per bound parameter index ``i``: :meth:`_f`, its first and second
    derivatives :meth:`_df` and :meth:`_d2f`, and the inverse :meth:`_finv` (which validates the point).
    """

    kind = "elementwise"
    #: f'' ≡ 0 (linear maps): second_order returns zeros without computing anything
    linear_map: bool = False

    def __init__(self, params: str | Sequence[str] | None = None) -> None:
        super().__init__()
        self.params = _as_names(params, self.kind)
        self._selected: tuple[bool, ...] = ()

    # ------------------------------------------------------------ layout
    def _psi_layout(self) -> tuple[tuple[str, ...], tuple[torch.Size, ...]]:
        if self.params is not None:
            _check_known(self.params, self.theta_names, self.kind)
            chosen = set(self.params)
            self._selected = tuple(n in chosen for n in self.theta_names)
        else:
            self._selected = tuple(True for _ in self.theta_names)
        self._validate_layout()
        return self.theta_names, self.theta_shapes

    def _validate_layout(self) -> None:
        """Hook for subclass checks that need the bound layout (raise ReparamError)."""

    # ------------------------------------------------------------ per-parameter scalar map
    def _f(self, i: int, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _df(self, i: int, x: Tensor) -> Tensor | float:
        raise NotImplementedError

    def _d2f(self, i: int, x: Tensor) -> Tensor | float:
        raise NotImplementedError

    def _finv(self, i: int, t: Tensor) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------ the map
    def forward(self, psi: Params) -> Params:
        """θ_i = f(ψ_i) on selected parameters, ψ_i elsewhere."""
        psi = _check_tensors(self, psi, "psi")
        return tuple(self._f(i, p) if s else p for i, (p, s) in enumerate(zip(psi, self._selected)))

    def inverse(self, theta: Params) -> Params:
        """ψ_i = f⁻¹(θ_i) on selected parameters (ReparamError outside f's range)."""
        theta = _check_tensors(self, theta, "theta")
        return tuple(self._finv(i, t) if s else t for i, (t, s) in enumerate(zip(theta, self._selected)))

    # ------------------------------------------------------------ closed-form derivatives
    def jvp(self, psi: Params, u: Params) -> Params:
        """J u = f'(ψ) ⊙ u."""
        return tuple(self._df(i, p) * ui if s else ui for i, (p, ui, s) in enumerate(zip(psi, u, self._selected)))

    def vjp(self, psi: Params, w: Params) -> Params:
        """Jᵀ w = f'(ψ) ⊙ w (J is diagonal)."""
        return self.jvp(psi, w)

    def second_order(self, psi: Params, g: Params, u: Params) -> Params:
        """Σ_k g_k ∇²φ_k(ψ) u = g ⊙ f''(ψ) ⊙ u (zero on unselected parameters and for linear f)."""
        if self.linear_map:
            return tuple(torch.zeros_like(ui) for ui in u)
        return tuple(gi * self._d2f(i, p) * ui if s else torch.zeros_like(ui)
                     for i, (p, gi, ui, s) in enumerate(zip(psi, g, u, self._selected)))

    def jvp_inverse(self, psi: Params, t: Params) -> Params:
        """J⁻¹ t = t / f'(ψ)."""
        return tuple(ti / self._df(i, p) if s else ti for i, (p, ti, s) in enumerate(zip(psi, t, self._selected)))

    def vjp_inverse(self, psi: Params, c: Params) -> Params:
        """J⁻ᵀ c = c / f'(ψ)."""
        return self.jvp_inverse(psi, c)

    def jacobian_diagonal(self, psi: Params) -> Params:
        """diag J = f'(ψ) per parameter (0-d ones on unselected parameters, 0-d c for a scale by a number)."""
        psi = _check_tensors(self, psi, "psi")
        out = []
        for i, (p, s) in enumerate(zip(psi, self._selected)):
            d = self._df(i, p) if s else 1.0
            out.append(d if isinstance(d, Tensor) else torch.tensor(float(d), dtype=p.dtype, device=p.device))
        return tuple(out)

    def logabsdet(self, psi: Params) -> float:
        """log|det J| = Σ_selected Σ_entries log|f'(ψ)|."""
        psi = _check_tensors(self, psi, "psi")
        total = 0.0
        for i, (p, s) in enumerate(zip(psi, self._selected)):
            if s:
                d = self._df(i, p)
                d = d.expand(p.shape) if isinstance(d, Tensor) else torch.full_like(p, float(d))
                total += float(torch.log(d.abs()).sum())
        return total

    def __repr__(self) -> str:
        return f"{type(self).__name__}(params={list(self.params) if self.params else None})"


# ---------------------------------------------------------------------------------------------- scale


class Scale(Elementwise):
    """θ = c ⊙ ψ: a change of units per parameter.

    ``factors`` is one number for every selected parameter, or a dict name → number or tensor (broadcastable to
    the parameter's shape); parameters not named keep c = 1. J = diag(c), Σ_k g_k ∇²φ_k = 0, J⁻¹ = diag(1/c),
    log|det J| = Σ log|c| (summed over the parameter's entries after broadcasting).
    """

    kind = "scale"
    linear_map = True

    def __init__(self, factors: float | Mapping[str, float | Tensor] = 1.0) -> None:
        if isinstance(factors, Mapping):
            if not factors:
                raise ReparamError("scale: factors is an empty dict; name at least one parameter")
            clean: dict[str, float | Tensor] = {}
            for name, c in factors.items():
                if not isinstance(name, str):
                    raise ReparamError(f"scale: factor keys must be parameter names, got {name!r}")
                if isinstance(c, Tensor):
                    c = c.detach().clone()
                    _check_factor_value(c, f"scale: the factor for '{name}'")
                    c = c if c.is_floating_point() else c.double()
                else:
                    _check_factor_value(c, f"scale: the factor for '{name}'")
                    c = float(c)
                clean[name] = c
            super().__init__(list(clean))
            self.factors: float | dict[str, float | Tensor] = clean
        else:
            _check_factor_value(factors, "scale: the factor")
            super().__init__(None)
            self.factors = float(factors)
        self._c: tuple[float | Tensor, ...] = ()

    def _validate_layout(self) -> None:
        if isinstance(self.factors, float):
            self._c = tuple(self.factors for _ in self.theta_names)
            return
        cs: list[float | Tensor] = []
        for name, shape in zip(self.theta_names, self.theta_shapes):
            c = self.factors.get(name, 1.0)
            if isinstance(c, Tensor):
                try:
                    ok = torch.broadcast_shapes(c.shape, shape) == shape
                except RuntimeError:
                    ok = False
                if not ok:
                    raise ReparamError(f"scale: the factor for '{name}' has shape {tuple(c.shape)}, which does not "
                                       f"broadcast to the parameter's shape {tuple(shape)}")
            cs.append(c)
        self._c = tuple(cs)

    def _f(self, i: int, x: Tensor) -> Tensor:
        return _like(self._c[i], x) * x

    def _df(self, i: int, x: Tensor) -> Tensor | float:
        return _like(self._c[i], x)

    def _d2f(self, i: int, x: Tensor) -> float:
        return 0.0

    def _finv(self, i: int, t: Tensor) -> Tensor:
        return t / _like(self._c[i], t)

    def __repr__(self) -> str:
        if isinstance(self.factors, float):
            return f"Scale({self.factors})"
        return "Scale({" + ", ".join(f"{n!r}: {c if isinstance(c, float) else 'tensor' + str(tuple(c.shape))}"
                                     for n, c in self.factors.items()) + "})"


# ---------------------------------------------------------------------------------------------- exp / softplus


def _check_positive(kind: str, name: str, t: Tensor, rule: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ReparamError(f"{kind}: parameter '{name}' contains NaN or inf entries")
    if t.numel() and not bool((t > 0).all()):
        raise ReparamError(f"{kind}: parameter '{name}' must be positive ({rule} maps onto (0, ∞)), but its "
                           f"minimum value is {float(t.min()):.6g}")


class Exp(Elementwise):
    """θ = exp(ψ) on the named parameters (positive scales, variances); inverse ψ = log θ needs θ > 0.

    f' = f'' = exp, so J u = θ ⊙ u, Σ_k g_k ∇²φ_k u = g ⊙ θ ⊙ u, log|det J| = Σ ψ.
    """

    kind = "exp"

    def __init__(self, params: str | Sequence[str]) -> None:
        if params is None:
            raise ReparamError("exp: name the parameters to map (params=...); exp applies to positive parameters")
        super().__init__(params)

    def _f(self, i: int, x: Tensor) -> Tensor:
        return torch.exp(x)

    def _df(self, i: int, x: Tensor) -> Tensor:
        return torch.exp(x)

    def _d2f(self, i: int, x: Tensor) -> Tensor:
        return torch.exp(x)

    def _finv(self, i: int, t: Tensor) -> Tensor:
        _check_positive(self.kind, self.theta_names[i], t, "θ = exp(ψ)")
        return torch.log(t)


class Softplus(Elementwise):
    """θ = softplus(ψ) = log(1 + e^ψ) on the named parameters; inverse ψ = θ + log(−expm1(−θ)) needs θ > 0.

    f' = σ(ψ) (the logistic sigmoid), f'' = σ(ψ)(1 − σ(ψ)). The forward map is evaluated as logaddexp(ψ, 0),
    exact for every ψ (no linear cut-off as in ``torch.nn.functional.softplus``).
    """

    kind = "softplus"

    def __init__(self, params: str | Sequence[str]) -> None:
        if params is None:
            raise ReparamError("softplus: name the parameters to map (params=...); softplus applies to positive "
                               "parameters")
        super().__init__(params)

    def _f(self, i: int, x: Tensor) -> Tensor:
        return torch.logaddexp(x, torch.zeros_like(x))

    def _df(self, i: int, x: Tensor) -> Tensor:
        return torch.sigmoid(x)

    def _d2f(self, i: int, x: Tensor) -> Tensor:
        s = torch.sigmoid(x)
        return s * (1 - s)

    def _finv(self, i: int, t: Tensor) -> Tensor:
        _check_positive(self.kind, self.theta_names[i], t, "θ = log(1 + e^ψ)")
        return t + torch.log(-torch.expm1(-t))


# ---------------------------------------------------------------------------------------------- constructors


def scale(factors: float | Mapping[str, float | Tensor] = 1.0) -> Scale:
    """θ = c ⊙ ψ; ``factors``: one number for all parameters, or name → number/tensor (others unchanged)."""
    return Scale(factors)


def exp(params: str | Sequence[str]) -> Exp:
    """θ = exp(ψ) on ``params`` (identity elsewhere); the current values must be positive."""
    return Exp(params)


def softplus(params: str | Sequence[str]) -> Softplus:
    """θ = log(1 + e^ψ) on ``params`` (identity elsewhere); the current values must be positive."""
    return Softplus(params)
