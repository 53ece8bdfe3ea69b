"""Causal abstraction on memory blocks: the causal models' counterfactual answers against direct
computation; DAS and its controls on hand-built models whose memory block holds (or does not hold)
a known variable in a known direction; the Lab method and the command line on the tiny runs."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
from fixtures import clone_runs
from torch import nn
from transformers import GPT2Config

from rim_lens.analysis import abstraction as ab
from rim_lens.analysis import subspaces, verdict
from rim_lens.analysis.lab import Lab
from rim_lens.analysis.report import measure_variables
from rim_lens.analysis.sites import Site
from rim_lens.analysis.verdict import MIN_IIA, NOT_DETECTED, NOT_TESTABLE, SUPPORTED
from rim_lens.cli import main
from rim_lens.data.tasks import get_task
from rim_lens.errors import RimLensError, RunError
from rim_lens.model.memory import MemorySpec
from rim_lens.model.tokenizer import build_word_tokenizer
from rim_lens.stats import Estimate

torch.set_num_threads(1)


# -- a hand-built model ------------------------------------------------------------------------------
class _Writer(nn.Module):
    """Layer 0: adds (a + b) mod 10 along `write` to the state at block 1's first memory slot."""

    def __init__(self, model: ToyLM) -> None:
        super().__init__()
        self.context = model.context
        self.write = nn.Parameter(torch.randn(model.config.hidden_size) / model.config.hidden_size**0.5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        ids, digit = self.context["ids"], self.context["digit"]
        rows, site, start = _places(ids, self.context)
        value = (digit[ids[rows, start + 1]] + digit[ids[rows, start + 3]]) % 10
        h = h.clone()
        h[rows, site] = h[rows, site] + value[:, None].float() * self.write
        return h


class _Reader(nn.Module):
    """Layer 1: reads x = state at block 1's first memory slot . `read` (or, if the model does not
    read its block, (a + b) mod 10 from the question) for the answer head."""

    def __init__(self, model: ToyLM) -> None:
        super().__init__()
        self.context, self.reads_block = model.context, model.config.reads_block
        self.read = nn.Parameter(torch.randn(model.config.hidden_size) / model.config.hidden_size**0.5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        ids, digit = self.context["ids"], self.context["digit"]
        rows, site, start = _places(ids, self.context)
        if self.reads_block:
            x = h[rows, site] @ self.read
        else:
            x = ((digit[ids[rows, start + 1]] + digit[ids[rows, start + 3]]) % 10).float()
        self.context["x"], self.context["c"] = x, digit[ids[rows, start + 5]]
        return h


def _places(ids: torch.Tensor, context: dict):
    """Per row: row index, position of block 1's first memory slot, position of the question start."""
    rows = torch.arange(len(ids))
    site = (ids == context["memory"]).int().argmax(1)
    start = (ids == context["bos"]).int().argmax(1)
    return rows, site, start


class ToyLM(nn.Module):
    """A two-layer model of `a +b +c mod 10` written by hand: layer 0 stores step 1's value
    (a + b) mod 10 in block 1's first memory slot along `write`; layer 1 reads it along `read`
    and the head answers (x + c) mod 10 with logits -4 (x - (e - c) mod 10)^2 for each digit e
    (smooth in x, so DAS can learn through it), then the end token. Built with random `write`,
    `read` and embeddings (the untrained model); `hand_built` sets them so the block holds the
    value along the first coordinate."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.context: dict = {
            "digit": torch.tensor(config.digit_of),
            "memory": config.memory_id,
            "bos": config.bos_token_id,
        }
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.transformer = nn.Module()
        self.transformer.h = nn.ModuleList([_Writer(self), _Reader(self)])

    @classmethod
    def hand_built(cls, config: GPT2Config) -> ToyLM:
        model = cls(config)
        with torch.no_grad():
            model.embed.weight.mul_(0.1)[:, 0] = 0
            for layer, name in ((0, "write"), (1, "read")):
                direction = getattr(model.transformer.h[layer], name)
                direction.zero_()[0] = 1
        return model.eval()

    def forward(self, input_ids, position_ids=None, attention_mask=None, use_cache=False):
        self.context["ids"] = input_ids
        h = self.embed(input_ids)
        for layer in self.transformer.h:
            h = layer(h)
        x, c, config = self.context["x"], self.context["c"], self.config
        wanted = (torch.arange(10)[None, :] - c[:, None]) % 10  # the x that makes digit e the answer
        digits = _scatter(-4 * (x[:, None] - wanted.float()) ** 2, config)
        at_prefix = input_ids == config.prefix_id
        after = torch.zeros_like(at_prefix)
        after[:, 1:] = at_prefix[:, :-1]
        eos = torch.zeros(config.vocab_size)
        eos[config.eos_token_id] = 10
        logits = torch.where(at_prefix[..., None], digits, torch.zeros(*input_ids.shape, config.vocab_size))
        logits = torch.where(after[..., None], eos, logits)
        return SimpleNamespace(logits=logits)


def _scatter(digits: torch.Tensor, config) -> torch.Tensor:
    """[B, 10] digit logits as [B, 1, vocab] (-30 for every other token)."""
    out = torch.full((len(digits), config.vocab_size), -30.0)
    out = out.index_copy(1, torch.tensor(config.digit_ids), digits)
    return out[:, None, :]


TASK = {"length": 2, "modulus": 10, "operators": "+"}


def toy_lab(reads_block: bool = True, n: int = 160) -> Lab:
    task = get_task("modchain", **TASK)
    spec = MemorySpec(method="rim", K=2, M=2, task="modchain")
    examples = task.generate(n, seed=0)
    tok = build_word_tokenizer([t for ex in examples for t in (ex.question, ex.answer)], spec)
    digit_ids = tok.convert_tokens_to_ids(list("0123456789"))
    digit_of = [-1] * len(tok)
    for d, i in enumerate(digit_ids):
        digit_of[i] = d
    config = GPT2Config(
        n_layer=2,
        n_embd=16,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        digit_ids=digit_ids,
        digit_of=digit_of,
        memory_id=tok.convert_tokens_to_ids(spec.memory),
        prefix_id=tok.convert_tokens_to_ids(spec.answer_prefix),
        reads_block=reads_block,
    )
    return Lab.from_model(ToyLM.hand_built(config), tok, spec, examples, task=task)


@pytest.fixture(scope="module")
def storing() -> Lab:
    return toy_lab(reads_block=True)


@pytest.fixture(scope="module")
def found(storing) -> ab.AbstractionResult:
    return storing.abstraction()


SITE = Site(1, 1, 1)  # layer 1 (after the writer), block 1, its first memory slot


# -- causal models against direct computation --------------------------------------------------------
def _number(digits: str) -> int:
    """An operand written least-significant digit first, e.g. '2 1' -> 12."""
    return int("".join(reversed(digits.split())))


def _operands(question: str) -> tuple[int, int]:
    left, right = question.split(" * ")
    return _number(left), _number(right)


@pytest.mark.parametrize("n", [2, 3])
def test_mult_counterfactuals_are_products_recomputed(n):
    task = get_task("mult", n=n)
    model = task.causal_model()
    examples = task.generate(40, seed=n)
    names = [v.name for v in model.variables(examples)]
    expected_names = [f"step{t}" for t in range(1, n + 1)] + [f"running_sum{t}" for t in range(2, n)]
    assert names == [*expected_names, "answer"]
    rng = random.Random(0)
    for _ in range(200):
        base, source = rng.sample(examples, 2)
        (a, b), (a_s, b_s) = _operands(base.question), _operands(source.question)
        digit = [b // 10**i % 10 for i in range(n)]
        digit_s = [b_s // 10**i % 10 for i in range(n)]
        for t in range(1, n + 1):  # P_t(source) with the base's other partial products
            total = sum(a * digit[i] * 10**i for i in range(n) if i != t - 1) + a_s * digit_s[t - 1] * 10 ** (
                t - 1
            )
            assert _number(model.counterfactual(base, source, f"step{t}")) == total
        for t in range(2, n):  # S_t(source) = the source's first t partial products, then the base's
            head = sum(a_s * digit_s[i] * 10**i for i in range(t))
            total = head + sum(a * digit[i] * 10**i for i in range(t, n))
            assert _number(model.counterfactual(base, source, f"running_sum{t}")) == total
        answer = model.counterfactual(base, source, "answer")
        assert _number(answer) == a_s * b_s and answer == source.answer
        for name, value in model.values(base).items():  # the base's own value: the base's answer
            assert model.intervene(base, name, value) == base.answer


def test_modchain_counterfactuals_continue_the_base_chain():
    task = get_task("modchain", min_length=1, max_length=4, modulus=7)
    model = task.causal_model()
    examples = task.generate(60, seed=1)
    rng = random.Random(1)
    ops = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
    for _ in range(300):
        base, source = rng.sample(examples, 2)
        steps = base.question.split()[1:-2]
        for t in range(1, 4):
            cf = model.counterfactual(base, source, f"step{t}")
            if t >= len(steps) or t > len(source.question.split()[1:-2]) - 1:
                assert cf is None  # the base's last step is the answer; the source must reach step t
                continue
            value = int(source.question.split()[0])  # the source's chain up to step t ...
            for step in source.question.split()[1 : t + 1]:
                value = ops[step[0]](value, int(step[1:])) % 7
            for step in steps[t:]:  # ... then the base's remaining operations
                value = ops[step[0]](value, int(step[1:])) % 7
            assert cf == str(value)
        assert model.counterfactual(base, source, "answer") == source.answer


def test_gsm8k_counterfactuals_reevaluate_the_later_steps():
    task = get_task("gsm8k")
    model = task.causal_model()
    base = task.parse_line("q||<<16/2=8>> <<8+4=12>> <<12*3=36>> #### 36")
    source = task.parse_line("r||<<10/2=5>> <<5+1=6>> #### 6")
    assert [v.name for v in model.variables([base])] == ["step1", "step2", "step3", "answer"]
    assert model.counterfactual(base, source, "step1") == str((5 + 4) * 3)
    assert model.counterfactual(base, source, "step2") == str(6 * 3)
    assert model.counterfactual(base, source, "step3") is None  # the source has no step 3
    assert model.counterfactual(base, source, "answer") == "6"
    assert model.intervene(base, "step1", 2.5) == str((2.5 + 4) * 3)
    assert model.intervene(base, "step1", -3) == str((-3 + 4) * 3)
    # The answer is the last step that produces it; steps after it do not matter.
    ex = task.parse_line("q||<<3*4=12>> <<12-2=10>> <<12+1=13>> #### 10")
    assert model.intervene(ex, "step1", 5) == "3"
    # Undefined: no step produces the answer, or an expression cannot be evaluated.
    assert model.intervene(task.parse_line("q||<<2+2=4>> #### 5"), "step1", 3) is None
    assert model.intervene(task.parse_line("q||<<2+2=4>> <<4/0=0>> #### 0"), "step1", 3) is None
    with pytest.raises(RimLensError, match="no causal model"):
        get_task("prosqa").causal_model()


# -- DAS and its controls on the hand-built models ---------------------------------------------------
def test_das_recovers_the_stored_variable_and_the_controls_stay_at_chance(found):
    best = found.best("step1")
    assert best["site"] == SITE._asdict() and best["basis"] == "das" and best["rank"] == 1
    iia = best["iia"]
    assert iia.value >= 0.95 and iia.n >= 100, iia
    for control in ("placebo", "arbitrary", "untrained"):
        assert best[control].value <= 0.2 and iia.above(best[control]), (control, best[control])
    # The learned direction is the one the model writes and reads along.
    das = found.table[(found.table["basis"] == "das") & found.table["chosen"]]
    assert len(das[das["variable"] == "step1"]) == 1


def test_the_map_finds_the_site_and_nothing_else(found):
    table = found.table
    step1 = table[(table["variable"] == "step1") & table["chosen"] & (table["basis"] == "probe")]
    assert len(step1) == 4  # layers 0, 1 x blocks 1, 2
    at_site = step1[(step1["layer"] == 1) & (step1["block"] == 1)].iloc[0]
    assert at_site["slot"] == 1 and at_site["iia"] == 1.0
    assert (step1.drop(at_site.name)["iia"] == 0).all()
    placebo = table[(table["variable"] == "step1") & (table["basis"] == "placebo")]
    assert placebo["iia"].max() <= 0.1
    # The answer is not stored anywhere: its own counterfactual (the source's answer) is out of reach.
    answer = found.best("answer")
    assert answer["iia"].value <= 0.2


def test_a_model_that_does_not_store_the_variable_stays_at_chance():
    lab = toy_lab(reads_block=False)
    result = lab.abstraction(variable="step1")
    table = result.table
    assert table["iia"].max() <= 0.05 and table["iia_train"].max() <= 0.05
    assert result.best("step1")["iia"].value <= 0.05


def test_das_basis_is_the_written_direction(storing):
    model = storing.task.causal_model()
    train, _ = subspaces.split_examples(storing)
    pairs = subspaces.make_pairs(storing, model, "step1", train)
    basis = subspaces.das_directions(storing, SITE, pairs, rank=1)
    assert basis.shape == (16, 1) and abs(float(basis[0, 0])) >= 0.97


def test_pairs_are_informative_and_split_by_key(storing):
    model = storing.task.causal_model()
    train, test = subspaces.split_examples(storing)
    keys = lambda idx: {storing.task.key(storing.examples[i].question) for i in idx}  # noqa: E731
    assert not keys(train) & keys(test) and len(train) + len(test) == len(storing.examples)
    pairs = subspaces.make_pairs(storing, model, "step1", test, n=50)
    assert len(pairs) == 50 and pairs.informative < pairs.candidates
    for b, s, answer in zip(pairs.base, pairs.source, pairs.answers):
        assert b in test and s in test and b != s
        assert answer == model.counterfactual(storing.examples[b], storing.examples[s], "step1")
        assert answer != storing.examples[b].answer


def test_interchange_round_trips_and_matches_transformer_lens(storing):
    from transformer_lens.tools.analysis.interchange import SubspaceInterchange

    from rim_lens.analysis.interventions import Intervention

    basis = torch.linalg.qr(torch.randn(16, 2))[0]
    swap = subspaces.Interchange([storing.examples[1]], {SITE: basis})
    again = Intervention.from_dict(swap.to_dict())
    assert again.to_dict() == swap.to_dict() and torch.allclose(again.bases[SITE], basis)
    fitted = storing.fit(swap, storing.examples[:3], storing.select())
    base = torch.randn(3, 16)
    source = storing.states([storing.examples[1]]).at(*SITE)
    expected = SubspaceInterchange(basis)(base, source.expand(3, -1))
    assert torch.allclose(fitted(base, SITE, torch.arange(3)), expected)


def test_the_verdict_on_the_hand_built_models(storing, found):
    """The storing model against a control that does not store the variable: supported; the other
    way round: not supported."""
    blind = toy_lab(reads_block=False)
    blind_found = blind.abstraction(variable="step1", sites=found.sites(), grid=False, controls=False)
    card = {"accuracy_intact": storing.accuracy().to_dict(), "chance_accuracy": 0.1}
    run = {**card, "variables": _plain(found.summary["variables"])}
    control = {**card, "variables": _plain(blind_found.summary["variables"])}
    finding = verdict.variables(run, control)
    assert finding.outcome == SUPPORTED, finding.detail
    assert "step1" in finding.run and "step1 pause" in finding.control
    assert "layer 1, block 1, slot 1 (in block t = step t)" in finding.detail
    assert verdict.variables(control | {"variables": control["variables"]}, run).outcome != SUPPORTED


def _plain(summary: dict) -> dict:
    from rim_lens.analysis.results import plain

    return json.loads(json.dumps(plain(summary)))


# -- the verdict, table-driven on hand-built cards -----------------------------------------------------
def est(value: float, half: float = 0.05) -> dict:
    return Estimate(value, max(0.0, value - half), min(1.0, value + half), 128, "test").to_dict()


def entry(iia=0.9, placebo=0.02, arbitrary=0.1, untrained=0.05, block=1, kind="step", step=1) -> dict:
    return {
        "kind": kind,
        "step": step,
        "label": f"P{step}",
        "site": {"layer": 2, "block": block, "slot": 1},
        "rank": 1,
        "iia": None if iia is None else est(iia),
        "placebo": None if placebo is None else est(placebo),
        "arbitrary": None if arbitrary is None else est(arbitrary),
        "untrained": None if untrained is None else est(untrained),
    }


def cards(run_entries: dict, pause: dict | None, accuracy: float = 0.9) -> tuple[dict, dict | None]:
    run = {"accuracy_intact": est(accuracy), "chance_accuracy": 0.1, "variables": run_entries}
    control = None if pause is None else {"variables": {k: {"iia": est(v)} for k, v in pause.items()}}
    return run, control


BOTH = {"step1": 0.1, "step2": 0.1}
VARIABLE_CASES = [
    ("every step variable beats every control", {"step1": entry(), "step2": entry(step=2)}, BOTH, SUPPORTED),
    ("one step variable below the bar", {"step1": entry(), "step2": entry(0.45)}, BOTH, NOT_DETECTED),
    ("the pause model holds it as well", {"step1": entry()}, {"step1": 0.88}, NOT_DETECTED),
    ("the arbitrary targets fit as well", {"step1": entry(arbitrary=0.85)}, {"step1": 0.1}, NOT_DETECTED),
    ("the untrained copy reaches it", {"step1": entry(untrained=0.9)}, {"step1": 0.1}, NOT_DETECTED),
    ("only the answer is held", {"answer": entry(kind="answer", step=None)}, {"answer": 0.1}, NOT_TESTABLE),
    ("no pause model", {"step1": entry()}, None, NOT_TESTABLE),
    ("a control was not run", {"step1": entry(untrained=None)}, {"step1": 0.1}, NOT_TESTABLE),
    ("no informative pairs", {"step1": entry(iia=None)}, {"step1": 0.1}, NOT_TESTABLE),
]  # fmt: skip


@pytest.mark.parametrize("case, entries, pause, expected", VARIABLE_CASES, ids=[c[0] for c in VARIABLE_CASES])
def test_variables_finding(case, entries, pause, expected):
    finding = verdict.variables(*cards(entries, pause))
    assert finding.outcome == expected, finding.detail
    assert finding.detail and finding.reference == {"bar": MIN_IIA}
    assert verdict.Finding.from_dict(finding.to_dict()) == finding


def test_variables_finding_at_chance_is_not_testable():
    finding = verdict.variables(*cards({"step1": entry()}, {"step1": 0.1}, accuracy=0.05))
    assert finding.outcome == NOT_TESTABLE and "not above chance" in finding.detail


def test_variables_finding_says_where_each_step_sits():
    finding = verdict.variables(*cards({"step1": entry(block=3)}, {"step1": 0.1}))
    assert "block 3" in finding.detail and "not in block 1" in finding.detail


# -- the Lab method, the report's measurement and the command line on the tiny runs ------------------
@pytest.fixture(scope="module")
def runs(tiny_modchain_runs, tmp_path_factory):
    return clone_runs(tiny_modchain_runs, tmp_path_factory.mktemp("abstraction"))


def test_lab_abstraction_is_a_typed_result(runs, tmp_path):
    lab = Lab.open(runs["rim"], n=24)
    result = lab.abstraction(variable="step1", method="probe", layers=[1], blocks=[1, 2])
    assert isinstance(result, ab.AbstractionResult) and set(result.table["variable"]) == {"step1"}
    assert set(result.table["layer"]) == {1} and set(result.table["basis"]) == {"probe", "placebo", "full"}
    assert result.figure("step1").to_dict()["data"] and result.best("step1")["basis"] == "probe"
    record = result.record
    assert record["analysis"] == "abstraction" and record["model"] == lab.model_fingerprint
    assert record["options"]["method"] == "probe" and record["options"]["selection"]["layers"] == [1]
    out = result.save(tmp_path)
    for name in (
        "abstraction.parquet",
        "abstraction_pairs.parquet",
        "abstraction.json",
        "abstraction.step1.fig.json",
    ):
        assert (out / name).exists(), name
    with pytest.raises(RunError, match="no variable 'step9'"):
        lab.abstraction(variable="step9")
    with pytest.raises(RunError, match="unknown abstraction method"):
        lab.abstraction(method="pca")


def test_das_learns_the_same_basis_through_every_backend(runs):
    """The site is mapped onto TransformerLens' one-position-per-example hook the same way on the
    plain HF hooks, the TransformerBridge and nnsight: the same subspace, up to the rounding that
    80 Adam steps accumulate from the backends' float differences (at most 0.007 of a projection's
    entries on the CPUs and kernel settings tried: AVX-512, AVX2 and `default`; the bound is
    about 4 times that)."""
    bases = {}
    for backend in ("hf", "tl", "nnsight"):
        lab = Lab.open(runs["rim"], n=24, backend=backend)
        train, _ = subspaces.split_examples(lab)
        pairs = subspaces.make_pairs(lab, lab.task.causal_model(), "step1", train)
        bases[backend] = subspaces.das_directions(lab, Site(1, 2, 1), pairs, rank=2)
    projection = {name: b @ b.T for name, b in bases.items()}
    for backend in ("tl", "nnsight"):
        assert (projection[backend] - projection["hf"]).abs().max() < 0.03, backend


def test_report_measures_the_control_at_the_runs_best_sites(runs):
    lab, control = Lab.open(runs["rim"], n=24), Lab.open(runs["pause"], n=24)
    run_card, control_card = measure_variables(lab, control)
    assert set(run_card["variables"]) == {"step1", "step2"}  # the ones the finding judges
    for name, e in run_card["variables"].items():
        if e["site"] is None:
            continue
        assert control_card["variables"][name]["site"] == e["site"], name
        assert e["iia"]["n"] == e["pairs_test"] and e["untrained"] is not None
        assert set(e["gain"]) == {"iia", "placebo", "arbitrary", "untrained"}
    assert (runs["pause"] / "analysis" / "abstraction.parquet").exists()


@pytest.mark.usefixtures("no_progress_bars")  # one-line errors are read off stderr (see conftest.py)
def test_analyze_abstraction_from_the_command_line(runs, capsys):
    run = runs["rim"]
    code = main(
        [
            "analyze",
            "abstraction",
            str(run),
            "--n",
            "24",
            "--variable",
            "answer",
            "--basis",
            "random",
            "--layers",
            "1",
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    saved = json.loads((run / "analysis" / "abstraction.json").read_text())
    assert saved["method"] == "random" and list(saved["variables"]) == ["answer"]
    assert saved["record"]["options"]["ranks"] == [1]
    code = main(["analyze", "abstraction", str(run), "--n", "24", "--variable", "step9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no variable 'step9'" in err[0]
