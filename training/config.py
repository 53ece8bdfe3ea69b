"""Training recipes: YAML files validated against typed sections.

Every key is a dataclass field; its checks (choices, bounds, a check function) sit in the
field's metadata, so the schema and the defaults are one place. An unknown key or a bad value is
reported as `file:line: key: problem`, one line, exit 2. Data paths in a recipe are relative to
the recipe file; paths given with `--set` are relative to the working directory. Both are stored
absolute in the resolved config.
"""

from __future__ import annotations

import dataclasses
import difflib
import filecmp
import itertools
import math
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from rim_lens.data.examples import Example
from rim_lens.data.tasks import TASK_NAMES, get_task
from rim_lens.errors import ConfigError, RimLensError, clip, size_text
from rim_lens.fileio import read_text
from rim_lens.methods import RIM, get_method, method_names
from rim_lens.model.memory import TRAINING_FIELDS, MemorySpec
from rim_lens.runs import check_name
from training.overrides import check_depth, merge, parse_overrides

MAX_RECIPE = 1 << 20  # characters: a recipe is a few dozen lines
# Machine limits of numeric keys, used by the recipe's fields below and by the CLI's --seed options.
SEEDS = (0, 2**32 - 1)  # numpy's and torch's seeds are unsigned 32-bit
MAX_THREADS = 1024  # above this a value is a typo; above the CPU count, training warns and clamps


def rule(default: Any = dataclasses.MISSING, *, factory: Callable | None = None, **checks: Any) -> Any:
    """A recipe key: its default and its checks, kept in the field's metadata.

    Checks: `choices` (a tuple, or a function returning one), `min` and `max` (inclusive), `check`
    (a function of the value returning a problem or None), `path` (a data file: resolved against
    the recipe's folder).
    """
    if factory is not None:
        return field(default_factory=factory, metadata=checks)
    return field(default=default, metadata=checks)


def _presets() -> tuple[str, ...]:
    from rim_lens.model.checkpoints import PRESETS  # imports torch: only when a recipe is checked

    return tuple(PRESETS)


def _run_name(value: str) -> str | None:
    try:
        check_name(value, "name") if value else None
    except ConfigError as err:
        return str(err).removeprefix("name: ")
    return None


def _counts(least: int) -> Callable[[list[int]], str | None]:
    """A check: a non-empty list of whole numbers, each at least `least`."""

    def check(value: list[int]) -> str | None:
        if not value or min(value) < least:
            return f"expected a non-empty list of whole numbers >= {least}, got {clip(repr(value))}"
        return None

    return check


def _trackers(value: list[str]) -> str | None:
    """A check: names of experiment trackers rim-lens mirrors its training log to."""
    from training.tracking import TRACKERS

    unknown = [name for name in value if name not in TRACKERS]
    if unknown:
        return f"unknown tracker {clip(repr(unknown[0]))}; choose from {', '.join(TRACKERS)}"
    return None


def _source(value: int | str) -> str | None:
    if isinstance(value, str) and not value.strip():
        return "expected a data file or a number of examples, got an empty string"
    if isinstance(value, int) and value < 1:
        return f"must be >= 1 examples, got {value}"
    return None


def _text(value: str | None) -> str | None:
    if value is not None and not value.strip():
        return "must not be empty"
    return None


@dataclass
class TaskConfig:
    name: str = rule("mult", choices=TASK_NAMES)
    options: dict = rule(factory=dict)  # checked by the task itself (see `_cross_checks`)


@dataclass
class DataConfig:
    """Each split is a data file or a number: generated (synthetic tasks) or held out of the
    training file. The three are disjoint by the task's canonical question key."""

    train: int | str = rule(20000, check=_source, path=True)
    val: int | str = rule(500, check=_source, path=True)  # every setting is chosen on this split
    test: int | str = rule(500, check=_source, path=True)  # scored once, at the end
    seed: int = rule(1234, min=SEEDS[0], max=SEEDS[1])
    skip_invalid: bool = False


@dataclass
class ModelConfig:
    arch: str = rule("gpt2", choices=("gpt2", "llama"))
    preset: str = rule("small", choices=_presets)
    # A local HF causal-LM directory (or hub id, online only); relative to the working directory.
    pretrained: str | None = rule(None, check=_text)
    trust_remote_code: bool = False
    max_positions: int = rule(256, min=8)
    lora: dict | None = None  # peft.LoraConfig fields, e.g. {r: 16, lora_alpha: 32}; pretrained only


@dataclass
class TrainConfig:
    steps: int = rule(1000, min=1)  # optimizer steps, all stages together: the budget every method gets
    batch_size: int = rule(128, min=1)
    lr: float = rule(1e-3, min=0.0)
    lr_schedule: str = rule("constant", choices=("constant", "cosine"))  # after linear warm-up
    warmup: float = rule(0.04, min=0.0, max=1.0)  # fraction of each stage's steps
    weight_decay: float = rule(0.0, min=0.0)
    dropout: float = rule(0.0, min=0.0, max=1.0)
    grad_clip: float = rule(1.0, min=0.0)
    # RiM only
    stage1_fraction: float = rule(0.6, min=0.0, max=1.0)
    stage2_lr: float = rule(5e-4, min=0.0)
    stage2_dropout: float = rule(0.1, min=0.0, max=1.0)
    lambda_hold: float = rule(0.3, min=0.0, max=1.0)  # fraction of stage 1 with every step weight at 1
    alpha: str = rule("linear", choices=("linear", "uniform"))  # stage-2 block weights: alpha_k ~ k, or equal
    # RiM's stage 2 and pause: each training example's K and M drawn from these lists (the method's
    # remedy for budgets never trained on); null: memory.K, memory.M. Inference uses memory.K, M.
    K_choices: list[int] | None = rule(None, check=_counts(1))
    M_choices: list[int] | None = rule(None, check=_counts(0))
    log_every: int = rule(25, min=1)
    eval_every: int = rule(100, min=1)
    # A resumable checkpoint every this many optimizer steps, and at the end of every stage (0: only
    # when the run is stopped by SIGTERM or Ctrl-C).
    checkpoint_every: int = rule(100, min=0)
    # Keep the model of every periodic checkpoint under snapshots/ (from-scratch models): the
    # training dynamics, analysed with the same tools as the final model.
    snapshots: bool = False
    threads: int | None = rule(None, min=1, max=MAX_THREADS)
    precision: str = rule("fp32", choices=("fp32", "bf16", "fp16"))  # bf16 / fp16: autocast via accelerate
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more time
    length_bucketing: bool = True  # batches of similar length (less padding); false: uniform batches
    # Experiment trackers mirroring train_log.jsonl (training/tracking.py): e.g. [tensorboard]
    report_to: list[str] = rule(factory=list, check=_trackers)


@dataclass
class CoconutConfig:
    """Coconut's curriculum (method coconut only; schedules.coconut_stage): stage 0 is CoT, stage
    s = 1..stages replaces the first s steps with s x c continuous thoughts, a last stage keeps
    stages x c thoughts and drops every remaining step. Stage 0 gets `cot_fraction` of
    train.steps (default: `stage_fraction`), stages 1..stages `stage_fraction` each, the last
    stage the rest. Paper: c = 2, stages = 3 on GSM8K; c = 1, stages = 6 on ProsQA. Inference
    uses stages x c thoughts."""

    c: int = rule(2, min=1)
    stages: int = rule(3, min=1)
    stage_fraction: float = rule(0.12, min=0.0, max=1.0)  # the reference's GSM8K schedule: 3 of 25 epochs
    # The reference's GSM8K run starts from a separately trained CoT model (its ProsQA run trains
    # stage 0 like the others); a larger stage 0 is that protocol within one step budget.
    cot_fraction: float | None = rule(None, min=0.0, max=1.0)


@dataclass
class EvalConfig:
    n: int | None = rule(
        None, min=1
    )  # evaluate on the first n examples of each held-out split (all if unset)
    score_test: bool = True  # false while searching settings: only the validation split is scored
    batch_size: int = rule(256, min=1)
    latency_examples: int = rule(20, min=0)
    max_new_tokens: int | None = rule(None, min=1)  # unset: the longest train/val target plus a margin


@dataclass
class RunConfig:
    method: str = rule(RIM.name, choices=method_names)
    name: str = rule("", check=_run_name)
    seed: int = rule(0, min=SEEDS[0], max=SEEDS[1])
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemorySpec = field(default_factory=MemorySpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    coconut: CoconutConfig = field(default_factory=CoconutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in TRAINING_FIELDS:
            del d["memory"][key]
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Keys a resumed run may change: they do not alter what is computed.
RESUMABLE_CHANGES = ("train.threads", "train.checkpoint_every", "train.report_to")
# Keys (or key prefixes) only some methods read, with the `Method` property that says which
# (`Method.stages`, trainer.run_spec): changing one is no change of recipe for another method's run,
# so a demo keeps its baselines when RiM's schedule moves.
METHOD_KEYS: dict[str, str] = {
    "train.stage1_fraction": "grounded",
    "train.stage2_lr": "grounded",
    "train.stage2_dropout": "grounded",
    "train.lambda_hold": "grounded",
    "train.alpha": "uses_blocks",
    "train.K_choices": "uses_blocks",
    "train.M_choices": "uses_blocks",
    "coconut.": "uses_thoughts",
}


def reads(method: str, key: str) -> bool:
    """Whether a run of `method` reads the dotted recipe key `key`."""
    m = get_method(method)
    return all(getattr(m, prop) for prefix, prop in METHOD_KEYS.items() if key.startswith(prefix))


def differences(a: RunConfig, b: RunConfig) -> list[str]:
    """Dotted keys whose values differ between two configs (those a resume may change, and those
    the method does not read, excluded)."""

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and k not in ("options", "lora"):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    fa, fb = flat(a.to_dict()), flat(b.to_dict())
    return [
        k
        for k in fa
        if fa[k] != fb.get(k)
        and k not in RESUMABLE_CHANGES
        and not (a.method == b.method and not reads(a.method, k))
        and not _same_file(fa[k], fb.get(k))
    ]


def _same_file(a: object, b: object) -> bool:
    """Whether two data settings name files with the same bytes: a runs folder that was moved or
    copied keeps its runs' data under a new path, and that is no change of recipe."""
    if not (isinstance(a, str) and isinstance(b, str) and Path(a).is_file() and Path(b).is_file()):
        return False
    return filecmp.cmp(a, b, shallow=False)


# -- checking ------------------------------------------------------------------------------------
def _where(source: str, lines: dict[str, int], key: str) -> str:
    line = lines.get(key)
    return f"{source}:{line}" if line else source


def _line_numbers(node: yaml.Node, source: str, prefix: str = "") -> dict[str, int]:
    """Dotted key -> 1-based line of that key in the YAML text; ConfigError on a repeated key."""
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            line = key_node.start_mark.line + 1
            if key in out:
                raise ConfigError(
                    f"{source}:{line}: key '{clip(key)}' given twice (first on line {out[key]})"
                )
            out[key] = line
            out.update(_line_numbers(value_node, source, key + "."))
    return out


def _check_type(value: Any, annotation: Any) -> Any:
    """`value` coerced to the annotated type, or TypeError."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None and type(None) in options:
        return None
    for option in options:
        number = None
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif option is float and isinstance(value, str):
            # PyYAML reads exponent notation without a dot ("1e-4") as a string.
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise TypeError(f"expected a finite number, got {clip(value)}")
            return number
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option in (str, bool, dict) and isinstance(value, option):
            return value
        if typing.get_origin(option) is list and isinstance(value, list):
            (item,) = typing.get_args(option)
            return [_check_type(v, item) for v in value]
    names = " or ".join(getattr(o, "__name__", str(o)).replace("NoneType", "null") for o in options)
    raise TypeError(f"expected {names}, got {clip(repr(value))}")


def _check_rules(value: Any, checks: typing.Mapping[str, Any]) -> str | None:
    """The problem with `value` under a field's checks, or None."""
    if value is None:
        return None
    choices = checks.get("choices")
    if choices is not None:
        choices = choices() if callable(choices) else choices
        if value not in choices:
            return f"must be one of {', '.join(map(str, choices))}; got {clip(repr(value))}"
    lo, hi = checks.get("min"), checks.get("max")
    if isinstance(value, (int, float)) and (
        (lo is not None and value < lo) or (hi is not None and value > hi)
    ):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        return f"must be {bound}, got {value!r}"
    token = checks.get("token")  # "word": no whitespace at all; "text": spaces allowed
    if token:
        banned = [c for c in value if c.isspace() and (token == "word" or c != " ")]
        if not value.strip() or len(value) > 64 or banned:
            spaces = "whitespace" if token == "word" else "line breaks or tabs"
            return (
                f"expected a token of 1-64 characters, not blank, without {spaces}; got {clip(repr(value))}"
            )
    check = checks.get("check")
    return check(value) if check is not None else None


@dataclass
class _Context:
    """Where the raw recipe came from, for messages and for resolving relative data paths."""

    source: str
    lines: dict[str, int]
    recipe_dir: Path | None  # relative paths of keys from the recipe file resolve here
    from_set: Callable[[str], bool]  # whether a key's value came from --set


def _build(cls: type, raw: Any, path: str, ctx: _Context) -> Any:
    if not isinstance(raw, dict):
        what = path or "recipe"
        raise ConfigError(
            f"{_where(ctx.source, ctx.lines, path)}: {what}: expected a mapping, got {clip(repr(raw))}"
        )
    fields = {
        f.name: f for f in dataclasses.fields(cls) if not (cls is MemorySpec and f.name in TRAINING_FIELDS)
    }
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{path}.{key}" if path else str(key)
        where = _where(ctx.source, ctx.lines, dotted)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            guess = f"did you mean '{close[0]}'? " if close else ""
            keys = clip(", ".join(sorted(fields)), 130)
            raise ConfigError(f"{where}: unknown key '{clip(dotted)}' ({guess}expected one of: {keys})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, dotted, ctx)
            continue
        try:
            value = _check_type(value, hint)
        except TypeError as err:
            raise ConfigError(f"{where}: {dotted}: {err}") from None
        checks = fields[key].metadata
        problem = _check_rules(value, checks)
        if problem:
            raise ConfigError(f"{where}: {dotted}: {problem}")
        if checks.get("path") and isinstance(value, str):
            base = Path.cwd() if ctx.recipe_dir is None or ctx.from_set(dotted) else ctx.recipe_dir
            value = str((base / Path(value).expanduser()).resolve())
        kwargs[key] = value
    return cls(**kwargs)


def _cross_checks(config: RunConfig, ctx: _Context) -> None:
    """Checks that involve more than one key."""
    where = partial(_where, ctx.source, ctx.lines)
    try:
        get_task(config.task.name, **config.task.options)
    except RimLensError as err:
        raise ConfigError(f"{where('task.options')}: task.options: {err}") from None
    tokens = special_tokens(config.memory)
    for (key, token), (other, other_token) in itertools.combinations(tokens.items(), 2):
        if key in ctx.lines and other not in ctx.lines:  # name the key the recipe sets
            (key, token), (other, other_token) = (other, other_token), (key, token)
        if token in other_token or other_token in token:
            same = "is also" if token == other_token else "overlaps"
            raise ConfigError(
                f"{where(other)}: {other}: {clip(repr(other_token))} {same} {key} ({clip(repr(token))}); "
                f"the special tokens ({', '.join(k.split('.')[1] for k in tokens)}) must all differ"
            )
    if config.train.snapshots and config.model.lora is not None:
        raise ConfigError(
            f"{where('train.snapshots')}: train.snapshots: not available with "
            "model.lora (a LoRA model is merged only once training ends); set it to false"
        )
    if config.model.lora is not None:
        _check_lora(config.model.lora, where("model.lora"), config.model.pretrained)
    co = config.coconut
    cot = co.stage_fraction if co.cot_fraction is None else co.cot_fraction
    if cot + co.stages * co.stage_fraction > 1.0 + 1e-9:
        raise ConfigError(
            f"{where('coconut.stage_fraction')}: coconut.stage_fraction: stages "
            f"0..{co.stages} take more than all the steps ({cot} + {co.stages} x {co.stage_fraction} > 1)"
        )
    if config.model.pretrained is None:  # a pretrained model's limits are checked once it is loaded
        _check_model_memory(config.model, where("model.max_positions"))
        key, problem = layout_problem(config, config.model.max_positions)
        if problem:
            raise ConfigError(f"{where(key)}: {problem}; or raise model.max_positions")


def _check_model_memory(model: ModelConfig, where: str) -> None:
    """ConfigError if training a from-scratch model of this size needs more memory than the machine has
    (GPT-2's position embeddings grow with model.max_positions), before anything is allocated."""
    import psutil

    from rim_lens.model.checkpoints import PRESETS, TRAIN_BYTES_PER_PARAMETER, parameter_count

    total = psutil.virtual_memory().total
    need = parameter_count(model.arch, model.preset, model.max_positions) * TRAIN_BYTES_PER_PARAMETER
    if need > total:
        width = PRESETS[model.preset][1]
        fits = (total // TRAIN_BYTES_PER_PARAMETER - parameter_count(model.arch, model.preset, 0)) // width
        raise ConfigError(
            f"{where}: model.max_positions: {model.max_positions:,} positions need about "
            f"{size_text(need)} to train a {model.arch} {model.preset} model "
            f"({TRAIN_BYTES_PER_PARAMETER} bytes a parameter), "
            f"more than this machine's {size_text(total)}; use at most {max(fits, 0):,}"
        )


def special_tokens(memory: MemorySpec) -> dict[str, str]:
    """The memory section's special tokens by dotted key (block and Coconut tokens, answer prefix)."""
    return {
        f"memory.{f.name}": getattr(memory, f.name)
        for f in dataclasses.fields(memory)
        if "token" in f.metadata
    }


def check_data_tokens(
    config: RunConfig, spec: MemorySpec, splits: Sequence[tuple[str, Sequence[Example]]]
) -> None:
    """ConfigError if a token the method adds (its block or thought tokens, the answer prefix)
    occurs in the data: a layout in which memory and data cannot be told apart."""
    keys = {v: k for k, v in special_tokens(config.memory).items()}
    tokens = [*spec.special_tokens, spec.answer_prefix]
    for split, examples in splits:
        for ex in examples:
            for text in (ex.question, *ex.steps, ex.answer):
                for token in tokens:
                    if token in text:
                        raise ConfigError(
                            f"{keys[token]}: {clip(repr(token))} occurs in the data ({split} example "
                            f"{clip(ex.id, 30)}: {clip(repr(text), 50)}); choose a token the data never "
                            "contains"
                        )


def layout_problem(config: RunConfig, limit: int) -> tuple[str, str | None]:
    """The key and the problem if the memory layout alone (no data) takes `limit` positions or
    more: K blocks of M + 2 tokens (the largest of train.K_choices x M_choices), grounding's
    step_offset + 1 blocks, or Coconut's thoughts between <bot> and <eot>. Plain arithmetic, so
    a huge value is refused before any sequence is built."""
    m, t, method = config.memory, config.train, get_method(config.method)
    spans = []
    if method.uses_blocks:
        K, M = max(t.K_choices or [m.K]), max(t.M_choices or [m.M])
        spans.append(("memory.K", K * (M + 2), f"{K} blocks of {M} + 2 tokens"))
    if method.grounded:
        spans.append(
            ("memory.step_offset", (m.step_offset + 1) * (m.M + 2), f"step_offset {m.step_offset} + 1 blocks")
        )
    if method.uses_thoughts:
        co = config.coconut
        spans.append(("coconut.c", co.c * co.stages + 2, f"{co.c} x {co.stages} thoughts, <bot> and <eot>"))
    for key, need, what in spans:
        if need >= limit:
            problem = (
                f"the memory layout alone takes {need:,} positions ({what}) but the model takes {limit:,}"
            )
            return key, f"{key}: {problem}; use a smaller {key.split('.')[1]}"
    return "", None


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> RunConfig:
    """A validated RunConfig from a YAML recipe (or defaults) plus `key=value` overrides."""
    raw: dict = {}
    lines: dict[str, int] = {}
    source = str(path) if path else "<defaults>"
    if path is not None:
        try:
            text = read_text(path, ConfigError, limit=MAX_RECIPE)
        except ConfigError as err:
            raise ConfigError(f"cannot read recipe {err}; give the path of a YAML recipe") from None
        try:
            check_depth(text, str(path))
            node = yaml.compose(text)
            raw = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: invalid YAML ({getattr(err, 'problem', None) or err})") from None
        raw = {} if raw is None else raw
        lines = _line_numbers(node, source) if node is not None else {}
    extra: dict = {}
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: a recipe must be a mapping of keys, got {clip(repr(raw))}")
        raw = merge(raw, extra)
        lines = {k: v for k, v in lines.items() if not _covered(k, extra)}
        source = f"{source} (with --set)" if path else "--set"
    ctx = _Context(
        source,
        lines,
        Path(path).resolve().parent if path is not None else None,
        lambda key: _covered(key, extra),
    )
    config = _build(RunConfig, raw, "", ctx)
    _cross_checks(config, ctx)
    return config


def _check_lora(lora: dict, where: str, pretrained: str | None) -> None:
    """LoRA options must be peft.LoraConfig fields (checked here, not after the model loads)."""
    if pretrained is None:
        raise ConfigError(f"{where}: model.lora: LoRA needs model.pretrained (a pretrained model to adapt)")
    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(map(str, set(lora) - known))
    if unknown:
        raise ConfigError(
            f"{where}: model.lora: unknown LoraConfig field(s) {clip(', '.join(unknown))} "
            "(e.g. r, lora_alpha, lora_dropout, target_modules)"
        )


def _covered(key: str, extra: dict) -> bool:
    node: Any = extra
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True
