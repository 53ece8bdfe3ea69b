"""Each analysis run end to end on a Lab: compute, then save its table, summary and figures
under `runs/<name>/analysis/`. `rim-lens analyze WHAT RUN` calls `run_WHAT`; the functions in
`interventions`, `probes`, `pca` and `lens` are the building blocks for custom work.

Every `run_*` returns (table, summary).
"""

from __future__ import annotations

import pandas as pd

from rim_lens.analysis import figures
from rim_lens.analysis import interventions as iv
from rim_lens.analysis.lab import Lab

Result = tuple[pd.DataFrame, dict]


def _row(table: pd.DataFrame, **where) -> pd.Series:
    mask = pd.Series(True, index=table.index)
    for col, val in where.items():
        mask &= table[col].isna() if val is None else (table[col] == val)
    return table[mask].iloc[0]


def run_capture(lab: Lab, attn: bool = False, **_) -> Result:
    store = lab.capture(attn=attn, refresh=True)
    summary = {
        "n": store.n,
        "layers": store.layers,
        "K": store.K,
        "slots": store.slots,
        "path": str(store.path),
    }
    return pd.DataFrame(store.examples)[["index", "id", "question", "answer"]], summary


def run_ablate(
    lab: Lab, mode: str = "mean", layers=None, blocks=None, slots=None, grid: bool = False, seed: int = 0, **_
) -> Result:
    table = iv.ablate(
        lab.backend,
        lab.builder,
        lab.examples,
        lab.select(layers, blocks, slots),
        mode=mode,
        seed=seed,
        grid=grid,
    )
    summary = {
        "mode": mode,
        "accuracy_intact": float(_row(table, scope="intact")["accuracy"]),
        "accuracy_all_ablated": float(_row(table, scope="all")["accuracy"]),
        "n": len(lab.examples),
    }
    figs = {"bars": figures.ablation_bars(table)}
    if grid:
        figs["grid"] = figures.layer_block_heatmap(
            table[table["scope"] == "cell"], "accuracy", f"Accuracy with one (layer, block) {mode}-ablated"
        )
    lab.save("ablate", table, summary, figs)
    return table, summary


def run_knockout(lab: Lab, blocks=None, **_) -> Result:
    table = iv.knockout(lab.backend, lab.builder, lab.examples, lab.select(blocks=blocks).blocks)
    summary = {
        "accuracy_intact": float(_row(table, knockout="none")["accuracy"]),
        "accuracy_answer_sees_no_block": float(_row(table, knockout="answer->block", block=None)["accuracy"]),
    }
    lab.save("knockout", table, summary, {"bars": figures.knockout_bars(table)})
    return table, summary


def run_patch(
    lab: Lab, layers=None, blocks=None, slots=None, per_slot: bool = False, seed: int = 0, **_
) -> Result:
    pairs = iv.make_pairs(lab.task, lab.builder, lab.examples, seed=seed)
    table, summary = iv.patch(
        lab.backend, lab.builder, pairs, lab.select(layers, blocks, slots), per_slot=per_slot
    )
    peak = table.loc[table["recovery"].idxmax()]
    summary["peak"] = {
        "layer": int(peak["layer"]),
        "block": int(peak["block"]),
        "recovery": float(peak["recovery"]),
    }
    lab.save(
        "patch",
        table,
        summary,
        {
            "heatmap": figures.layer_block_heatmap(
                table, "recovery", "Patching: recovery of the clean answer", zmid=0
            )
        },
    )
    return table, summary


def run_interchange(lab: Lab, layers=None, blocks=None, slots=None, seed: int = 0, **_) -> Result:
    table, pairs = iv.interchange(
        lab.backend, lab.builder, lab.examples, lab.select(layers, blocks, slots), seed=seed
    )
    every = _row(table, swap="all")
    summary = {
        "transfer_rate": float(every["to_A"]),
        "stays_B": float(every["stays_B"]),
        "neither": float(every["neither"]),
        "intact_B_correct": float(_row(table, swap="none")["stays_B"]),
        "pairs": len(pairs),
    }
    lab.save("interchange", table, summary, {"matrix": figures.interchange_matrix(table)})
    return table, summary


def run_pca(lab: Lab, layers=None, **_) -> Result:
    from rim_lens.analysis import pca

    store = lab.capture()
    result = pca.block_pca(store, layers=layers, examples=range(min(5, store.n)))
    dependence = pca.input_dependence(store, layers=layers)
    lab.save(
        "pca",
        result.trajectory,
        figures={"trajectories": figures.pca_trajectories(result.trajectory, result.examples)},
    )
    lab.save("pca_examples", result.examples)
    lab.save("pca_explained", result.explained)
    per_layer = dependence.groupby("layer")["ratio"].mean()
    summary = {"input_dependence_by_layer": {int(l): float(r) for l, r in per_layer.items()}}
    lab.save(
        "pca_input_dependence",
        dependence,
        summary,
        {
            "heatmap": figures.layer_block_heatmap(
                dependence, "ratio", "Input dependence: variance across inputs / across blocks"
            )
        },
    )
    return dependence, summary


def run_probe(lab: Lab, layers=None, blocks=None, slots=None, seed: int = 0, **_) -> Result:
    from rim_lens.analysis import probes

    store = lab.capture()
    slot = slots[0] if slots and len(slots) == 1 else None
    correctness = probes.probe_correctness(store, layers=layers, blocks=blocks, slot=slot, seed=seed)
    values = probes.probe_values(store, layers=layers, blocks=blocks, slot=slot, seed=seed)
    selection = (
        probes.select_answers(store, correctness, slot=slot, seed=seed)
        if correctness["auroc"].notna().any()
        else None
    )
    scored = values.dropna(subset=["selectivity"])
    best = scored.loc[scored["selectivity"].idxmax()] if len(scored) else None
    auroc = correctness.groupby("layer")["auroc"].mean()
    summary = {
        "selection": selection,
        "correctness_auroc": float(auroc.max()) if auroc.notna().any() else None,
        "correctness_auroc_layer": int(auroc.idxmax()) if auroc.notna().any() else None,
        "best_value_probe": None
        if best is None
        else {
            k: (int(best[k]) if k in ("layer", "block", "step") else float(best[k]))
            for k in ("layer", "block", "step", "score", "control", "selectivity")
        },
    }
    lab.save(
        "probe_correctness",
        correctness,
        figures={
            "auroc": figures.layer_block_heatmap(correctness, "auroc", "Correctness probe AUROC", zmid=0.5)
        },
    )
    lab.save(
        "probe_values",
        values,
        summary,
        figures={"steps": figures.value_probe_heatmap(values), "curves": figures.probe_curves(values)},
    )
    return values, summary


def run_lens(lab: Lab, layers=None, blocks=None, slots=None, **_) -> Result:
    from rim_lens.analysis import lens

    store = lab.capture()
    half = store.n // 2
    tuned = lens.TunedLens().fit(store, examples=range(half))
    table = lens.logit_lens(
        lab.model,
        lab.tokenizer,
        store,
        layers=layers,
        blocks=blocks,
        slots=slots,
        examples=range(half, store.n),
        tuned=tuned,
    )
    quality = lens.lens_quality(lab.model, store, tuned=tuned, layers=layers, examples=range(half, store.n))
    by_layer = quality.groupby(["lens", "layer"])["top1_agreement"].mean()
    summary = {
        "top1_agreement_with_final": {
            f"{lens_name}/{layer}": float(v) for (lens_name, layer), v in by_layer.items()
        },
        "tuned_lens_fit_on": half,
        "evaluated_on": store.n - half,
    }
    lab.save("lens", table, summary, {"top1": figures.lens_top_tokens(table)})
    lab.save("lens_quality", quality)
    return table, summary
