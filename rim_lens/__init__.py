"""rim-lens: train Reasoning-in-Memory models and test whether their memory blocks carry the reasoning.

Start from `rim_lens.analysis.lab.Lab.open(run_dir)` for analyses, `training.trainer.train` for training,
or the `rim-lens` command line. Submodules are imported on demand so the CLI starts fast.
"""

__version__ = "0.1.0"
