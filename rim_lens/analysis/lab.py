"""The analysis session: one model, its examples, a hook backend, and every analysis as a method.

    import rim_lens as rl

    lab = rl.Lab.open("runs/demo/rim")                      # checkpoint + first 200 test examples
    lab.ablate(blocks=[1], mode="mean").table                # accuracy with block 1 mean-ablated
    lab.patch(layers=[1]).figure()                           # where the answer's information sits
    lab.decode(rl.Patch(from_=lab.examples[1]), blocks=[1])  # greedy answers under an intervention

Every analysis takes the same selection, `layers`, `blocks` (1-based) and `slots` (None: all),
and returns a typed result (`results`) with `.table`, `.figure()`, `.save(dir)` and a `record`
of exactly what was done. The session owns the backend, the sequence builder (which lays out
and collates prompts) and the examples; interventions are fitted on its examples. A capture is
written under the run's `analysis/capture` and reused only while its record matches exactly
(same weights, memory spec, examples, backend and options; see `fingerprint`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rim_lens import artefacts
from rim_lens.analysis import causal, interchange, patching
from rim_lens.analysis.backends import make_backend
from rim_lens.analysis.causal import AblationResult, DecodeResult, EffectResult, KnockoutResult
from rim_lens.analysis.interchange import InterchangeResult
from rim_lens.analysis.interventions import ABLATIONS, Intervention
from rim_lens.analysis.patching import PatchResult
from rim_lens.analysis.registry import analyses, analysis
from rim_lens.analysis.session import Layers, Session
from rim_lens.analysis.sites import Site, block_labels
from rim_lens.artefacts import ABSTRACTION_BASES, PATCH_METHODS
from rim_lens.data import Example, read_examples
from rim_lens.data.tasks import TASK_NAMES, Task, get_task
from rim_lens.errors import RunError
from rim_lens.fileio import read_text
from rim_lens.model.checkpoints import load_checkpoint, load_pretrained
from rim_lens.model.memory import SPEC_FILENAME, MemorySpec
from rim_lens.runs import Run, open_run
from rim_lens.stats import Estimate, proportion

if TYPE_CHECKING:  # these analyses load on first use (scikit-learn, pyvene): `import rim_lens` stays fast
    from rim_lens.analysis.abstraction import AbstractionResult
    from rim_lens.analysis.conditional import ConditionalResult
    from rim_lens.analysis.lens import LensResult
    from rim_lens.analysis.pca import PCAResult
    from rim_lens.analysis.probes import ProbeResult


class Lab(Session):
    """An analysis session over one model: `model`, `tokenizer`, `spec`, `task`, `examples`,
    `backend` ("hf", "tl" or "nnsight"), `builder`, and `run` (the run directory, if any)."""

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        run: str | Path,
        n: int | None = 200,
        backend: str = "hf",
        split: str = "test",
        data: str | Path | None = None,
        examples: Sequence[Example] | None = None,
        spec: MemorySpec | Mapping | str | Path | None = None,
        task: Task | str | None = None,
    ) -> Lab:
        """A run's checkpoint with the first `n` examples (None: all) of its `split`, of the data
        file `data`, or exactly `examples`. `run` may also be a model directory (a run's model/, or
        a Hugging Face directory trained elsewhere: then `spec`, its memory layout as a MemorySpec,
        a dict or a rim_memory.json path, and `data` or `examples` are needed; `task` defaults to
        the spec's)."""
        path = Path(run)
        if (path / "config.json").is_file() and not (path / artefacts.CONFIG).is_file():
            return _open_model_dir(path, n, backend, data, examples, spec, task)
        directory = open_run(run)
        model, tokenizer, spec = load_checkpoint(directory.require(artefacts.MODEL))
        task = get_task(spec.task, **_task_options(directory))
        if examples is None:
            path = Path(data) if data is not None else held_out(directory, split)
            examples, _ = read_examples(path, task.name, task_options=task.options)
            examples = examples[:n] if n else examples
            source = f"{path}" + (f"[:{n}]" if n else "")
        else:
            source = f"{len(examples)} given examples"
        be = make_backend(backend, model, tokenizer, directory.model_dir)
        return cls(model, tokenizer, spec, task, examples, be, run=directory, source=source)

    @classmethod
    def from_model(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        spec: MemorySpec,
        examples: Sequence[Example],
        backend: str = "hf",
        task: Task | None = None,
        model_dir: str | Path | None = None,
        out: str | Path | None = None,
    ) -> Lab:
        """A session over a model in memory (the tl backend also needs its `model_dir`); captures go
        to `out` (default: a new temporary directory)."""
        task = task or get_task(spec.task or examples[0].task)
        be = make_backend(backend, model, tokenizer, model_dir)
        return cls(
            model, tokenizer, spec, task, examples, be, out=out, source=f"{len(examples)} given examples"
        )

    def with_examples(self, examples: Sequence[Example], source: str = "") -> Lab:
        """The same model and backend over other examples (a new session: nothing is shared but
        the model)."""
        source = source or f"{len(examples)} given examples"
        out = self._out if self.run is None else None
        return Lab(
            self.model, self.tokenizer, self.spec, self.task, examples, self.backend, self.run, out, source
        )

    def with_backend(self, backend: str) -> Lab:
        """The same model and examples through another hook backend ("hf", "tl" or "nnsight")."""
        be = make_backend(backend, self.model, self.tokenizer, self.backend.model_dir)
        out = self._out if self.run is None else None
        return Lab(
            self.model, self.tokenizer, self.spec, self.task, self.examples, be, self.run, out, self.source
        )

    def __getattr__(self, name: str) -> Callable[..., Any]:
        """An analysis declared outside the Lab (a plugin's, `registry`), as a method."""
        found = None if name.startswith("_") else analyses().get(name)
        if found is None or found.on_run:
            raise AttributeError(f"'Lab' object has no attribute {name!r}")
        return partial(found.function, self)

    def __repr__(self) -> str:
        where = self.run.path if self.run else "a model in memory"
        spec = self.spec
        K = spec.latent_blocks
        return f"Lab({where}: {spec.method}, K={K}, {len(self.examples)} examples, {self.backend.name})"

    @analysis(
        stems=("pca", "pca_examples", "pca_explained", "pca_input_dependence"),
        example="--layers 2 --blocks 1-4",
        help={"per_slot": "one PCA per slot instead of one over every slot"},
    )
    def pca(
        self, layers: Layers = None, blocks: Layers = None, slots: Layers = None, per_slot: bool = False
    ) -> PCAResult:
        """Per layer, a PCA of the block states (all examples x selected blocks x slots): the mean
        trajectory through the blocks, a few examples', and the input dependence of each block."""
        from rim_lens.analysis import pca

        sel = self.select(layers, blocks, slots, readable=True)
        result = pca.analyse(self.capture().store, sel.layers, sel.blocks, sel.slots, per_slot)
        result.record = self.record("pca", sel, per_slot=per_slot)
        return result

    @analysis(
        stems=("probe_correctness", "probe_values"),
        example="--layers 1-2 --blocks 1-4",
        help={"n_boot": "bootstrap resamples of each interval (default: 1000)"},
    )
    def probe(
        self,
        layers: Layers = None,
        blocks: Layers = None,
        slots: Layers = None,
        seed: int = 0,
        n_boot: int = 1000,
    ) -> ProbeResult:
        """Linear probes per (layer, block) for whether the readout after the block is right and for
        every step's value, each beside a control task (selectivity = score - control)."""
        from rim_lens.analysis import probes

        return probes.analyse(
            self, self.select(layers, blocks, slots, readable=True), seed=seed, n_boot=n_boot
        )

    @analysis(
        "conditional",
        stems=("probe_conditional",),
        example="--layers 2",
    )
    def conditional_probe(
        self,
        train: Sequence[Example] | None = None,
        validation: Sequence[Example] | None = None,
        layers: Layers = None,
        blocks: Layers = None,
        seed: int = 0,
    ) -> ConditionalResult:
        """What each (layer, block) adds to the question's own states about each step's value:
        ridge probes on [question; block] minus on the question, fitted on `train`, chosen on
        `validation` (default: the run's training and validation splits, `conditional.probe_sets`),
        the chosen cell scored on the session's examples (`conditional`)."""
        from rim_lens.analysis import conditional

        if train is None or validation is None:
            sets = conditional.probe_sets(self)
            if sets is None:
                raise RunError(
                    "conditional probes need training and validation examples: pass them, or open a run"
                )
            train, validation = sets
        sel = self.select(layers, blocks, readable=True)
        return conditional.conditional_probe(self, sel, train, validation, seed=seed)

    @analysis(
        stems=("lens", "lens_quality"),
        example="--layers 2 --top-k 3",
        help={
            "top_k": "tokens shown per block state (default: 5)",
            "tuned": "also the tuned lens, fitted on the first half of the examples (default: on)",
        },
    )
    def lens(
        self,
        layers: Layers = None,
        blocks: Layers = None,
        slots: Layers = None,
        top_k: int = 5,
        tuned: bool = True,
    ) -> LensResult:
        """The tokens each block state reads as through the final norm and unembedding (logit lens)
        and, with `tuned`, through a ridge map to the last layer fitted on the first half of the
        examples (tuned lens); both judged on the second half."""
        from rim_lens.analysis import lens

        return lens.analyse(self, self.select(layers, blocks, slots, readable=True), top_k=top_k, tuned=tuned)

    # -- causal ------------------------------------------------------------------------------------
    @analysis(
        stems=("ablate",),
        example="--blocks 1-4 --mode zero --grid",
        choices={"mode": tuple(ABLATIONS)},
        help={"mode": "how blocks are ablated (default: mean)", "grid": "also every single (layer, block)"},
    )
    def ablate(
        self,
        layers: Layers = None,
        blocks: Layers = None,
        slots: Layers = None,
        mode: str | Intervention = "mean",
        grid: bool = False,
        seed: int = 0,
    ) -> AblationResult:
        """Accuracy with block states ablated (`mode`: zero, mean, resample, or an Intervention):
        intact, each block alone, blocks 1..k, all; with `grid` every (layer, block)."""
        return causal.ablate(self, self.select(layers, blocks, slots), mode=mode, grid=grid, seed=seed)

    @analysis(stems=("knockout",), example="--blocks 1-4")
    def knockout(self, layers: Layers = None, blocks: Layers = None, slots: Layers = None) -> KnockoutResult:
        """Accuracy with attention edges removed: the answer cannot see block k, block k cannot see
        earlier blocks (in every layer)."""
        return causal.knockout(self, self.select(layers, blocks, slots))

    @analysis(
        stems=("patch", "patch_sets", "patch_attribution", "patch_edges", "patch_components"),
        example="--layers 1-2 --method attribution",
        choices={"method": PATCH_METHODS},
        help={
            "per_slot": "one cell per (layer, block, slot)",
            "method": "exact (skips unchanged work; hf backend, the default there), full (the same numbers, "
            "whole passes; the default on tl and nnsight), attribution (gradient estimate of every cell and "
            "block-to-block edges; writes patch_attribution.*)",
        },
    )
    def patch(
        self,
        layers: Layers = None,
        blocks: Layers = None,
        slots: Layers = None,
        per_slot: bool = False,
        seed: int = 0,
        method: str | None = None,
        pairs: Sequence[tuple[Example | str, Example | str]] | None = None,
    ) -> PatchResult:
        """Clean block states patched into minimally corrupted runs, per (layer, block[, slot]):
        how much of the clean answer's logit difference comes back. `method`: `exact` (default on
        the hf backend: skips the work a patch leaves unchanged), `full` (the same numbers, whole
        passes; the default on tl and nnsight) or `attribution` (AtP* with its QK fix: a gradient
        estimate of every cell from two forward passes and one backward, with block-to-block edges;
        `AttributionResult`). `pairs`: your own (clean, corrupt) examples or data lines, on any task
        (default: each example minimally corrupted by the task, synthetic tasks only)."""
        sel = self.select(layers, blocks, slots)
        given = patching.given_pairs(self, pairs) if pairs is not None else None
        if patching.patch_method(self, method) == "attribution":
            from rim_lens.analysis.attribution import attribution_patch

            made = patching.make_pairs(self, seed=seed) if given is None else given
            return attribution_patch(self, sel, per_slot=per_slot, seed=seed, pairs=made)
        return patching.patch(self, sel, per_slot=per_slot, seed=seed, method=method, pairs=given)

    @analysis(
        stems=("interchange", "interchange_values"),
        example="--layers 2",
        help={"grid": "every (layer, block) alone, not only every block at once (default: on)"},
    )
    def interchange(
        self,
        layers: Layers = None,
        blocks: Layers = None,
        slots: Layers = None,
        seed: int = 0,
        grid: bool = True,
    ) -> InterchangeResult:
        """Example B given example A's block states: how often B's output becomes A's answer."""
        return interchange.interchange(self, self.select(layers, blocks, slots), seed=seed, grid=grid)

    @analysis(
        stems=("abstraction", "abstraction_pairs"),
        example="--variable step1 --rank 1,2 --joint",
        choices={"method": ABSTRACTION_BASES},
        flags={"method": "basis"},
        help={
            "variable": "one variable, e.g. step1 (default: every one)",
            "method": "the subspace to interchange along (default: das, with the probe map)",
            "rank": "subspace rank(s), e.g. 1,2 (default: 1)",
            "grid": "the map over every site (default: on)",
            "controls": "placebo, arbitrary-target and untrained-model controls (default: on)",
            "joint": "also fit DAS over every slot of several blocks at once (as the report does)",
        },
    )
    def abstraction(
        self,
        variable: str | Sequence[str] | None = None,
        method: str = "das",
        rank: int | Sequence[int] = 1,
        layers: Layers = None,
        blocks: Layers = None,
        slots: Layers = None,
        sites: Sequence[Site] | Mapping[str, Sequence[Site]] | None = None,
        grid: bool = True,
        controls: bool = True,
        seed: int = 0,
        joint: bool = False,
    ) -> AbstractionResult:
        """Causal abstraction: how often interchanging a subspace of a block state between two
        questions gives the answer the task's causal model predicts for that one variable (a step's
        value, the answer) taken from the other question (IIA), per (layer, block, slot). `method`:
        "das" (a learned basis of rank `rank` at the most promising sites, or at `sites`, with
        placebo, arbitrary-target and untrained-model controls), "probe" or "random" (the map over
        every site); see `abstraction`. `rank` may be several (a sweep, chosen on training pairs);
        `joint` fits DAS jointly over every slot of blocks 1..t too (`subspaces.joint_unit`)."""
        from rim_lens.analysis import abstraction

        sel = self.select(layers, blocks, slots)
        return abstraction.abstraction(
            self,
            sel,
            variable,
            method=method,
            rank=rank,
            sites=sites,
            grid=grid,
            controls=controls,
            seed=seed,
            joint=joint,
        )

    def decode(
        self,
        intervention: Intervention | None = None,
        layers: Layers = None,
        blocks: Layers = None,
        slots: Layers = None,
        examples: Sequence[Example] | None = None,
        n_blocks: int | None = None,
        max_new_tokens: int = 32,
    ) -> DecodeResult:
        """Greedy answers of `examples` (default: the session's) with `intervention` at the selected
        sites (none: intact), read out after `n_blocks` blocks (default K)."""
        sel = self.select(layers, blocks, slots) if intervention is not None else None
        return causal.decode_under(self, sel, intervention, examples, n_blocks, max_new_tokens)

    def effect(
        self,
        example: Example,
        intervention: Intervention,
        layers: Layers = None,
        blocks: Layers = None,
        slots: Layers = None,
    ) -> EffectResult:
        """One example read out after every block, intact and under `intervention`."""
        return causal.effect(self, self.select(layers, blocks, slots), example, intervention)

    def readouts(self, example: Example) -> pd.DataFrame:
        """One example's greedy answer read out after each block 1..K: block, readout, correct."""
        self.require_blocks()
        labels = list(block_labels(self.spec.latent_blocks))
        texts = [causal.decode_texts(self, [example], n_blocks=k)[0] for k in labels]
        return pd.DataFrame(
            {
                "block": labels,
                "readout": texts,
                "correct": [bool(self.task.answers_match(t, example.answer)) for t in texts],
            }
        )

    def accuracy(self, examples: Sequence[Example] | None = None) -> Estimate:
        """Teacher-forced exact-match accuracy of the intact model (equal to greedy decoding's),
        with its Wilson interval; works for models without blocks too."""
        from rim_lens.analysis.engine import Variant, score

        correct, _ = score(
            self.backend, self.builder, self.examples if examples is None else examples, [Variant()]
        )
        return proportion(correct[0].numpy())


def _open_model_dir(
    path: Path,
    n: int | None,
    backend: str,
    data: str | Path | None,
    examples: Sequence[Example] | None,
    spec: MemorySpec | Mapping | str | Path | None,
    task: Task | str | None,
) -> Lab:
    """`Lab.open` on a model directory: a rim-lens checkpoint (its rim_memory.json) or a bare
    Hugging Face directory given `spec`; analyses are written to a temporary folder."""
    if spec is None and not (path / SPEC_FILENAME).is_file():
        raise RunError(
            f"{path}: no {SPEC_FILENAME} here, so its memory layout is unknown; pass it: Lab.open(dir, "
            "spec=rl.MemorySpec(K=8, M=2, task='gsm8k') (or a rim_memory.json path), data=FILE)"
        )
    if examples is None and data is None:  # checked before a possibly large model loads
        raise RunError(
            f"{path}: a model directory holds no examples; pass data=FILE (.txt, .jsonl or .json) "
            "or examples=[...] to Lab.open"
        )
    if spec is None:
        model, tokenizer, spec = load_checkpoint(path)
    else:
        if isinstance(spec, str | Path):
            spec = MemorySpec.load(Path(spec).parent if Path(spec).is_file() else spec)
        try:
            spec = spec if isinstance(spec, MemorySpec) else MemorySpec(**spec)
        except TypeError as err:
            raise RunError(f"spec: {err}; give the fields of rl.MemorySpec (K, M, task, ...)") from None
        model, tokenizer = load_pretrained(path, spec)
        model.eval()
    if task is None and not spec.task:
        raise RunError(f"{path}: the memory spec names no task; pass task=, one of {', '.join(TASK_NAMES)}")
    task = task if isinstance(task, Task) else get_task(task or spec.task)
    spec = spec if spec.task else spec.replace(task=task.name)
    if examples is None:
        examples, _ = read_examples(data, task.name, task_options=task.options)
        examples = examples[:n] if n else examples
        source = f"{data}" + (f"[:{n}]" if n else "")
    else:
        source = f"{len(examples)} given examples"
    be = make_backend(backend, model, tokenizer, path)
    return Lab(model, tokenizer, spec, task, examples, be, source=source)


def held_out(run: Run, split: str = "test") -> Path:
    """The data file of a run's split; RunError naming the command that makes it if missing."""
    if split not in artefacts.SPLITS:
        raise RunError(f"unknown split {split!r}; choose one of {', '.join(artefacts.SPLITS)}")
    path = artefacts.split_path(run.path, split)
    return path if path.exists() else run.require(artefacts.split_file(split))


def _task_options(run: Run) -> dict:
    """The task options the run was trained with (e.g. mult's n), from its resolved config."""
    path = run.require(artefacts.CONFIG)
    try:
        config = yaml.safe_load(read_text(path, RunError)) or {}
        return dict((config.get("task") or {}).get("options") or {})
    except (yaml.YAMLError, AttributeError, TypeError, ValueError):
        raise RunError(f"{path}: corrupt run config; train the run again") from None
