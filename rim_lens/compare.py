"""Methods side by side: the comparison table of `rim-lens demo`, the dashboard and the notebooks."""

from __future__ import annotations

from collections.abc import Mapping


def comparison(metrics: Mapping[str, dict]) -> list[dict]:
    """One row per run (metrics.json by name): accuracy with its 95% interval, any-block accuracy,
    answer tokens, forward passes, latency and its ratios to the run called `direct`."""
    base = metrics.get("direct", {})
    rows = []
    for name, m in metrics.items():

        def ratio(key: str, m: dict = m) -> float | None:
            return m[key] / base[key] if base.get(key) and m.get(key) else None

        lo, hi = m.get("accuracy_ci") or (None, None)
        rows.append(
            {
                "method": name,
                "accuracy": m["accuracy"],
                "accuracy_lo": lo,
                "accuracy_hi": hi,
                "any_block_accuracy": m.get("any_block_accuracy"),
                "answer_tokens": m["answer_tokens_mean"],
                "forward_passes": m["forward_passes_mean"],
                "ttft_ms": m.get("ttft_ms"),
                "latency_ms": m.get("latency_ms"),
                "ttft_vs_direct": ratio("ttft_ms"),
                "latency_vs_direct": ratio("latency_ms"),
                "train_time_s": m.get("train_time_s"),
            }
        )
    return rows


COLUMNS = (
    ("method", "method", "s"),
    ("accuracy", "accuracy (final block)", ".3f"),
    ("any_block_accuracy", "any-block", ".3f"),
    ("answer_tokens", "answer tokens", ".1f"),
    ("forward_passes", "forward passes", ".1f"),
    ("ttft_ms", "TTFT ms", ".2f"),
    ("latency_ms", "latency ms", ".2f"),
    ("ttft_vs_direct", "TTFT / direct", ".2f"),
    ("latency_vs_direct", "latency / direct", ".2f"),
    ("train_time_s", "train s", ".0f"),
)


def render(rows: list[dict]) -> str:
    """The comparison as a Markdown table (accuracy with its 95% interval when known)."""

    def cell(row: dict, key: str, spec: str) -> str:
        value = row.get(key)
        if value is None:
            return "–"
        text = format(value, spec)
        if key == "accuracy" and row.get("accuracy_lo") is not None:
            text += f" [{row['accuracy_lo']:.3f}, {row['accuracy_hi']:.3f}]"
        return text

    lines = ["| " + " | ".join(label for _, label, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r, key, spec) for key, _, spec in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)
