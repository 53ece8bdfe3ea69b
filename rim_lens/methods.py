"""The training methods rim-lens compares: one object per method holds everything it implies.

A `Method` says how its model is trained (`stages`: layouts, loss weights, steps, LR), how it is
prompted at inference (`prompt`), how many tokens decoding needs (`emitted`), and whether it
reasons in latent states (memory blocks or continuous thoughts). The trainer, the sequence
builder and evaluation ask the method object; none of them compares method names.

A new method is a `Method` subclass in one module that calls `register`; a recipe names it by
`method:`. Modules outside rim-lens are found through `rim_lens.plugins`.

This module sits below the model code (the memory spec validates its method here), so it takes
the sequence builder and the recipe as arguments instead of importing them, and imports torch
only when a run plans its stages.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from rim_lens import plugins
from rim_lens.errors import RunError

# A `rim_lens.model.layouts.SequenceBuilder` and a `training.config.RunConfig`: both live above
# this module, which reads only their attributes.
Builder = Any
Recipe = Any


@dataclass
class Stage:
    """One optimisation phase: its layout of examples, loss weights, steps, LR and dropout, and
    whether its loss runs Coconut's thought passes (`rim_lens.model.coconut`) or one pass."""

    name: str
    steps: int
    lr: float
    dropout: float
    layout: Callable  # Example -> Layout
    weights: Callable  # (batch, progress in [0, 1]) -> [B, S] loss weights
    thought_passes: bool = False
    held_out: Callable | None = None  # the held-out check's layout (None: `layout`)
    largest: Callable | None = None  # the longest `layout` can be (None: `layout`)
    lr_key: str = "train.lr"  # the recipe key of `lr`, for the divergence message


class Method:
    """How a model is trained and prompted. Subclasses set the flags and override what differs;
    the defaults are a direct answer: one stage, the answer right after the question."""

    name: str = ""
    color: str = "#000000"  # in every figure
    uses_blocks = False  # inference appends memory blocks to the question
    uses_thoughts = False  # inference feeds continuous thoughts (last hidden states) back as inputs
    writes_steps = False  # the model writes its reasoning steps before the answer
    decodes_prefix = False  # the model writes the answer prefix itself (the answer follows it)
    grounded = False  # training supervises the blocks with the reasoning steps

    @property
    def latent(self) -> bool:
        """Whether the model reasons in latent states the analyses address as blocks."""
        return self.uses_blocks or self.uses_thoughts

    def __repr__(self) -> str:
        return f"<method {self.name}>"

    def layout(self, builder: Builder) -> Callable:
        """The training layout of one stage: Example -> Layout."""
        return builder.direct

    def stages(self, cfg: Recipe, builder: Builder) -> list[Stage]:
        """The run's training stages, those with no steps left out."""
        t = cfg.train
        return [Stage("train", t.steps, t.lr, t.dropout, self.layout(builder), _plain_weights)]

    def prompt(self, builder: Builder, ex: Any, n_blocks: int | None = None) -> Any:
        """The inference prompt of `ex`: the question, `n_blocks` blocks (default K) if the method
        has blocks, and the answer prefix."""
        seq = builder.question(ex)
        spec = builder.spec
        builder.add_blocks(seq, (spec.K if n_blocks is None else n_blocks) if self.uses_blocks else 0)
        return builder.extend(seq, builder.prefix)

    def emitted(self, builder: Builder, ex: Any) -> int:
        """The tokens decoding must produce after the prompt of `ex`: its answer and end of sequence."""
        return len(builder.encode(ex.answer)) + 1


def _plain_weights(batch: Any, progress: float) -> Any:
    """Every target position weighs 1."""
    return (batch.target_index > 0).float()


class Direct(Method):
    """The answer right after the question."""

    name, color = "direct", "#7f7f7f"


class CoT(Method):
    """The steps written out, then the answer."""

    name, color = "cot", "#1f77b4"
    writes_steps = decodes_prefix = True

    def layout(self, builder: Builder) -> Callable:
        return builder.cot

    def prompt(self, builder: Builder, ex: Any, n_blocks: int | None = None) -> Any:
        return builder.question(ex)

    def emitted(self, builder: Builder, ex: Any) -> int:
        """Its steps, the answer prefix, the answer and end of sequence."""
        return sum(1 for t in builder.cot(ex).target_index if t)


class Pause(Method):
    """Memory blocks trained on the answer only: RiM without grounding (the refinement stage)."""

    name, color = "pause", "#ff7f0e"
    uses_blocks = True

    def refinement(self, cfg: Recipe, builder: Builder, steps: int, lr: float, dropout: float, **kw) -> Stage:
        """The answer read out after every block, weighted by alpha_k; with train.K_choices or
        M_choices each example's K and M are drawn (`varied_budget`)."""
        from rim_lens.schedules import refinement_weights  # imports torch: only when a run trains

        t = cfg.train
        layouts: dict[str, Callable] = {"layout": builder.refinement}
        if t.K_choices or t.M_choices:
            Ks, Ms = t.K_choices or [cfg.memory.K], t.M_choices or [cfg.memory.M]
            layouts = {
                "layout": varied_budget(builder, Ks, Ms, cfg.seed),
                "held_out": builder.refinement,
                "largest": partial(builder.refinement, n_blocks=max(Ks), n_memory=max(Ms)),
            }

        def weights(batch: Any, progress: float) -> Any:
            # Each row's K is its last block (a varied budget gives rows different K).
            return refinement_weights(batch.target_index, batch.blocks.amax(1, keepdim=True), t.alpha)

        return Stage("refinement", steps, lr, dropout, weights=weights, **layouts, **kw)

    def stages(self, cfg: Recipe, builder: Builder) -> list[Stage]:
        t = cfg.train
        return [self.refinement(cfg, builder, t.steps, t.lr, t.dropout)]


class RiM(Pause):
    """Memory blocks grounded on the steps (stage 1), then refined on the answer (stage 2)."""

    name, color = "rim", "#2ca02c"
    grounded = True

    def stages(self, cfg: Recipe, builder: Builder) -> list[Stage]:
        from rim_lens.schedules import grounding_weights  # imports torch: only when a run trains

        t = cfg.train
        stage1 = round(t.steps * t.stage1_fraction)

        def ground(batch: Any, progress: float) -> Any:
            return grounding_weights(batch.target_index, batch.n_steps, progress, t.lambda_hold)

        stages = [
            Stage("grounding", stage1, t.lr, t.dropout, builder.grounding, ground),
            self.refinement(
                cfg, builder, t.steps - stage1, t.stage2_lr, t.stage2_dropout, lr_key="train.stage2_lr"
            ),
        ]
        return [s for s in stages if s.steps > 0]


class Coconut(Method):
    """Continuous thoughts fed back as inputs, the steps replaced by thoughts stage by stage."""

    name, color = "coconut", "#9467bd"
    uses_thoughts = decodes_prefix = True

    def stages(self, cfg: Recipe, builder: Builder) -> list[Stage]:
        """Its curriculum (`schedules.coconut_stage`): stage 0 gets `coconut.cot_fraction` of the
        steps, stages 1..S `coconut.stage_fraction` each, stage S + 1 the rest; all use the
        recipe's LR and dropout, and the loss covers the remaining steps and the answer."""
        from rim_lens.schedules import coconut_stage  # imports torch: only when a run trains

        t, co = cfg.train, cfg.coconut
        per_stage = round(t.steps * co.stage_fraction)
        cot = per_stage if co.cot_fraction is None else round(t.steps * co.cot_fraction)
        stages = []
        for s in range(co.stages + 2):
            n_thoughts, skip = coconut_stage(s, co.c, co.stages)
            steps = cot if s == 0 else per_stage if s <= co.stages else t.steps - cot - per_stage * co.stages
            layout = partial(builder.thoughts, n_thoughts=n_thoughts, skip_steps=skip)
            stages.append(
                Stage(f"stage_{s}", steps, t.lr, t.dropout, layout, _plain_weights, thought_passes=True)
            )
        return [s for s in stages if s.steps > 0]

    def prompt(self, builder: Builder, ex: Any, n_blocks: int | None = None) -> Any:
        """The question, `<bot>`, n thoughts (`n_blocks`, default spec.thoughts) and `<eot>`."""
        seq = builder.question(ex)
        builder.add_thoughts(seq, builder.spec.thoughts if n_blocks is None else n_blocks)
        return seq


def varied_budget(builder: Builder, Ks: list[int], Ms: list[int], seed: int) -> Callable:
    """The refinement layout with each example's K and M drawn uniformly from `Ks` and `Ms`, the
    same for an example in every epoch and run of this seed (drawn from the example's id)."""

    def layout(ex: Any) -> Any:
        rng = random.Random(f"{seed}:{ex.id}")
        return builder.refinement(ex, n_blocks=rng.choice(Ks), n_memory=rng.choice(Ms))

    return layout


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make `method` known by its name to recipes, specs, the trainer and the analyses."""
    if not method.name or method.name in _REGISTRY:
        raise ValueError(f"method name {method.name!r} is empty or taken")
    _REGISTRY[method.name] = method
    return method


def method_names() -> tuple[str, ...]:
    """Every registered method's name, the built-in ones first."""
    plugins.load()
    return tuple(_REGISTRY)


def get_method(name: str) -> Method:
    """The method called `name`; RunError naming the known ones if there is none."""
    if name not in _REGISTRY:
        plugins.load()
    if name not in _REGISTRY:
        raise RunError(f"unknown method {name!r}; choose one of {', '.join(method_names())}")
    return _REGISTRY[name]


def block_methods() -> tuple[str, ...]:
    """The methods whose models append memory blocks to the question."""
    return tuple(name for name in method_names() if _REGISTRY[name].uses_blocks)


def latent_methods() -> tuple[str, ...]:
    """The methods that reason in latent states (blocks or thoughts), grounded ones first: the
    runs a causal report compares side by side."""
    latent = [m for m in map(_REGISTRY.get, method_names()) if m.latent]
    return tuple(m.name for m in sorted(latent, key=lambda m: not m.grounded))


def color_of(name: str | None, default: str | None = None) -> str | None:
    """The figure colour of the method called `name` (`default` for an unknown one)."""
    return _REGISTRY[name].color if name in method_names() else default


DIRECT, COT, PAUSE, RIM, COCONUT = map(register, (Direct(), CoT(), Pause(), RiM(), Coconut()))
# What `make demo` trains: the comparison the paper's claim rests on. Coconut is opt-in there
# (`rim-lens demo --methods ...,coconut`; `make demo-full` trains it) to keep the demo within
# its 15-minute budget on two cores.
DEMO_METHODS: tuple[str, ...] = tuple(m.name for m in (DIRECT, COT, PAUSE, RIM))
