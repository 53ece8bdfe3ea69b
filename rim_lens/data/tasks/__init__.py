"""The task registry: `get_task(name, **options)`, and telling a task from an iCoT line."""

from __future__ import annotations

from rim_lens.data.tasks.base import SyntheticTask, Task
from rim_lens.data.tasks.gsm8k import Gsm8k
from rim_lens.data.tasks.modchain import ModChain
from rim_lens.data.tasks.mult import Mult
from rim_lens.data.tasks.prosqa import ProsQA
from rim_lens.errors import ConfigError, clip

# In the order `infer_task` tries them.
_TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (Mult, ModChain, Gsm8k, ProsQA)}
TASK_NAMES: tuple[str, ...] = tuple(_TASKS)

__all__ = ["TASK_NAMES", "SyntheticTask", "Task", "get_task", "infer_task"]


def get_task(name: str, **options) -> Task:
    """The task `name` with `options`; ConfigError naming an unknown task or option."""
    cls = _task_class(name)
    unknown = sorted(set(options) - set(cls.option_names))
    if unknown:
        valid = ", ".join(cls.option_names) or "none"
        raise ConfigError(f"task {name} has no option {clip(repr(unknown[0]))} (options: {valid})")
    return cls(**options)


def infer_task(line: str, name: str | None = None, **options) -> Task | None:
    """The task that reads iCoT `line`: `name` if given, else guessed from the line (None if no guess).

    Options the line implies (mult's n, modchain's modulus) fill in those not given.
    """
    classes = [_task_class(name)] if name is not None else _TASKS.values()
    for cls in classes:
        implied = cls.options_from_line(line)
        if implied is not None:
            return get_task(cls.name, **{**implied, **options})
    return get_task(name, **options) if name is not None else None


def _task_class(name: str) -> type[Task]:
    if name not in _TASKS:
        raise ConfigError(f"unknown task {clip(repr(name))}; valid tasks: {', '.join(TASK_NAMES)}")
    return _TASKS[name]
