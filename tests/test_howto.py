"""docs/howto.md and the README run as written: every Python block in order in one session, every
`rim-lens` and `accelerate` line, each output compared with the one the page shows (numbers
masked: other CPUs round differently). The pages' paths are laid out in a temporary folder:
`runs/demo/rim` is the tiny modchain RiM (tests/fixtures.py), `my_model` a bare copy of the tiny
copy-task RiM's model (no rim_memory.json), and the hub id of the LoRA recipe becomes a tiny
local Llama directory, so nothing reaches the network."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from rim_lens.cli import main

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
FENCE = re.compile(r"```(\w+)\n(.*?)```\n", re.S)


def fenced(text: str) -> list[tuple[str, str, str | None]]:
    """(language, code, the output shown right after it, if any) of every fenced block."""
    found = list(FENCE.finditer(text))
    blocks = []
    for i, block in enumerate(found):
        if block.group(1) == "text":
            continue
        following = found[i + 1] if i + 1 < len(found) else None
        shown = (
            following.group(2)
            if following
            and following.group(1) == "text"
            and not text[block.end() : following.start()].strip()
            else None
        )
        blocks.append((block.group(1), block.group(2), shown))
    return blocks


def masked(text: str) -> list[str]:
    """Lines with every number and truth value replaced and runs of spaces collapsed (column widths
    follow numbers). What a trained fixture computes changes with the CPU's rounding; the page's
    shape does not."""
    text = re.sub(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", "#", text)
    text = re.sub(r"\b(?:True|False)\b", "#", text)
    return [" ".join(line.split()) for line in text.strip().splitlines()]


def run_page(text: str, substitutions: dict[str, str]) -> str:
    """Run a page's blocks in the current directory, check each shown output; all it printed."""
    namespace: dict = {"__name__": "__howto__"}
    printed = []
    for language, code, shown in fenced(text):
        out = io.StringIO()
        if language == "python":
            with contextlib.redirect_stdout(out):
                exec(compile(code, "<howto>", "exec"), namespace)  # noqa: S102 - the docs' own code
        elif language == "yaml":
            name = code.split("\n", 1)[0].removeprefix("# ").split(":")[0]
            for old, new in substitutions.items():
                code = code.replace(old, new)
            Path(name).write_text(code)
        elif language == "bash":
            for line in code.splitlines():
                line = line.split("  #")[0].strip()
                if line.startswith("rim-lens "):
                    with contextlib.redirect_stdout(out):
                        assert main(shlex.split(line)[1:]) == 0, line
                elif line.startswith("accelerate "):
                    accelerate(shlex.split(line)[1:])
                elif line and not line.startswith(("#", "make ", "pip ")):
                    raise AssertionError(f"a shell line the test does not know how to run: {line}")
        if shown is not None:
            assert masked(out.getvalue()) == masked(shown), f"{code}\nprinted:\n{out.getvalue()}"
        printed.append(out.getvalue())
    return "".join(printed)


def accelerate(args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).parent / "accelerate"), *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def tiny_llama(directory: Path, texts: list[str], **spec) -> Path:
    """A small untrained Llama with a word tokenizer, saved as a plain HF directory."""
    from rim_lens.model.checkpoints import build_model
    from rim_lens.model.memory import MemorySpec
    from rim_lens.model.tokenizer import build_word_tokenizer

    tokenizer = build_word_tokenizer(texts, MemorySpec(**spec))
    model = build_model(tokenizer, "llama", "small" if spec.get("K", 8) > 2 else "tiny", max_positions=512)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def workspace(tiny_runs, tiny_modchain_runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RIM_LENS_QUIET", raising=False)
    (tmp_path / "runs").mkdir()
    shutil.copytree(
        tiny_modchain_runs["rim"].parent, tmp_path / "runs" / "demo", ignore=shutil.ignore_patterns("*.lock")
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def test_every_howto_recipe_runs_and_prints_what_the_page_shows(workspace, tiny_runs):
    shutil.copytree(tiny_runs["rim"] / "model", "my_model", ignore=shutil.ignore_patterns("rim_memory.json"))
    shutil.copy(tiny_runs["rim"].parent / "data" / "eval.txt", "my_model_data.txt")
    texts = [f"{a} +{b} mod 10" for a in range(10) for b in range(10)] + [str(d) for d in range(10)]
    local = tiny_llama(workspace / "tiny-llama", texts, K=2, M=1, task="modchain")
    run_page((REPO / "docs" / "howto.md").read_text(), {HUB_ID: str(local)})
    for name in ("mine", "mine-lora", "mine-ddp"):
        assert (workspace / "runs" / name / "status.json").read_text().count('"completed"') == 1, name


def test_the_readme_python_blocks_run(workspace, reference_data):
    """The quick start on the tiny run; "Your own model" on an untrained 4-layer GSM8K model saved
    as a plain HF directory (K = 8, M = 2, as the README's spec says)."""
    lines = (reference_data / "gsm8k" / "valid.txt").read_text().splitlines()[:50]
    tiny_llama(workspace / "my_model", lines + ["Tom has 3 apples and buys 2. How many now?"], K=8, M=2)
    os.symlink(reference_data, workspace / "data")
    readme = (REPO / "README.md").read_text()
    python = [block for block in fenced(readme) if block[0] == "python"]
    assert len(python) == 2
    printed = run_page("".join(f"```python\n{code}```\n" for _, code, _ in python), {})
    assert printed.count("recovery") == 2 and "readout_after" in printed
