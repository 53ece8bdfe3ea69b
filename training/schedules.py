"""The loss-weight schedules moved to `rim_lens.schedules` (the methods plan their stages there);
this name stays for the notebooks that import it."""

from rim_lens.schedules import (
    block_weights,
    coconut_stage,
    grounding_weights,
    refinement_weights,
    step_weights,
)

__all__ = ["block_weights", "coconut_stage", "grounding_weights", "refinement_weights", "step_weights"]
