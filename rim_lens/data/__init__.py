"""Data: examples, their file formats, the tasks that define them, and clean splits."""

from rim_lens.data.examples import Example
from rim_lens.data.formats import read_examples, write_examples
from rim_lens.data.splits import Splits, make_splits
from rim_lens.data.tasks import TASK_NAMES, SyntheticTask, Task, get_task, infer_task

__all__ = [
    "TASK_NAMES",
    "Example",
    "Splits",
    "SyntheticTask",
    "Task",
    "get_task",
    "infer_task",
    "make_splits",
    "read_examples",
    "write_examples",
]
