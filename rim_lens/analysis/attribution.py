"""Attribution patching: every cell's patching effect estimated from gradients (Nanda 2023;
Kramár et al. 2024, "AtP").

Patching a cell (resid[l] at one block position) from the clean run into the corrupt one changes
the metric by about (a_clean - a_corrupt) . d metric / d a, the gradient taken on the corrupt
run. One clean forward pass, one corrupt forward pass and one backward pass give this for every
cell of every pair in a batch at once (the metric is the sum over rows, and rows do not interact);
the pairs go through in batches of `max_rows`, so memory is bounded by the batch, not by the number
of pairs (gradients and full-vocabulary logits of a pretrained model take gigabytes per dozen
pairs). The table is exact patching's (`patching.patch`): per cell the estimated logit
difference and recovery, so the two sit side by side and `agreement` ranks one against the other.

Built on TransformerLens' `transformer_lens.tools.analysis.attribution_patching`, on the session's
TransformerBridge (booted from the checkpoint directory if the session's backend is not tl):

- activations and gradients come from its `cache_activation_and_gradient`;
- its `attribution_patch` scores component nodes (the embedding, each head's output, each MLP's
  output) pair by pair at batch 1. A cell is a residual-stream state, which is none of those
  nodes: its score is the sum of that function's edge scores that cross layer l at the cell's
  position (tests/test_patching_methods.py checks this), and one dot product per cell computes it
  directly, for all pairs in one batch. Its node scores at block positions, labelled
  (layer, block, slot, component), are the optional `components` table;
- its edges join a writer and a reader at the same position, so which position reads which is
  not among them. `block_edges` estimates that from the attention: the message query q takes
  from key k in layer l, A[q, k] v[k] per head, patched from clean, times the gradient at the
  head's output z[q] (exact for the message, linear after it). Summed over the positions of
  each block it says which block reads which, layer by layer: the diagonal-flow hypothesis is
  block t at layer l reading block t - 1 (resid[l], the output of layer l - 1).

By default the cells get AtP*'s QK fix (Kramár et al. 2024; `qk_fix`): plain attribution linearises
the cell's effect through layer l's softmax, which saturates (a patched key that takes over, or
drops out of, a query's attention moves the metric far more than the gradient says). With the fix
the change the patched keys and values make to layer l's attention output, at every query, is
computed exactly (the corrupt queries, the clean keys and values at the cell's positions), and only
what follows is linear; the cell's other paths (its query, the residual stream, the MLP) stay
first order. It costs no extra forward pass: the keys, values and queries come from the same two
runs, and the gradients at the attention's split key and value inputs from the same backward.
Measured on a question-visible K = 8 RiM (bench/patching.py): Spearman with exact patching over
cells 0.84 plain, 0.94 with the fix. AtP*'s other correction, GradDrop (for gradients of
opposite sign cancelling across paths), is not implemented.

Every TransformerLens call runs the bridge through `Masked`, which passes the batch's attention
mask and position ids: TransformerLens calls `model(tokens)`, a plain causal pass, which is not
the model's computation when the readout cannot see the question, or under left padding.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from scipy.stats import spearmanr

from rim_lens.analysis import figures
from rim_lens.analysis.backends import TOPS, TLBackend, make_backend
from rim_lens.analysis.patching import Pairs, PatchResult
from rim_lens.analysis.session import Session
from rim_lens.analysis.sites import Selection, block_index
from rim_lens.errors import RunError
from rim_lens.model.layouts import Batch, Role, block_positions
from rim_lens.stats import Estimate, bootstrap

QUESTION, ANSWER = "question", "answer"
MAX_ROWS = 8  # pairs per forward/backward: SmolLM2's 40 pairs in one batch peaked at 11.7 GB
INERT = 1e-6  # a cell whose patch moves no pair's logit difference more than this leaves it unchanged
_BRIDGES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its TransformerBridge


class Masked:
    """A TransformerBridge whose runs on tokens (a call, `run_with_hooks`, `run_with_cache`) get one
    batch's attention mask and position ids; everything else is the bridge's."""

    def __init__(self, bridge, batch: Batch) -> None:
        self._bridge = bridge
        self._inputs = {"attention_mask": batch.attention_mask, "position_ids": batch.position_ids}

    def __getattr__(self, name: str):
        return getattr(self._bridge, name)

    def __call__(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        return self._bridge(tokens, **self._inputs, **kwargs)

    def run_with_hooks(self, tokens: torch.Tensor, fwd_hooks=(), **kwargs):
        return self._bridge.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks), **self._inputs, **kwargs)

    def run_with_cache(self, tokens: torch.Tensor, **kwargs):
        return self._bridge.run_with_cache(tokens, **self._inputs, **kwargs)


def bridge_of(lab: Session):
    """The session's TransformerBridge: the tl backend's, or one booted once per model (on a copy
    of its weights as they are then: `backends.TLBackend`)."""
    if isinstance(lab.backend, TLBackend):
        return lab.backend.bridge
    if lab.model not in _BRIDGES:
        if lab.backend.model_dir is None:
            raise RunError(
                "patch method 'attribution' runs on a TransformerBridge, which boots from the checkpoint "
                "directory: open the session with Lab.open(run), or give Lab.from_model a model_dir"
            )
        _BRIDGES[lab.model] = make_backend("tl", lab.model, lab.tokenizer, lab.backend.model_dir).bridge
    bridge = _BRIDGES[lab.model]
    bridge.eval()
    return bridge


def _resid(l: int) -> str:
    return f"blocks.{l}.hook_resid_pre"


def _attn(l: int) -> list[str]:
    return [f"blocks.{l}.attn.hook_pattern", f"blocks.{l}.attn.hook_v", f"blocks.{l}.attn.hook_z"]


def _qk(l: int, rotary: bool) -> list[str]:
    """The hooks the QK fix reads at layer l: queries and keys as the scores use them (after the
    rotary embedding), and the gradients at the residual copies the keys and values read."""
    q, k = ("hook_rot_q", "hook_rot_k") if rotary else ("hook_q", "hook_k")
    attn = f"blocks.{l}.attn"
    return [f"{attn}.{q}", f"{attn}.{k}", f"{attn}.hook_k_input", f"{attn}.hook_v_input"]


@contextmanager
def split_qkv(bridge):
    """The bridge with separate residual copies for queries, keys and values (TransformerLens'
    `use_split_qkv_input`), so the gradient through the keys and values has a hook of its own;
    the caller's setting comes back afterwards."""
    saved = bool(bridge.cfg.use_split_qkv_input)
    bridge.set_use_split_qkv_input(True)
    try:
        yield
    finally:
        bridge.set_use_split_qkv_input(saved)


def gradients(
    lab: Session, pairs: Pairs, names: list[str], split: bool = False
) -> tuple[Batch, dict, dict, np.ndarray, np.ndarray]:
    """One clean forward, one corrupt forward and one backward over the pairs (one batch each):
    (the corrupt batch, clean activations, corrupt activations and gradients by hook name, the
    per-pair logit differences clean and corrupt). `split`: with the split query/key/value inputs."""
    from transformer_lens.tools.analysis.attribution_patching import cache_activation_and_gradient

    bridge = bridge_of(lab)
    clean = lab.builder.collate(pairs.prompts(lab.builder, "clean"), side="left")
    corrupt = lab.builder.collate(pairs.prompts(lab.builder, "corrupt"), side="left")
    rows = torch.arange(len(pairs.clean))
    values: dict[str, torch.Tensor] = {}

    def metric(which: str):
        def fn(logits: torch.Tensor) -> torch.Tensor:
            # Rows do not interact: the gradient of the sum at row i is row i's own gradient.
            ld = logits[rows, -1, pairs.clean_token] - logits[rows, -1, pairs.corrupt_token]
            values[which] = ld.detach()
            return ld.sum()

        return fn

    with split_qkv(bridge) if split else nullcontext():
        with torch.no_grad():
            clean_cache = cache_activation_and_gradient(
                Masked(bridge, clean),
                clean.input_ids,
                metric("clean"),
                names_filter=names,
                compute_gradient=False,
            )
        corrupt_cache = cache_activation_and_gradient(
            Masked(bridge, corrupt), corrupt.input_ids, metric("corrupt"), names_filter=names
        )
    return (
        corrupt,
        clean_cache.activations,
        {"activations": corrupt_cache.activations, "gradients": corrupt_cache.gradients},
        values["clean"].double().numpy(),
        values["corrupt"].double().numpy(),
    )


def cell_scores(
    batch: Batch, clean: dict, corrupt: dict, sel: Selection, per_slot: bool, fix: QKFix | None = None
) -> tuple[list[dict], np.ndarray]:
    """The cells (labels) and their attribution per pair [cells, pairs]: (a_clean - a_corrupt) . g
    at the cell's position, summed over the selected slots of a (layer, block) cell; with `fix`,
    the path through layer l's keys and values at the cell's positions replaced by its exact
    effect on the attention output (`QKFix`)."""
    pos = block_positions(batch)  # [pairs, K, M + 2]
    if per_slot:
        cells = [dict(layer=l, block=k, slot=j) for l in sel.layers for k in sel.blocks for j in sel.slots]
    else:
        cells = [dict(layer=l, block=k) for l in sel.layers for k in sel.blocks]
    rows = torch.arange(pos.shape[0])[:, None]
    scores = []
    for l in sel.layers:
        grad = corrupt["gradients"][_resid(l)]
        if fix is not None:  # the first-order path through the keys and values is replaced below
            grad = grad - fix.kv_gradient(corrupt, l)
        per_position = ((clean[_resid(l)] - corrupt["activations"][_resid(l)]) * grad).sum(-1)  # [B, S]
        mine = [c for c in cells if c["layer"] == l]
        at = torch.stack(
            [pos[:, block_index(c["block"]), [c["slot"]] if per_slot else list(sel.slots)] for c in mine]
        )  # [cells, B, P]
        score = per_position[rows, at].sum(-1)  # [cells, B]
        scores.append(score + fix.exact_kv(clean, corrupt, l, at) if fix is not None else score)
    return cells, torch.cat(scores).double().numpy()


class QKFix:
    """AtP*'s QK fix for residual-stream cells: what patching resid[l] at positions P does to layer
    l's attention through the keys and values at P, computed exactly at every query (the corrupt
    queries, the clean keys and values at P: a softmax with P's scores replaced), then taken
    first order onward by the gradient at the head outputs z."""

    def __init__(self, lab: Session) -> None:
        self.attention = [getattr(layer, lab.backend.attn_name) for layer in lab.backend.layers()]
        self.rotary = TOPS[lab.model.config.model_type][1] is not None

    def names(self, l: int) -> list[str]:
        return _qk(l, self.rotary)

    def kv_gradient(self, corrupt: dict, l: int) -> torch.Tensor:
        """[B, S, d] the gradient at resid[l] through layer l's keys and values (all heads)."""
        *_, k_in, v_in = self.names(l)
        return (corrupt["gradients"][k_in] + corrupt["gradients"][v_in]).sum(2)

    def exact_kv(self, clean: dict, corrupt: dict, l: int, at: torch.Tensor) -> torch.Tensor:
        """[C, B] the metric's change, first order from z on, when the keys and values of layer l
        at the positions `at` [C, B, P] (C cells at once) become the clean run's."""
        q_name, k_name, *_ = self.names(l)
        pattern, v_name, z_name = _attn(l)
        act = corrupt["activations"]
        A = act[pattern]  # [B, H, q, k]
        heads = A.shape[1]  # grouped-query keys and values serve several query heads
        tensors = (act[k_name], clean[k_name], act[v_name], clean[v_name])
        k_x, k_c, v_x, v_c = (
            x.repeat_interleave(heads // x.shape[2], dim=2) for x in tensors
        )  # [B, S, H, d]
        rows = torch.arange(A.shape[0])[None, :, None]
        z = act[z_name]  # [B, q, H, d]
        # Each query's scores at P move by scale * q . (k_clean - k_corrupt); the other keys keep
        # theirs, so only P's weights and the normaliser change: the new output is
        #   (rest + sum_P A e^shift v_clean) / (rest mass + sum_P A e^shift),
        # rest = z - sum_P A v_corrupt, computed in log space (a shift can be large).
        A_P = A[rows, :, :, at].permute(0, 1, 3, 4, 2)  # [C, B, H, q, P]
        dk = (k_c - k_x)[rows, at]  # [C, B, P, H, d]
        shift = torch.einsum("bqhd,cbphd->cbhqp", act[q_name], dk) * self.attention[l].scaling
        log_P = A_P.log() + shift
        log_rest = (1 - A_P.sum(-1)).clamp_min(0).log()
        norm = torch.logsumexp(torch.cat([log_rest[..., None], log_P], -1), -1)  # [C, B, H, q]
        rest = z - torch.einsum("cbhqp,cbphd->cbqhd", A_P, v_x[rows, at])
        taken = torch.einsum("cbhqp,cbphd->cbqhd", (log_P - norm[..., None]).exp(), v_c[rows, at])
        dz = (-norm).exp().transpose(2, 3)[..., None] * rest + taken - z
        return (dz * corrupt["gradients"][z_name]).sum((2, 3, 4))


def position_groups(batch: Batch) -> tuple[list[str], torch.Tensor]:
    """Labels of the position groups edges are summed over (the question, block 1..K, the answer)
    and each position's group index [B, S] (-1: padding)."""
    K = int(batch.blocks.max())
    labels = [QUESTION, *[f"block {k}" for k in range(1, K + 1)], ANSWER]
    group = torch.full_like(batch.roles, -1)
    group[batch.roles == Role.QUESTION] = 0
    is_block = (batch.roles >= Role.BLOCK_BEGIN) & (batch.roles <= Role.BLOCK_END)
    group[is_block] = batch.blocks[is_block]
    group[batch.roles == Role.READOUT] = K + 1
    return labels, group


def edge_sums(batch: Batch, clean: dict, corrupt: dict, layers: list[int]) -> tuple[list[str], torch.Tensor]:
    """Which block reads which, summed over the batch's pairs: the group labels and, per layer,
    reader group and source group [layers, groups, groups], the attribution of the messages the
    reader's positions take from the source's positions."""
    labels, group = position_groups(batch)
    n = len(labels)
    onehot = torch.nn.functional.one_hot(group.clamp_min(0), n).double() * (group >= 0)[..., None]
    sums = []
    for l in layers:
        pattern, v, z = _attn(l)
        A_c, A_x = clean[pattern], corrupt["activations"][pattern]  # [B, H, q, k]
        v_c, v_x = clean[v], corrupt["activations"][v]  # [B, k, H_kv, d]
        g = corrupt["gradients"][z]  # [B, q, H, d]
        heads = A_c.shape[1]
        v_c, v_x = (x.repeat_interleave(heads // x.shape[2], dim=2) for x in (v_c, v_x))  # grouped queries
        # The message q takes from k, clean minus corrupt, projected on the gradient at z[q]:
        # sum over heads of (A_c[q, k] v_c[k] - A_x[q, k] v_x[k]) . g[q], as batched matrix products.
        g = g.transpose(1, 2)  # [B, H, q, d]
        u_c, u_x = (g @ x.permute(0, 2, 3, 1) for x in (v_c, v_x))  # [B, H, q, k]
        s = (A_c * u_c - A_x * u_x).sum(1)
        sums.append(torch.einsum("bqk,bqr,bks->rs", s.double(), onehot, onehot))
    return labels, torch.stack(sums)


def block_edges(
    labels: list[str], sums: torch.Tensor, layers: list[int], n_pairs: int, gap: float
) -> pd.DataFrame:
    """The edge table from `edge_sums` over all pairs: per layer, reader and source, the mean
    attribution over pairs (`score`) and that as a share of the clean - corrupt gap (`recovery`)."""
    rows = []
    for i, l in enumerate(layers):
        for r, reader in enumerate(labels):
            for c, source in enumerate(labels):
                score = float(sums[i, r, c]) / n_pairs
                rows.append(
                    {
                        "layer": l,
                        "reader": reader,
                        "source": source,
                        "score": score,
                        "recovery": score / gap if gap else float("nan"),
                    }
                )
    return pd.DataFrame(rows)


def diagonal_share(edges: pd.DataFrame) -> dict:
    """How much of block-to-earlier-block attribution (|score|, blocks t >= 2 reading blocks < t)
    goes to block t - 1, against the share if it were spread evenly over the earlier blocks."""
    blocks = edges[edges["reader"].str.startswith("block") & edges["source"].str.startswith("block")]
    t = blocks["reader"].str.split().str[1].astype(int)
    s = blocks["source"].str.split().str[1].astype(int)
    earlier = blocks[s < t]
    if earlier.empty:
        return {}
    t, s = t[s < t], s[s < t]
    mass = earlier["score"].abs()
    share = float(mass[s == t - 1].sum() / mass.sum()) if mass.sum() else float("nan")
    readers = sorted(set(t))
    return {"previous_block_share": share, "even_share": float(np.mean([1 / (r - 1) for r in readers]))}


def components(lab: Session, pairs: Pairs, sel: Selection) -> pd.DataFrame:
    """TransformerLens' `attribution_patch` (node granularity, pair by pair) at the selected block
    positions: (layer, block, slot, component) and its node score, mean over pairs. Components are
    `head h` (that head's output), `mlp` and, at layer 0, `embed` (the token embedding); `layer` is
    the component's own layer (its output is part of resid[layer + 1])."""
    from transformer_lens.tools.analysis.attribution_patching import attribution_patch

    bridge = bridge_of(lab)
    totals: dict[tuple, float] = {}
    for clean_seq, corrupt_seq, ct, xt in zip(
        pairs.prompts(lab.builder, "clean"),
        pairs.prompts(lab.builder),
        pairs.clean_token,
        pairs.corrupt_token,
    ):
        batch = lab.builder.collate([corrupt_seq])
        # position -> (block label, slot)
        at = {int(p): (k + 1, j) for (k, j), p in np.ndenumerate(block_positions(batch)[0].numpy())}
        result = attribution_patch(
            Masked(bridge, batch),
            torch.tensor([clean_seq.ids]),
            torch.tensor([corrupt_seq.ids]),
            lambda logits, ct=int(ct), xt=int(xt): logits[0, -1, ct] - logits[0, -1, xt],
        )
        for node, score in result.node_scores.items():
            if node.position not in at:
                continue
            k, j = at[node.position]
            layer = 0 if node.layer is None else node.layer
            if layer not in sel.layers or k not in sel.blocks or j not in sel.slots:
                continue
            name = {"embed": "embed", "mlp_out": "mlp"}.get(node.kind, f"head {node.head}")
            key = (layer, k, j, name)
            totals[key] = totals.get(key, 0.0) + score / len(pairs.clean)
    return pd.DataFrame(
        [dict(layer=l, block=k, slot=j, component=c, score=s) for (l, k, j, c), s in totals.items()]
    )


def attribution_patch(
    lab: Session,
    sel: Selection,
    pairs: Pairs,
    per_slot: bool = False,
    seed: int = 0,
    edges: bool = True,
    with_components: bool = False,
    qk_fix: bool = True,
    max_rows: int = MAX_ROWS,
) -> AttributionResult:
    """Attribution patching over the cells of `patching.patch` (same table: the estimated logit
    difference and recovery per cell), with `edges` the block-to-block edge attribution, with
    `with_components` TransformerLens' node scores at block positions; `qk_fix` (default) applies
    AtP*'s QK fix to the cells (`QKFix`), False gives plain attribution (AtP), the gradient's
    first-order estimate. The pairs go through `max_rows` at a time (the result does not depend on
    it: rows do not interact)."""
    if lab.spec.uses_thoughts:
        raise RunError(
            "attribution patching runs the TransformerBridge on token ids in one pass; a Coconut "
            "model's continuous thoughts are hidden states fed back: use patch method 'full'"
        )
    layers = list(sel.layers)
    cells, scores, ld_clean, ld_corrupt, edge_totals = _estimates(
        lab, sel, pairs, per_slot, QKFix(lab) if qk_fix else None, edges, max_rows
    )
    patched = ld_corrupt[None] + scores
    gap = ld_clean.mean() - ld_corrupt.mean()
    table = _table(cells, patched, ld_corrupt, gap)
    result = AttributionResult(table, clean=ld_clean, corrupt=ld_corrupt, patched=patched)
    if edges:
        result.edges = block_edges(*edge_totals, layers, len(pairs.clean), gap)
    if with_components:
        result.components = components(lab, pairs, sel)
    result.summary = {
        "logit_diff_clean": float(ld_clean.mean()),
        "logit_diff_corrupt": float(ld_corrupt.mean()),
        "n": len(pairs.clean),
        "peak": result.peak(),
        "edges": diagonal_share(result.edges) if edges else None,
    }
    result.record = lab.record(
        "patch",
        sel,
        None,
        per_slot=per_slot,
        seed=seed,
        pairs=len(pairs.clean),
        method="attribution",
        edges=edges,
        components=with_components,
        qk_fix=qk_fix,
    )
    return result


def _estimates(
    lab: Session, sel: Selection, pairs: Pairs, per_slot: bool, fix: QKFix | None, edges: bool, max_rows: int
) -> tuple[list[dict], np.ndarray, np.ndarray, np.ndarray, tuple[list[str], torch.Tensor] | None]:
    """The gradients of the pairs, `max_rows` at a time, turned into the cells (labels) and each
    pair's estimated change of its logit difference per cell [cells, P], the clean and corrupt
    logit differences [P], and with `edges` the edge sums over the pairs (group labels, sums)."""
    layers = list(sel.layers)
    names = [_resid(l) for l in layers]
    names += [n for l in layers for n in _attn(l)] if edges or fix is not None else []
    names += [n for l in layers for n in fix.names(l)] if fix is not None else []
    names = list(dict.fromkeys(names))
    cells, scores, ld_clean, ld_corrupt, edge_total = [], [], [], [], None
    for start in range(0, len(pairs.clean), max_rows):
        chunk = pairs.subset(range(start, min(start + max_rows, len(pairs.clean))))
        batch, clean, corrupt, clean_ld, corrupt_ld = gradients(lab, chunk, names, split=fix is not None)
        cells, chunk_scores = cell_scores(batch, clean, corrupt, sel, per_slot, fix)
        scores.append(chunk_scores)
        ld_clean.append(clean_ld)
        ld_corrupt.append(corrupt_ld)
        if edges:
            labels, sums = edge_sums(batch, clean, corrupt, layers)
            edge_total = sums if edge_total is None else edge_total + sums
        del clean, corrupt  # this batch's activations and gradients, before the next batch's
    edge_totals = (labels, edge_total) if edges else None
    return cells, np.concatenate(scores, 1), np.concatenate(ld_clean), np.concatenate(ld_corrupt), edge_totals


def _table(cells: list[dict], patched: np.ndarray, corrupt: np.ndarray, gap: float) -> pd.DataFrame:
    """The patching table from the estimates: per cell the mean logit difference, the recovery
    (LD_patched - LD_corrupt) / (LD_clean - LD_corrupt) (`gap` the denominator) and the pairs."""
    return pd.DataFrame(
        [
            {
                **c,
                "logit_diff": float(p.mean()),
                "recovery": float((p.mean() - corrupt.mean()) / gap) if gap else float("nan"),
                "n": len(p),
            }
            for c, p in zip(cells, patched)
        ]
    )


def agreement(exact: PatchResult, estimate: PatchResult, n_boot: int = 1000, seed: int = 0) -> Estimate:
    """Spearman rank correlation over cells between exact patching's and an estimate's mean logit
    difference, with a bootstrap interval over pairs (both results on the same pairs and cells).
    Cells where both leave every pair's metric unchanged are left out: there (e.g. layer 0, where
    a block's state is its token embedding, the same in both runs) they agree by construction."""
    keys = [c for c in ("layer", "block", "slot") if c in exact.table]
    if exact.table[keys].values.tolist() != estimate.table[keys].values.tolist():
        raise RunError("agreement: the two patching results cover different cells")
    if exact.patched.shape != estimate.patched.shape:
        raise RunError("agreement: the two patching results cover different pairs")
    inert = [np.abs(r.patched - r.corrupt[None]).max(1) < INERT for r in (exact, estimate)]
    cells = ~(inert[0] & inert[1])
    a, b = exact.patched[cells], estimate.patched[cells]
    if cells.sum() < 3:
        raise RunError(f"agreement: {int(cells.sum())} cells change the metric; a rank correlation needs 3")

    def rho(idx: np.ndarray) -> float:
        i = idx.astype(int)
        return float(spearmanr(a[:, i].mean(1), b[:, i].mean(1)).statistic)

    return bootstrap(np.arange(a.shape[1]), statistic=rho, n_boot=n_boot, seed=seed)


@dataclass(repr=False)
class AttributionResult(PatchResult):
    """Attribution patching (`attribution`): exact patching's table and per-pair arrays, estimated
    from gradients; `edges` which block reads which per layer, `components` TransformerLens' node
    scores at block positions (either may be empty)."""

    edges: pd.DataFrame = field(default_factory=pd.DataFrame)
    components: pd.DataFrame = field(default_factory=pd.DataFrame)
    name: ClassVar[str] = "patch_attribution"

    def tables(self) -> dict[str, pd.DataFrame]:
        extra = {"patch_edges": self.edges, "patch_components": self.components}
        return {self.name: self.table, **{stem: t for stem, t in extra.items() if len(t)}}

    def figures(self) -> dict[str, go.Figure]:
        figs = {
            "patch_attribution.heatmap": figures.layer_block_heatmap(
                self.table, "recovery", "Attribution patching: estimated recovery of the clean answer", zmid=0
            )
        }
        if len(self.edges):
            figs["patch_edges.heatmap"] = figures.block_edges_heatmap(self.edges)
        return figs
