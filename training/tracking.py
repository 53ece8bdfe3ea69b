"""Opt-in experiment trackers (`train.report_to`): every record training appends to
train_log.jsonl is mirrored, as it is written, to accelerate's trackers (TensorBoard, Weights &
Biases, MLflow, Trackio). The JSONL stays the source of truth: a tracker only gets a copy."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from rim_lens.runs import Run

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
TRACKER_DIR = "trackers"  # inside the run: where trackers that write files put them


def flat(record: Mapping, prefix: str = "") -> dict[str, float]:
    """The numbers of a log record under slash-separated names, e.g. `readout_accuracy/step_1`."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, Mapping):
            out.update(flat(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


class Mirror:
    """Trackers fed with each log record: a stage's values under `<stage>/<key>` at its step."""

    def __init__(self, names: list[str], run: Run, name: str, config: Mapping) -> None:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        self.trackers = []
        for tracker in names:
            cls = LOGGER_TYPE_TO_CLASS[tracker]
            where = (run.path / TRACKER_DIR,) if cls.requires_logging_directory else ()
            self.trackers.append(cls(name, *where))
        hparams = {key: value if isinstance(value, int | float | str | bool) else str(value)
                   for key, value in _dotted(config).items()}  # fmt: skip
        for tracker in self.trackers:
            tracker.start()
            tracker.store_init_configuration(hparams)

    def __call__(self, record: Mapping) -> None:
        stage = record.get("stage", "train")
        values = {f"{stage}/{key}": v for key, v in flat(record).items() if key != "step"}
        for tracker in self.trackers:
            tracker.log(values, step=int(record.get("step", 0)))

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


def _dotted(config: Mapping, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@contextlib.contextmanager
def mirrored(run: Run, names: list[str], name: str, config: Mapping, main: bool = True) -> Iterator[None]:
    """Within the block, `run.log` also feeds the trackers `names` (main process only)."""
    if not names or not main:
        yield
        return
    run.mirror = Mirror(names, run, name, config)
    try:
        yield
    finally:
        run.mirror.finish()
        run.mirror = None
