"""How a model is cut into pipeline stages: the stack's units, balanced cuts, and each stage's program.

A stack is a model that computes f = f_{S−1} ∘ … ∘ f_0 (each f_s depending on its own parameters):

* an ``nn.Sequential``, or a model whose ``stages()`` lists its consecutive modules: the units are the modules
  and the value between stages is one tensor;
* any other model with a run of repeated blocks — an ``nn.ModuleList`` of modules of one class, such as a
  Hugging Face decoder's ``transformer.h`` / ``model.layers`` or an encoder's ``encoder.layer``: the units are the
  parameters before the blocks (embeddings), each block, and the parameters after them (final norm, head). The
  model is traced once per micro-batch shape with ``torch.export`` and cut at block boundaries by
  ``torch.distributed.pipelining``; whatever the later stages need (hidden states, the attention mask, rotary
  position tables, the token ids) travels between stages as a named *carry* of tensors.

Cuts balance the parameters each stage *holds* (a weight tied between the embedding and the head counts on both
ends, since both hold it). Every parameter of the problem is owned by the first stage that uses it; a later stage
that uses it too (the tied head) holds a copy, receives the owner's part of each vector and returns its part of
each product, which the owner adds: the tied parameter stays one parameter of the problem.
"""

from __future__ import annotations

import copy
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import MetricError, ProblemError
from ..problem.autodiff import differentiable_kernels
from ..problem.data import Inputs
from ..problem.outputs import network_output

if TYPE_CHECKING:
    from ..geometry.blocks.probes import Recorder

#: the carry between two stages: named tensors (one, ``"x"``, for sequential stacks)
Carry = dict[str, Tensor]

#: a stage program with its sites recorded: (parameters, carry, key) → outgoing carry (or the network output)
SiteRun = Callable[[Mapping[str, Tensor], Carry, Any], "Carry | Tensor"]


def split_floats(carry: Carry) -> tuple[Carry, Carry]:
    """(floating entries, the others) of a carry: only the floating ones have tangents and cotangents."""
    f = {k: v for k, v in carry.items() if v.is_floating_point()}
    return f, {k: v for k, v in carry.items() if k not in f}


# ---------------------------------------------------------------------------------------------------- naming
def canonical_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) → its problem name: the first name under which ``model`` lists it (tied weights have one)."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return names


# ---------------------------------------------------------------------------------------------------- cutting
def balanced_cuts(counts: Sequence[float], stages: int, what: str = "modules",
                  parameters: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """[start, stop) unit ranges of ``stages`` consecutive stages with near-equal sums of ``counts`` (stage s ends
    where the cumulative count comes nearest to s/S of the total); every stage gets at least one unit with
    parameters (``parameters``: each unit's parameter count, default ``counts`` themselves)."""
    counts = np.asarray(counts, dtype=np.float64)
    params = counts if parameters is None else np.asarray(parameters, dtype=np.float64)
    with_params = int((params > 0).sum())
    if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
        raise ProblemError(f"stages must be a positive integer, got {stages!r}")
    if stages > with_params:
        raise ProblemError(f"cannot split into {stages} stages: the model has only {with_params} {what} with "
                           "parameters")
    total, cum = counts.sum(), np.cumsum(counts)
    cuts, start = [], 0
    for s in range(1, stages):
        target = total * s / stages
        i = int(np.searchsorted(cum, target))  # first unit whose cumulative count reaches the target ...
        if i > 0 and abs(cum[i - 1] - target) < abs(cum[min(i, len(cum) - 1)] - target):
            i -= 1  # ... or the one before it, whichever ends nearer the target
        i = max(i, next(j for j in range(start, len(params)) if params[j] > 0))
        while int((params[i + 1:] > 0).sum()) < stages - s:  # leave a parametrized unit for each later stage
            i -= 1
        cuts.append(i + 1)
        start = i + 1
    bounds = [0, *cuts, len(counts)]
    return [(bounds[k], bounds[k + 1]) for k in range(stages)]


def stage_modules(model: nn.Module) -> list[nn.Module] | None:
    """The consecutive modules of a sequential stack (``stages()`` or an ``nn.Sequential``), else None."""
    if hasattr(model, "stages") and callable(model.stages):
        mods = list(model.stages())
        if not mods:
            raise ProblemError("the model's stages() lists no modules to split into stages")
        return mods
    if isinstance(model, nn.Sequential):
        if not len(model):
            raise ProblemError("the nn.Sequential has no modules to split into stages")
        return list(model)
    return None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's run of repeated blocks: the ``nn.ModuleList`` of modules of one class holding the most
    parameters (a transformer's layers), or None."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1:
            n = sum(p.numel() for p in mod.parameters())
            if n and (best is None or n > best[0]):
                best = (n, name, mod)
    return None if best is None else (best[1], best[2])


#: how pipeline cuts balance the stages: the parameters each holds, an estimate of the work each does, or the
#: measured seconds of each unit's forward and backward pass (:mod:`.unit_times`, resolved on the coordinator)
BALANCE = ("parameters", "compute", "time")

#: a ``balance``: one of :data:`BALANCE`, or the number of units each stage takes (blocks of a block stack,
#: modules of a sequential one)
Balance = str | Sequence[int]


def _weights(model: nn.Module, balance: str) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter slot (tied ones under each name) that counts for ``balance``: all of them
    for ``parameters``; for ``compute`` those whose module multiplies with them — an embedding table is looked up,
    not multiplied, so it is left out where it is an ``nn.Embedding``'s weight and counted where a head uses it."""
    if balance not in ("parameters", "compute"):
        raise ProblemError(f"balance must be one of {BALANCE} or a list of units per stage, got {balance!r}")
    out = []
    for mname, m in model.named_modules(remove_duplicate=False):
        if balance == "compute" and isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            continue
        for leaf, p in m.named_parameters(recurse=False, remove_duplicate=False):
            out.append((f"{mname}.{leaf}" if mname else leaf, p))
    return out


def block_units(model: nn.Module, prefix: str, blocks: int, balance: str = "parameters") -> list[int]:
    """Parameters held by each unit of a block stack: [before the blocks, block 0, …, block L−1, after them]
    (a parameter listed both before and after the blocks, like a tied embedding and head, counts for both);
    with ``balance="compute"`` only those multiplied with (:func:`_weights`): a proxy of each unit's work per token."""
    units = [0] * (blocks + 2)
    seen_block, counted = False, [set() for _ in units]
    for name, p in _weights(model, balance):
        if name.startswith(prefix + "."):
            u, seen_block = 1 + int(name[len(prefix) + 1:].split(".", 1)[0]), True
        else:
            u = len(units) - 1 if seen_block else 0
        if id(p) not in counted[u]:
            counted[u].add(id(p))
            units[u] += p.numel()
    return units


def describe_stack(model: nn.Module) -> str:
    return (f"{type(model).__name__} is neither an nn.Sequential, nor a model with a stages() method listing its "
            f"consecutive modules, nor a stack with an nn.ModuleList of repeated blocks (a transformer's layers)")


def stack_units(model: nn.Module) -> tuple[str, nn.ModuleList] | list[nn.Module]:
    """The units a stack is cut between: the modules of a sequential stack, else the model's run of blocks
    (``(prefix, blocks)``, whose units are [before the blocks, block 0, …, block L−1, after them])."""
    mods = stage_modules(model)
    if mods is not None:
        return mods
    found = find_blocks(model)
    if found is None:
        raise ProblemError(f"pipeline mode cannot split the model: {describe_stack(model)}")
    return found


def unit_kind(model: nn.Module) -> str:
    """What a stack's units are called in messages: ``modules`` or ``blocks and end pieces``."""
    return "modules" if isinstance(stack_units(model), list) else "blocks and end pieces"


def unit_parameters(model: nn.Module, balance: str = "parameters") -> list[int]:
    """The parameters each unit holds (``parameters``) or multiplies with (``compute``), in unit order."""
    units = stack_units(model)
    if isinstance(units, list):
        return [sum(p.numel() for _, p in _weights(m, balance)) for m in units]
    return block_units(model, units[0], len(units[1]), balance)


def cuts_from_counts(model: nn.Module, stages: int, counts: Sequence[int]) -> list[tuple[int, int]]:
    """[start, stop) unit ranges of an explicit split: ``counts[s]`` modules (sequential stack) or blocks (block
    stack; the embeddings go with stage 0, what follows the blocks with the last stage) for stage s."""
    units = stack_units(model)
    n = len(units) if isinstance(units, list) else len(units[1])
    what = "modules" if isinstance(units, list) else "blocks"
    if (isinstance(counts, (str, bytes)) or len(counts) != stages
            or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0 for c in counts)):
        raise ProblemError(f"balance as a list gives the number of {what} of each of the {stages} stages "
                           f"(non-negative integers), got {counts!r}")
    if sum(counts) != n:
        raise ProblemError(f"balance {list(counts)} gives {sum(counts)} {what}, but the model has {n}")
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    if not isinstance(units, list):  # the embeddings before the blocks, and what follows them
        bounds = bounds + 1
        bounds[0], bounds[-1] = 0, n + 2
    cuts = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    params = unit_parameters(model)
    empty = [s for s, (a, b) in enumerate(cuts) if not any(params[a:b])]
    if empty:
        raise ProblemError(f"balance {list(counts)} leaves stage(s) {empty} without parameters")
    return cuts


def counts_from_cuts(model: nn.Module, cuts: Sequence[tuple[int, int]]) -> list[int]:
    """The explicit ``balance`` (units per stage, see :func:`cuts_from_counts`) of a split's unit ranges."""
    if isinstance(stack_units(model), list):
        return [b - a for a, b in cuts]
    return [b - a - (s == 0) - (s == len(cuts) - 1) for s, (a, b) in enumerate(cuts)]


def split_points(model: nn.Module, stages: int, balance: Balance = "parameters") -> list[tuple[int, int]]:
    """[start, stop) unit ranges of a balanced split: modules of a sequential stack, or units [before, block 0,
    …, block L−1, after] of a block stack (see :func:`block_units`), balanced by ``balance`` (or taken as given,
    a list of units per stage: :func:`cuts_from_counts`). ``time`` is measured on the coordinator
    (:func:`.unit_times.timed_balance`) and reaches the stages as such a list."""
    if not isinstance(balance, str):
        return cuts_from_counts(model, stages, balance)
    if balance == "time":
        raise ProblemError("balance 'time' is measured on the coordinator's model (unit_times.timed_balance) and "
                           "passed to the stages as units per stage")
    return balanced_cuts(unit_parameters(model, balance), stages, what=unit_kind(model))


# ---------------------------------------------------------------------------------------------------- programs
class StageProgram(ABC):
    """Stage s of a stack as a pure function of its parameters (by problem name) and the incoming carry."""

    #: problem names of every parameter the stage uses (owned or tied to an earlier stage), in model order
    uses: list[str]

    @abstractmethod
    def first_carry(self, inputs: Inputs) -> Carry:
        """The carry that enters stage 0: the batch's inputs."""

    @abstractmethod
    def __call__(self, params: Mapping[str, Tensor], carry: Carry, key: Any) -> Carry | Tensor:
        """The outgoing carry (the network output f at the last stage); ``key`` names the micro-batch's
        input signature (traced stacks keep one graph per shape)."""

    def signature(self, inputs: Inputs) -> Any:
        return None

    @abstractmethod
    def with_sites(self, selected: Sequence[str]) -> tuple[SiteRun, Recorder]:
        """The stage as a function that also records the sites (:mod:`curvdist.geometry.blocks.probes`) of the
        selected parameters (problem names) in every call, and the recorder.

        Raises:
            MetricError: a selected parameter is not covered by a site."""


class SequentialProgram(StageProgram):
    """Modules [a, b) of a sequential stack; the carry is one tensor ``x``."""

    def __init__(self, model: nn.Module, bounds: tuple[int, int]) -> None:
        mods = stage_modules(model)
        assert mods is not None
        self.module = nn.Sequential(*mods[bounds[0]:bounds[1]]).eval()
        self.last = bounds[1] == len(mods)
        names = canonical_names(model)
        local = {}
        for lname, p in self.module.named_parameters(remove_duplicate=False):
            local[lname] = names.get(id(p), lname)
        self.local = local  # module-local name → problem name
        self.uses = list(dict.fromkeys(local.values()))
        self.buffers = {k: v.detach() for k, v in self.module.named_buffers()}

    def first_carry(self, inputs: Inputs) -> Carry:
        if not isinstance(inputs, Tensor):
            raise ProblemError("a sequential stack takes tensor inputs X; mapping batches (keyword inputs) need a "
                               "model whose forward takes them, split at its blocks")
        return {"x": inputs}

    def __call__(self, params: Mapping[str, Tensor], carry: Carry, key: Any) -> Carry | Tensor:
        state = {**{k: params[v] for k, v in self.local.items()}, **self.buffers}
        with differentiable_kernels():
            out = functional_call(self.module, state, (carry["x"],), tie_weights=False)
        return out if self.last else {"x": out}

    def with_sites(self, selected: Sequence[str]) -> tuple[SiteRun, Recorder]:
        """An instrumented copy of the stage's modules (module hooks); its sites name the problem's parameters."""
        from ..geometry.blocks.probes import MATRIX_FREE_HINT, instrumented_copy

        twin, rec, plan = instrumented_copy(self.module, [k for k, v in self.local.items() if v in set(selected)])
        if plan.exact:
            raise MetricError(f"pipeline blocks need a layer rule for every parameter of a stage; "
                              f"{[self.local[n] for n in plan.exact]} have none (their exact blocks need "
                              f"per-sample passes through the later stages). {MATRIX_FREE_HINT}")

        def run(params: Mapping[str, Tensor], carry: Carry, key: Any) -> Carry | Tensor:
            out = twin(carry["x"])
            for site in rec.sites:
                site.params = {role: self.local[n] for role, n in site.params.items()}
            return out if self.last else {"x": out}

        return run, rec


class _Logits(nn.Module):
    """The model as a function of tensor inputs returning the network output (for tracing)."""

    def __init__(self, net: nn.Module, keywords: bool) -> None:
        super().__init__()
        self.net, self.keywords = net, keywords

    def forward(self, *args: Tensor, **kwargs: Tensor) -> Tensor:
        return network_output(self.net(*args, **kwargs))


class _Traced:
    """One traced shape of a stage: its graph module, the top-level nodes it reads, and what it passes on."""

    def __init__(self, sub: nn.Module, node: Any, getitems: list[tuple[str, int]], live: list[str] | None,
                 output: str | None) -> None:
        # names only: a node would keep the whole split graph (every stage's parameters) alive
        self.sub, self.name, self.getitems, self.live, self.output = sub, node.name, getitems, live, output
        self.args = [a.name for a in node.args]


class TracedProgram(StageProgram):
    """Stage ``stage`` of a block stack, traced once per micro-batch input signature.

    ``torch.distributed.pipelining.pipeline`` exports the model (``torch.export``) and cuts the graph at the
    chosen block boundaries; the stage keeps its own submodule and the list of values that cross its outgoing
    boundary (its outputs and anything an earlier stage produced that a later one reads)."""

    def __init__(self, model: nn.Module, stage: int, stages: int, examples: Sequence[Inputs],
                 balance: Balance = "parameters") -> None:
        found = find_blocks(model)
        if found is None:
            raise ProblemError(f"pipeline mode cannot split the model: {describe_stack(model)}")
        self.prefix, blocks = found
        self.stage, self.stages = stage, stages
        cuts = split_points(model, stages, balance)
        self.split_spec = _split_spec(self.prefix, len(blocks), [a for a, _ in cuts[1:]])
        self.names = canonical_names(model)
        self.graphs: dict[Any, _Traced] = {}
        self.uses_by_stage: list[list[str]] = []
        for inputs in examples:
            key = self.signature(inputs)
            if key not in self.graphs:
                self.graphs[key] = self._trace(model, inputs)
        self.uses = self.uses_by_stage[stage]

    def signature(self, inputs: Inputs) -> Any:
        if isinstance(inputs, Tensor):
            return (("x", tuple(inputs.shape), inputs.dtype),)
        return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(inputs.items()))

    def first_carry(self, inputs: Inputs) -> Carry:
        return {"x": inputs} if isinstance(inputs, Tensor) else dict(inputs)

    def _trace(self, model: nn.Module, inputs: Inputs) -> _Traced:
        from torch.distributed.pipelining import pipeline

        keywords = not isinstance(inputs, Tensor)
        wrapper = _Logits(model, keywords)
        try:
            pipe = pipeline(wrapper, mb_args=() if keywords else (inputs,),
                            mb_kwargs=dict(inputs) if keywords else None, split_spec=self.split_spec)
        except Exception as e:  # export failed: graph breaks, data-dependent control flow, ...
            cause = str(e.__cause__ or e).strip().splitlines()[0][:300]
            raise ProblemError(f"pipeline mode could not trace {type(model).__name__} with torch.export to cut it at "
                               f"its blocks ({cause}); give the model a stages() method listing consecutive modules "
                               f"instead") from None
        finally:
            _unannotate(model, self.prefix)
        gm = pipe.split_gm
        nodes = list(gm.graph.nodes)
        calls = [n for n in nodes if n.op == "call_module"]
        if len(calls) != self.stages:
            raise ProblemError(f"tracing cut {type(model).__name__} into {len(calls)} pieces, not {self.stages}")
        where: dict[str, int] = {}
        for n in nodes:
            if n.op == "placeholder":
                where[n.name] = -1
            elif n.op == "call_module":
                where[n.name] = calls.index(n)
            elif n.op == "call_function" and n.target is operator.getitem:
                where[n.name] = where[n.args[0].name]
        live: list[str] = []
        for later in calls[self.stage + 1:]:
            for a in later.all_input_nodes:
                if where[a.name] <= self.stage and a.name not in live:
                    live.append(a.name)
        out = next(n for n in nodes if n.op == "output").args[0]
        out = out[0] if isinstance(out, (tuple, list)) else out
        node = calls[self.stage]
        getitems = [(n.name, n.args[1]) for n in nodes
                    if n.op == "call_function" and n.target is operator.getitem and n.args[0] is node]
        if not self.uses_by_stage:
            for c in calls:
                sub = gm.get_submodule(c.target)
                self.uses_by_stage.append(list(dict.fromkeys(
                    self._problem_name(model, n) for n, _ in sub.named_parameters(remove_duplicate=False))))
        sub = gm.get_submodule(node.target)
        self._local = {n: self._problem_name(model, n) for n, _ in sub.named_parameters(remove_duplicate=False)}
        _drop_parameters(sub)  # the stage passes its own tensors; the traced copies are not kept
        return _Traced(sub, node, getitems, live if self.stage < self.stages - 1 else None,
                       out.name if self.stage == self.stages - 1 else None)

    def _problem_name(self, model: nn.Module, traced: str) -> str:
        name = traced[len("net."):] if traced.startswith("net.") else traced
        return self.names.get(id(model.get_parameter(name)), name)

    def __call__(self, params: Mapping[str, Tensor], carry: Carry, key: Any) -> Carry | Tensor:
        return self._run(self.graphs[key], params, carry)

    def with_sites(self, selected: Sequence[str]) -> tuple[SiteRun, Recorder]:
        """Copies of the stage's traced graphs with a recording node after every site operator
        (:mod:`curvdist.geometry.blocks.graph_sites`)."""
        from ..geometry.blocks.graph_sites import instrumented_graph_copy
        from ..geometry.blocks.probes import Recorder

        rec = Recorder(set(selected))
        names = {k: v for k, v in self._local.items() if v in rec.selected}
        graphs = {}
        for key, t in self.graphs.items():
            graphs[key] = copy.copy(t)
            graphs[key].sub = instrumented_graph_copy(t.sub, names, rec)
        return (lambda params, carry, key: self._run(graphs[key], params, carry)), rec

    def _run(self, t: _Traced, params: Mapping[str, Tensor], carry: Carry) -> Carry | Tensor:
        vals = dict(carry)
        state = {k: params[v] for k, v in self._local.items()}
        with differentiable_kernels():
            res = functional_call(t.sub, state, tuple(vals[a] for a in t.args), strict=False, tie_weights=False)
        vals[t.name] = res
        for name, i in t.getitems:
            vals[name] = res[i]
        if t.output is not None:
            return vals[t.output]
        return {k: vals[k] for k in t.live}


def _split_spec(prefix: str, blocks: int, starts: list[int]) -> dict[str, Any]:
    """``pipelining`` split points for stages starting at units ``starts`` (unit 0: before the blocks, 1…L: the
    blocks, L+1: after them)."""
    from torch.distributed.pipelining import SplitPoint

    spec: dict[str, Any] = {}
    for u in starts:
        if 1 <= u <= blocks:
            spec[f"net.{prefix}.{u - 1}"] = SplitPoint.BEGINNING
        else:
            spec[f"net.{prefix}.{blocks - 1}"] = SplitPoint.END
    return spec


def _unannotate(model: nn.Module, prefix: str) -> None:
    """Undo ``pipelining``'s in-place split annotations (a wrapped ``forward`` on the cut blocks), so the model can
    be traced again for the next micro-batch shape."""
    for block in model.get_submodule(prefix):
        for attr in ("forward", "_orig_forward"):
            block.__dict__.pop(attr, None)


def _drop_parameters(module: nn.Module) -> None:
    """Replace the parameters of a traced submodule by empty placeholders (its values are passed explicitly)."""
    for name, p in list(module.named_parameters(remove_duplicate=False)):
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        sub._parameters[leaf] = nn.Parameter(torch.empty(0, dtype=p.dtype, device=p.device), requires_grad=False)


def stage_program(model: nn.Module, stage: int, stages: int, examples: Sequence[Inputs],
                  balance: Balance = "parameters") -> StageProgram:
    """Stage ``stage`` of ``stages`` of ``model``'s split balanced by ``balance``, traced on the example micro-batch
    inputs when the model is a block stack."""
    if stage_modules(model) is not None:
        return SequentialProgram(model, split_points(model, stages, balance)[stage])
    return TracedProgram(model, stage, stages, examples, balance)
