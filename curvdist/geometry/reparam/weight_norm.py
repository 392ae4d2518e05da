"""Weight normalization (Salimans & Kingma 2016): W = g ⊙ v / ‖v‖, row by row.

For a weight W of shape (out, *in) the ψ coordinates are g (shape (out,)) and v (W's shape); row i of W is

    W_i = g_i · ṽ_i,   ṽ_i = v_i / n_i,   n_i = ‖v_i‖ (norm over all dims but the first).

Per row, with P_i = I − ṽ_i ṽ_iᵀ (the projector orthogonal to ṽ_i), a = δg, b = δv:

    J (a, b)       = a_i ṽ_i + (g_i/n_i) P_i b_i
    Jᵀ w           = (⟨ṽ_i, w_i⟩,  (g_i/n_i) P_i w_i)
    Σ_k w_k ∇²φ_k (a, b) = ( (⟨b_i, w_i⟩ − s_i t_i)/n_i ,
                             (a_i/n_i) P_i w_i − (g_i/n_i²)(t_i w_i + s_i b_i + q_i ṽ_i − 3 s_i t_i ṽ_i) )
    with s_i = ⟨ṽ_i, w_i⟩, t_i = ⟨ṽ_i, b_i⟩, q_i = ⟨b_i, w_i⟩.

The map is not a bijection: ψ has one dimension more per row than θ (the scale of v is free), so J is not square.
``inverse`` returns the right inverse g_i = ‖W_i‖, v = W (φ(inverse(θ)) = θ); J⁻¹, J⁻ᵀ and log|det J| do not
exist and raise :class:`~curvdist.errors.ReparamError`. ψ names: ``"<name>.g"`` and ``"<name>.v"`` in place of
``<name>``; other parameters keep their name and value.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ...errors import ReparamError
from .base import Params, Reparametrization
from .elementwise import _as_names, _check_known, _check_tensors


def _rows(x: Tensor, ndim: int) -> Tensor:
    """A per-row vector of shape (out,) reshaped to broadcast against an (out, *in) tensor."""
    return x.reshape(x.shape + (1,) * (ndim - 1))


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """⟨a_i, b_i⟩ for every row i: shape (out,)."""
    return (a * b).reshape(a.shape[0], -1).sum(-1)


def _rownorm(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1).norm(dim=-1)


class WeightNorm(Reparametrization):
    """W = g ⊙ v/‖v‖ row-wise for each named weight (ndim ≥ 2; default: all of them)."""

    kind = "weight_norm"
    bijective = False

    def __init__(self, params: str | Sequence[str] | None = None) -> None:
        super().__init__()
        self.params = _as_names(params, self.kind)
        #: for every θ index: the ψ indices (g, v) of a normalized weight, or (j,) for an unchanged parameter
        self._slots: tuple[tuple[int, ...], ...] = ()

    # ------------------------------------------------------------ layout
    def _psi_layout(self) -> tuple[tuple[str, ...], tuple[torch.Size, ...]]:
        shapes = dict(zip(self.theta_names, self.theta_shapes))
        if self.params is not None:
            _check_known(self.params, self.theta_names, self.kind)
            bad = [f"'{n}' (shape {tuple(shapes[n])})" for n in self.params if len(shapes[n]) < 2]
            if bad:
                raise ReparamError(f"weight_norm: {', '.join(bad)} not a weight; weight normalization needs a "
                                   "parameter with at least 2 dimensions (out, *in)")
            chosen = set(self.params)
        else:
            chosen = {n for n, s in shapes.items() if len(s) >= 2}
            if not chosen:
                raise ReparamError(f"weight_norm: none of the selected parameters {list(self.theta_names)} is a "
                                   "weight with at least 2 dimensions")
        names: list[str] = []
        psi_shapes: list[torch.Size] = []
        slots: list[tuple[int, ...]] = []
        for n, s in zip(self.theta_names, self.theta_shapes):
            if n in chosen:
                slots.append((len(names), len(names) + 1))
                names += [f"{n}.g", f"{n}.v"]
                psi_shapes += [torch.Size((s[0],)), s]
            else:
                slots.append((len(names),))
                names.append(n)
                psi_shapes.append(s)
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ReparamError(f"weight_norm: the ψ names {dup} would collide with existing parameter names")
        self._slots = tuple(slots)
        return tuple(names), tuple(psi_shapes)

    # ------------------------------------------------------------ the map
    def forward(self, psi: Params) -> Params:
        """W_i = g_i v_i/‖v_i‖ for normalized weights; other parameters unchanged."""
        psi = _check_tensors(self, psi, "psi")
        out = []
        for slot in self._slots:
            if len(slot) == 1:
                out.append(psi[slot[0]])
                continue
            g, v = psi[slot[0]], psi[slot[1]]
            out.append(_rows(g / _rownorm(v), v.ndim) * v)
        return tuple(out)

    def inverse(self, theta: Params) -> Params:
        """Right inverse: g_i = ‖W_i‖, v = W (a zero row has no direction: ReparamError)."""
        theta = _check_tensors(self, theta, "theta")
        out: list[Tensor] = []
        for name, t, slot in zip(self.theta_names, theta, self._slots):
            if len(slot) == 1:
                out.append(t)
                continue
            if not bool(torch.isfinite(t).all()):
                raise ReparamError(f"weight_norm: parameter '{name}' contains NaN or inf entries")
            n = _rownorm(t)
            zero = torch.nonzero(n == 0).reshape(-1).tolist()
            if zero:
                raise ReparamError(f"weight_norm: parameter '{name}' has zero row(s) {zero}; a zero row has no "
                                   "direction v/‖v‖, so weight normalization is undefined there")
            out += [n, t]
        return tuple(out)

    # ------------------------------------------------------------ closed-form derivatives
    def jvp(self, psi: Params, u: Params) -> Params:
        """J (a, b) = a_i ṽ_i + (g_i/n_i)(b_i − ṽ_i⟨ṽ_i, b_i⟩) per row; identity on other parameters."""
        out = []
        for slot in self._slots:
            if len(slot) == 1:
                out.append(u[slot[0]])
                continue
            g, v, a, b = psi[slot[0]], psi[slot[1]], u[slot[0]], u[slot[1]]
            d = v.ndim
            n = _rownorm(v)
            vt = v / _rows(n, d)
            out.append(_rows(a, d) * vt + _rows(g / n, d) * (b - vt * _rows(_rowdot(vt, b), d)))
        return tuple(out)

    def vjp(self, psi: Params, w: Params) -> Params:
        """Jᵀ w = (⟨ṽ_i, w_i⟩, (g_i/n_i)(w_i − ṽ_i⟨ṽ_i, w_i⟩)) per row; identity on other parameters."""
        out: list[Tensor] = []
        for slot, wi in zip(self._slots, w):
            if len(slot) == 1:
                out.append(wi)
                continue
            g, v = psi[slot[0]], psi[slot[1]]
            d = v.ndim
            n = _rownorm(v)
            vt = v / _rows(n, d)
            s = _rowdot(vt, wi)
            out += [s, _rows(g / n, d) * (wi - vt * _rows(s, d))]
        return tuple(out)

    def second_order(self, psi: Params, g: Params, u: Params) -> Params:
        """Σ_k w_k ∇²φ_k (a, b) (w = ``g``, the θ covector): see the module docstring; zero on other parameters."""
        out: list[Tensor] = []
        for slot, wi in zip(self._slots, g):
            if len(slot) == 1:
                out.append(torch.zeros_like(u[slot[0]]))
                continue
            gg, v, a, b = psi[slot[0]], psi[slot[1]], u[slot[0]], u[slot[1]]
            d = v.ndim
            n = _rownorm(v)
            vt = v / _rows(n, d)
            s, t, q = _rowdot(vt, wi), _rowdot(vt, b), _rowdot(b, wi)
            out_g = (q - s * t) / n
            out_v = (_rows(a / n, d) * (wi - vt * _rows(s, d))
                     - _rows(gg / n**2, d) * (wi * _rows(t, d) + b * _rows(s, d) + vt * _rows(q - 3 * s * t, d)))
            out += [out_g, out_v]
        return tuple(out)

    # ------------------------------------------------------------ no inverse Jacobian
    def _not_bijective(self, what: str) -> ReparamError:
        return ReparamError(
            f"weight_norm is not a bijection (ψ has one extra dimension per row: θ has {self.theta_dim} entries, "
            f"ψ has {self.psi_dim}), so its Jacobian is not square and {what} does not exist"
        )

    def jvp_inverse(self, psi: Params, t: Params) -> Params:
        """Raises: J is not square."""
        raise self._not_bijective("J⁻¹")

    def vjp_inverse(self, psi: Params, c: Params) -> Params:
        """Raises: J is not square."""
        raise self._not_bijective("J⁻ᵀ")

    def logabsdet(self, psi: Params) -> float:
        """Raises: J is not square."""
        raise self._not_bijective("log|det J|")

    def __repr__(self) -> str:
        return f"WeightNorm(params={list(self.params) if self.params else None})"


def weight_norm(params: str | Sequence[str] | None = None) -> WeightNorm:
    """W = g ⊙ v/‖v‖ row-wise on ``params`` (default: every selected parameter with ndim ≥ 2)."""
    return WeightNorm(params)
