"""Analyses of memory blocks: hook backends, capture, interventions, probes, lens, PCA, report.

Start from `rim_lens.Lab`."""
