"""Named interventions: how a block state is changed (where is a `sites.Selection`).

As in pyvene, where to intervene is data and how is a named class. Each intervention maps the
state at a site (`base`, [N, d_model]: the rows' current states there) to a new one:

    Zero()                     zeros
    Mean()                     the state's mean over the session's examples
    Resample(seed=0)           the state of another of the session's examples (a random one)
    Patch(from_=examples)      the state of the given example(s) (one per target, or one for all)
    Add(vector, scale=1.0)     base + scale * vector (activation addition)

`to_dict()` records exactly what was done (every result carries it) and `from_dict` rebuilds it.
To write your own, subclass `Intervention`: set `kind`, define `__call__(base, site, rows)`, and
`fit(context)` if it needs states of other examples (learned attributes end in `_`):

    class Scale(Intervention):
        kind = "scale"

        def __init__(self, factor: float) -> None:
            self.factor = factor

        def __call__(self, base, site, rows):
            return self.factor * base
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from rim_lens.analysis.sites import BlockStates, Selection, Site
from rim_lens.data.examples import Example
from rim_lens.errors import ConfigError, RunError

_KINDS: dict[str, type[Intervention]] = {}


@dataclass
class Context:
    """What `Intervention.fit` may use: the examples intervened on (`targets`), the session's
    examples (`population`), the selection, and `states(examples)`, their clean block states."""

    targets: list[Example]
    population: list[Example]
    selection: Selection
    states: Callable[[Sequence[Example]], BlockStates]

    def example(self, key: Example | str) -> Example:
        """An example given as itself or by its id (looked up among population and targets)."""
        if isinstance(key, Example):
            return key
        found = next((ex for ex in [*self.population, *self.targets] if ex.id == key), None)
        if found is None:
            raise RunError(f"no example with id {key!r} among this session's examples")
        return found


class Intervention:
    """How to change the state at a site. Subclasses set `kind` (a unique name) and `__call__`."""

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _KINDS[cls.kind] = cls

    def fit(self, context: Context) -> Intervention:
        """Learn what `__call__` needs from other examples' states; returns self."""
        return self

    def __call__(self, base: torch.Tensor, site: Site, rows: torch.Tensor) -> torch.Tensor:
        """New states [N, d] for the current ones `base` at `site`, rows = indices of the targets."""
        raise NotImplementedError

    def params(self) -> dict:
        """The constructor arguments, as `to_dict` records them (default: same-named attributes)."""
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        parameters = inspect.signature(type(self).__init__).parameters.values()
        return {
            p.name: _plain(getattr(self, p.name)) for p in parameters if p.name != "self" and p.kind in named
        }

    def to_dict(self) -> dict:
        return {"kind": self.kind, **self.params()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"

    @staticmethod
    def from_dict(d: dict) -> Intervention:
        """The intervention a `to_dict()` describes."""
        kind = d.get("kind")
        if kind not in _KINDS:
            raise ConfigError(f"unknown intervention {kind!r}; known: {', '.join(sorted(_KINDS))}")
        return _KINDS[kind](**{k: v for k, v in d.items() if k != "kind"})


def _plain(value):
    """A JSON-friendly copy of a parameter (tensors and examples by value and id)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Example):
        return value.id
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class Zero(Intervention):
    """Set the state to zero."""

    kind = "zero"

    def __call__(self, base, site, rows):
        return torch.zeros_like(base)


class Mean(Intervention):
    """Set the state to its mean over the session's examples: what is specific to the input goes,
    the block's typical state stays."""

    kind = "mean"

    def fit(self, context: Context) -> Mean:
        states = context.states(context.population)
        self.mean_ = BlockStates(states.states.mean(0, keepdim=True), states.layers, states.slots)
        return self

    def __call__(self, base, site, rows):
        return self.mean_.at(*site).expand(len(rows), -1)


class Resample(Intervention):
    """Set the state to that of another example of the session, drawn at random per target (never
    one with the target's question)."""

    kind = "resample"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def fit(self, context: Context) -> Resample:
        population, n = context.population, len(context.population)
        if len({ex.question for ex in population}) < 2:
            raise RunError("resample needs at least two different questions among the examples")
        gen = torch.Generator().manual_seed(self.seed)
        # Target i starts from population member i + a random shift of 1..n-1, so when the targets
        # are the population nobody draws themselves; a donor with the target's question is skipped.
        shifts = torch.randint(1, max(n, 2), (len(context.targets),), generator=gen).tolist()
        donors = []
        for i, (target, shift) in enumerate(zip(context.targets, shifts)):
            donor = (i + shift) % n
            while population[donor].question == target.question:
                donor = (donor + 1) % n
            donors.append(donor)
        self.donors_ = torch.tensor(donors)
        self.states_ = context.states(population)
        return self

    def __call__(self, base, site, rows):
        return self.states_.at(*site)[self.donors_[rows]]


class Patch(Intervention):
    """Set the state to that of a source example: `from_` is one example (for every target) or one
    per target, given as examples or ids."""

    kind = "patch"

    def __init__(self, from_: Example | str | Sequence[Example | str]) -> None:
        self.from_ = from_

    def params(self) -> dict:
        sources = self.from_ if isinstance(self.from_, list | tuple) else [self.from_]
        return {"from_": [_plain(s) for s in sources]}

    def fit(self, context: Context) -> Patch:
        sources = self.from_ if isinstance(self.from_, list | tuple) else [self.from_]
        sources = [context.example(s) for s in sources]
        if len(sources) not in (1, len(context.targets)):
            raise RunError(
                f"patch: {len(sources)} source examples for {len(context.targets)} targets "
                "(give one source, or one per target)"
            )
        self.states_ = context.states(sources)
        return self

    def __call__(self, base, site, rows):
        states = self.states_.at(*site)
        return states[rows] if len(states) > 1 else states.expand(len(rows), -1)


class Add(Intervention):
    """Add `scale * vector` ([d_model]) to the state: activation addition (steering)."""

    kind = "add"

    def __init__(self, vector: torch.Tensor | Sequence[float], scale: float = 1.0) -> None:
        self.vector = torch.as_tensor(vector, dtype=torch.float32)
        self.scale = scale

    def __call__(self, base, site, rows):
        if self.vector.shape != base.shape[-1:]:
            raise RunError(
                f"add: the vector has shape {tuple(self.vector.shape)}, states have {base.shape[-1]}"
            )
        return base + self.scale * self.vector.to(base.dtype)


ABLATIONS: dict[str, type[Intervention]] = {"zero": Zero, "mean": Mean, "resample": Resample}


def ablation(mode: str | Intervention, seed: int = 0) -> Intervention:
    """The intervention called `mode` (zero, mean, resample), or `mode` itself if it is one."""
    if isinstance(mode, Intervention):
        return mode
    if mode not in ABLATIONS:
        raise RunError(f"unknown ablation mode {mode!r}; choose one of {', '.join(ABLATIONS)}")
    return Resample(seed) if mode == "resample" else ABLATIONS[mode]()
