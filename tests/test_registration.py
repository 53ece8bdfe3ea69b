"""Register each thing once: a new analysis is two files (its module and the entry point that names
it), a new method is one module plus a recipe, and both then appear in the command line, the Lab
and the dashboard's listing. No method name is compared as a string where a method object answers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A toy analysis: the mean norm of each block's state per layer, its result class beside it.
TOY_ANALYSIS = '''
from dataclasses import dataclass
from typing import ClassVar

import pandas as pd

from rim_lens.analysis.registry import analysis
from rim_lens.analysis.results import Result
from rim_lens.analysis.session import Layers, Session


@dataclass(repr=False)
class NormResult(Result):
    name: ClassVar[str] = "block_norms"


@analysis(stems=("block_norms",), example="--layers 1", help={"layers": "layers to measure"})
def norms(lab: Session, layers: Layers = None, blocks: Layers = None) -> NormResult:
    """The mean norm of each block's state per layer."""
    sel = lab.select(layers, blocks, readable=True)
    states = lab.states(layers=sel.layers).states.norm(dim=-1).mean(dim=(0, 3))  # [layers, K]
    rows = [
        {"layer": l, "block": k, "norm": float(states[i, k - 1])}
        for i, l in enumerate(sel.layers)
        for k in sel.blocks
    ]
    return NormResult(pd.DataFrame(rows), {"n": len(lab.examples)}, lab.record("norms", sel))
'''

# A toy method: filler tokens (memory blocks) after the question, trained on the answer read after
# the last block only: no grounding and no readout after each block.
TOY_METHOD = '''
from rim_lens.methods import Method, register


class Filler(Method):
    """Filler tokens without grounding: K blocks, the answer after the last."""

    name, color = "filler", "#8c564b"
    uses_blocks = True

    def layout(self, builder):
        return builder.scored


register(Filler())
'''

RECIPE = """method: filler
task: {name: modchain, options: {length: 2}}
data: {train: 48, val: 8, test: 8}
model: {preset: tiny, max_positions: 64}
memory: {K: 2, M: 1}
train: {steps: 6, batch_size: 8, threads: 1, eval_every: 6}
eval: {latency_examples: 0}
"""

# Run in one process (importing the Lab once): the command line, the Lab and the dashboard's listing.
SCRIPT = """
import contextlib, io, json, sys
from pathlib import Path
from rim_lens.cli import main

def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()

seen = {}
seen["train"] = run("train", "filler.yaml", "--runs-dir", "runs", "--name", "filler")[0]
seen["listing"] = run("analyze", "--help")[1]
seen["help"] = run("analyze", "norms", "--help")[1]
seen["analyze"] = run("analyze", "norms", "runs/filler", "--n", "8", "--layers", "1")
seen["not_taken"] = run("analyze", "norms", "runs/filler", "--grid")

from rim_lens.analysis.lab import Lab
from rim_lens.methods import block_methods, latent_methods

lab = Lab.open("runs/filler", n=8)
seen["method"] = lab.spec.method
seen["lab_rows"] = len(lab.norms(layers=[0, 1]).table)
seen["prompt_blocks"] = max(lab.builder.prompt(lab.examples[0]).blocks)
seen["block_methods"], seen["latent_methods"] = list(block_methods()), list(latent_methods())

from dashboards import core

root = core.Root.of("runs")
runs, _ = core.discover(root)
(info,) = [r for r in runs if r.name == "filler"]
seen["listing_rows"] = {row["analysis"]: row["written"] for row in core.analyses_of(root, info)}
seen["summary"] = core.run_summary(root, info)
print("SEEN" + json.dumps(seen, default=str))
"""


def test_a_toy_analysis_and_method_appear_in_the_cli_the_lab_and_the_dashboard(tmp_path):
    plugin = tmp_path / "plugin"
    (plugin / "toy_norms-0.dist-info").mkdir(parents=True)
    (plugin / "toy_norms.py").write_text(TOY_ANALYSIS)  # file 1 of the analysis
    (plugin / "toy_norms-0.dist-info" / "entry_points.txt").write_text(
        "[rim_lens.plugins]\nnorms = toy_norms\n"
    )
    (plugin / "toy_filler.py").write_text(TOY_METHOD)  # the method's one module ...
    (tmp_path / "filler.yaml").write_text(RECIPE)  # ... and its recipe
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": f"{plugin}:{REPO}",
        "RIM_LENS_PLUGINS": "toy_filler",
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.split("SEEN", 1)[1])

    # The method trains from its recipe, and its model prompts with its blocks.
    assert seen["train"] == 0 and seen["method"] == "filler" and seen["prompt_blocks"] == 2
    assert "filler" in seen["block_methods"] and "filler" in seen["latent_methods"]
    # The command line lists the analysis, and its help shows its own options and an example only.
    assert re.search(r"^\s+norms\s+The mean norm of each block's state per layer", seen["listing"], re.M)
    assert "--layers" in seen["help"] and "--blocks" in seen["help"] and "--grid" not in seen["help"]
    assert "example: rim-lens analyze norms runs/demo/rim --layers 1" in seen["help"]
    code, out, _ = seen["analyze"]
    assert code == 0 and "results in" in out
    assert (tmp_path / "runs" / "filler" / "analysis" / "block_norms.parquet").exists()
    code, _, err = seen["not_taken"]
    assert code == 2 and err.strip().count("\n") == 0 and "does not take --grid" in err
    # The Lab has it as a method; the dashboard lists it (written for this run) beside the built-in ones.
    assert seen["lab_rows"] == 2 * 2
    assert seen["listing_rows"]["norms"] is True and seen["listing_rows"]["patch"] is False
    assert seen["summary"]["method"] == "filler" and seen["summary"]["K"] == 2


def test_no_method_name_is_compared_as_a_string():
    """Behaviour that depends on the method is asked of its object (`rim_lens.methods`): no method
    name appears as a string literal in the model code, evaluation or training."""
    from rim_lens.methods import method_names

    names = "|".join(method_names())
    literal = re.compile(rf"""["']({names})["']""")
    places = [*(REPO / "rim_lens" / "model").glob("*.py"), REPO / "rim_lens" / "evaluation.py"]
    places += (REPO / "training").glob("*.py")
    found = [
        f"{path.relative_to(REPO)}:{i}: {line.strip()}"
        for path in places
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if literal.search(line.split("#")[0])
    ]
    assert not found, found
