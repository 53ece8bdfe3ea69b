"""CLI command groups; each module exposes `register(subparsers)`."""
from rim_lens.commands import analyze, dashboard, data, demo, train

REGISTRY = [data.register, train.register, demo.register, analyze.register, dashboard.register]
