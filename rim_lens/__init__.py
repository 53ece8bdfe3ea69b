"""rim-lens: train Reasoning-in-Memory models and test whether their memory blocks carry the reasoning.

    import rim_lens as rl

    lab = rl.Lab.open("runs/demo/rim")
    lab.ablate(blocks=[1], mode="mean").table

Names are imported on first use, so `import rim_lens` (and the `rim-lens` command) start fast.
Training lives in `training.trainer.train`; the command line is `rim-lens`.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "Lab": "rim_lens.analysis.lab",
    "Selection": "rim_lens.analysis.sites",
    "Site": "rim_lens.analysis.sites",
    "BlockStates": "rim_lens.analysis.sites",
    "Intervention": "rim_lens.analysis.interventions",
    "Zero": "rim_lens.analysis.interventions",
    "Mean": "rim_lens.analysis.interventions",
    "Resample": "rim_lens.analysis.interventions",
    "Patch": "rim_lens.analysis.interventions",
    "Add": "rim_lens.analysis.interventions",
    "Knockout": "rim_lens.analysis.engine",
    "Result": "rim_lens.analysis.results",
    "build_report": "rim_lens.analysis.report",
    "calibrate": "rim_lens.analysis.calibration",
    "planted": "rim_lens.analysis.planted",
    "Estimate": "rim_lens.stats",
    "Method": "rim_lens.methods",
    "get_method": "rim_lens.methods",
    "MemorySpec": "rim_lens.model.memory",
    "Example": "rim_lens.data.examples",
    "get_task": "rim_lens.data.tasks",
    "read_examples": "rim_lens.data.formats",
    "load_checkpoint": "rim_lens.model.checkpoints",
    "evaluate": "rim_lens.evaluation",
    "RimLensError": "rim_lens.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rim_lens' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
