"""Hook backends: one interface over plain HF hooks, TransformerLens and nnsight.

Hook sites follow one naming scheme. `resid[l]` is the residual stream after l transformer
layers: l = 0 is the embedding output, l = n_layers is the last layer's output before the
final norm (TransformerLens `blocks.{l}.hook_resid_pre`, and `blocks.{L-1}.hook_resid_post`).
`attn[l]` is the attention output of layer l. An `Edit` overwrites `resid[l]` (l < n_layers)
at chosen (row, position) pairs before layer l reads it, so one forward pass can carry many
different interventions, one per batch row.

Every backend runs every analysis: `forward` (capture and edits) is all an analysis asks of it.
The hf backend can also resume a kept run from a layer and a position (`HFBackend.keep` and
`resume`): what exact patching uses to skip the work a patch leaves unchanged.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from rim_lens.errors import RunError
from rim_lens.model import coconut
from rim_lens.model.layouts import Batch, Role

BACKENDS = ("hf", "tl", "nnsight")
# Where each supported architecture keeps its decoder layers and their attention module.
LAYOUTS = {"gpt2": ("transformer.h", "attn"), "llama": ("model.layers", "self_attn")}
# What running the layers by hand (`HFBackend.resume`) needs besides them: the final norm, the
# rotary position embedding if the architecture has one (GPT-2 adds its positions at layer 0), and
# the name of a layer's MLP.
TOPS = {"gpt2": ("transformer.ln_f", None, "mlp"), "llama": ("model.norm", "model.rotary_emb", "mlp")}


@dataclass
class Edit:
    """Set resid[layer][rows[i], positions[i]] = values[i] (values: [N, d_model]); `values` may
    instead be a function of the states there ([N, d_model] -> [N, d_model]), e.g. adding a vector."""

    layer: int
    rows: torch.Tensor
    positions: torch.Tensor
    values: torch.Tensor | Callable[[torch.Tensor], torch.Tensor]

    def new(self, current: torch.Tensor) -> torch.Tensor:
        """The states that replace `current` (the states at rows, positions)."""
        new = self.values(current) if callable(self.values) else self.values
        return new.to(current.dtype)


@dataclass
class Output:
    logits: torch.Tensor
    resid: dict[int, torch.Tensor] = field(default_factory=dict)
    attn: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class Kept:
    """An intact run kept for resuming (`HFBackend.resume`): logits [B, S or 1, V], resid[l] [B, S, d]
    for every layer l < n_layers, and every layer's attention keys and values [B, heads, S, d_head]."""

    logits: torch.Tensor
    resid: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


def _first(x):
    """Module outputs are a Tensor in transformers 5 but a tuple in older code paths."""
    return x[0] if isinstance(x, tuple) else x


def _apply(hidden: torch.Tensor, edits: list[Edit]) -> torch.Tensor:
    if not edits:
        return hidden
    hidden = hidden.clone()
    for e in edits:
        hidden[e.rows, e.positions] = e.new(hidden[e.rows, e.positions])
    return hidden


def _by_layer(edits: Seq[Edit], n_layers: int) -> dict[int, list[Edit]]:
    out: dict[int, list[Edit]] = defaultdict(list)
    for e in edits:
        if not 0 <= e.layer < n_layers:
            raise RunError(f"layer {e.layer} out of range: edits take layers 0..{n_layers - 1}")
        out[e.layer].append(e)
    return out


def _thought_edits(
    batch: Batch, edits: dict[int, list[Edit]]
) -> tuple[dict[int, dict[int, list[Edit]]], dict[int, list[Edit]]]:
    """The edits of a batch holding Coconut thoughts as (by thought pass k, then by layer, each
    moved to index 0 of the pass, where thought k sits; by layer, at the batch's positions,
    replaying the values the passes computed), so an edit's function runs once per forward."""
    by_pass: dict[int, dict[int, list[Edit]]] = defaultdict(lambda: defaultdict(list))
    replay: dict[int, list[Edit]] = defaultdict(list)
    for layer, group in edits.items():
        for e in group:
            where = batch.blocks[e.rows, e.positions]
            on_thought = bool((batch.roles[e.rows, e.positions] == Role.THOUGHT).all())
            if not (on_thought and len(where) and bool((where == where[0]).all())):
                raise RunError(
                    "an edit of a prompt holding continuous thoughts addresses one thought (block k, "
                    "slot 0) in every row it edits"
                )
            computed: list[torch.Tensor] = []

            def once(current: torch.Tensor, e: Edit = e, computed: list = computed) -> torch.Tensor:
                computed.append(e.new(current))
                return computed[-1]

            by_pass[int(where[0])][layer].append(Edit(layer, e.rows, torch.zeros_like(e.positions), once))
            replay[layer].append(Edit(layer, e.rows, e.positions, lambda _, computed=computed: computed[-1]))
    return by_pass, replay


class Backend:
    """Runs a model on a Batch, capturing resid/attn sites and applying edits. Only a backend with
    `runs_thoughts` runs a batch holding Coconut thoughts (the others refuse it)."""

    name = ""
    runs_thoughts = False

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_dir: str | Path | None = None
    ):
        arch = model.config.model_type
        if arch not in LAYOUTS:
            raise RunError(
                f"backend {self.name}: unsupported architecture {arch!r} (supported: {', '.join(LAYOUTS)})"
            )
        self.model, self.tokenizer, self.model_dir = model, tokenizer, model_dir
        self.layers_path, self.attn_name = LAYOUTS[arch]
        self.n_layers = model.config.num_hidden_layers
        self.d_model = model.config.hidden_size

    def layers(self) -> torch.nn.ModuleList:
        return self.module(self.layers_path)

    def module(self, path: str) -> torch.nn.Module:
        """The HF model's submodule at a dotted path, e.g. `transformer.ln_f`."""
        module = self.model
        for part in path.split("."):
            module = getattr(module, part)
        return module

    def check_layers(self, layers: Seq[int]) -> None:
        for l in layers:
            if not 0 <= l <= self.n_layers:
                raise RunError(f"layer {l} out of range: this model has resid sites 0..{self.n_layers}")

    @property
    def lens_model(self) -> PreTrainedModel | object:
        """What the logit lens reads states through (its final norm and unembedding)."""
        return self.model

    @torch.no_grad()
    def forward(
        self, batch: Batch, capture: Seq[int] = (), edits: Seq[Edit] = (), capture_attn: Seq[int] = ()
    ) -> Output:
        """One forward pass: logits, resid[l] for l in `capture` (before layer l's own edits),
        attention outputs of the layers in `capture_attn`, with `edits` applied."""
        self.check_layers(list(capture) + list(capture_attn))
        if coconut.has_thoughts(batch) and not self.runs_thoughts:
            raise RunError(
                f"backend {self.name} runs a prompt in one pass; Coconut's continuous thoughts need "
                "their sequential passes: use backend hf"
            )
        return self._forward(
            batch, sorted(set(capture)), _by_layer(edits, self.n_layers), sorted(set(capture_attn))
        )

    def _forward(
        self, batch: Batch, capture: list[int], edits: dict[int, list[Edit]], capture_attn: list[int]
    ) -> Output:
        raise NotImplementedError


class HFBackend(Backend):
    """Plain PyTorch forward hooks on the HF model.

    It is the backend that runs Coconut's continuous thoughts (`rim_lens.model.coconut`). Thought
    k is block k, slot 0; an edit there, at layer l, edits resid[l] at thought k's position in the
    pass that computes that position (pass k), so what that pass feeds back as thought k + 1, and
    every later thought, is recomputed from the edited state (an edit at layer 0 edits thought k as
    fed: for Llama resid[0] is the fed vector itself, for GPT-2 that plus the position embedding).
    Logits and captured states then come from one pass with the resulting thoughts
    teacher-forced and the same edits (the values the passes computed, so an edit function runs
    once): by causality its states equal the passes' at every position, and they are in the
    batch's own frame.
    """

    name = "hf"
    runs_thoughts = True

    @property
    def resumable(self) -> bool:
        """Whether `keep` and `resume` can run this model's layers by hand (a GPT-2 or Llama causal LM
        with its KV cache and head; not, e.g., a hand-built `planted.PlantedLM`)."""
        return hasattr(self.model, "lm_head") and self.model.config.model_type in TOPS

    def _forward(self, batch, capture, edits, capture_attn):
        out = Output(logits=torch.empty(0))
        inputs = batch.model_inputs()
        if coconut.has_thoughts(batch):
            by_pass, edits = _thought_edits(batch, edits)
            thoughts = coconut.thought_forward(
                self.model,
                batch,
                pass_context=lambda k: self._hooks(Output(torch.empty(0)), [], by_pass[k], []),
            ).thoughts
            inputs = coconut.thought_inputs(self.model, batch, thoughts)
        with self._hooks(out, capture, edits, capture_attn):
            out.logits = self.model(**inputs, use_cache=False).logits
        return out

    @contextmanager
    def _hooks(
        self, out: Output, capture: list[int], edits: dict[int, list[Edit]], capture_attn: list[int]
    ) -> Iterator[None]:
        """Hooks, while inside, that capture into `out` and apply `edits` in every forward pass."""
        layers, handles = self.layers(), []

        def pre_hook(l):
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                if l in capture:
                    out.resid[l] = hidden.detach().clone()
                new = _apply(hidden, edits.get(l, []))
                if args:
                    return (new, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": new}

            return hook

        def post_hook(module, args, output):
            out.resid[self.n_layers] = _first(output).detach().clone()

        def attn_hook(l):
            def hook(module, args, output):
                out.attn[l] = _first(output).detach().clone()

            return hook

        try:
            for l in set(capture) | set(edits):
                if l < self.n_layers:
                    handles.append(layers[l].register_forward_pre_hook(pre_hook(l), with_kwargs=True))
            if self.n_layers in capture:
                handles.append(layers[-1].register_forward_hook(post_hook))
            for l in capture_attn:
                handles.append(getattr(layers[l], self.attn_name).register_forward_hook(attn_hook(l)))
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def keep(self, batch: Batch, last_only: bool = False) -> Kept:
        """One intact forward pass of `batch`, kept: logits (`last_only`: of the last position only,
        [B, 1, V]), every layer's input and its keys and values."""
        resid: dict[int, torch.Tensor] = {}

        def grab(l):
            def hook(module, args, kwargs):
                resid[l] = (args[0] if args else kwargs["hidden_states"]).detach()

            return hook

        handles = [
            layer.register_forward_pre_hook(grab(l), with_kwargs=True)
            for l, layer in enumerate(self.layers())
        ]
        cache = DynamicCache(config=self.model.config)
        try:
            keep = 1 if last_only else 0  # 0: every position
            logits = self.model(
                **batch.model_inputs(), cache=cache, use_cache=True, logits_to_keep=keep
            ).logits
        finally:
            for h in handles:
                h.remove()
        layers = range(self.n_layers)
        return Kept(
            logits,
            [resid[l] for l in layers],
            [cache.layers[l].keys for l in layers],
            [cache.layers[l].values for l in layers],
        )

    @torch.no_grad()
    def resume(
        self,
        kept: Kept,
        rows: torch.Tensor,
        batch: Batch,
        layer: int,
        offset: int,
        edits: Seq[Edit] = (),
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [len(rows), S - offset, V] of rows `rows` of the kept run with `edits` applied, run from
        resid[layer] at positions offset.. only: below `layer`, and at every layer before `offset`, the
        rows equal the kept run, so its states, keys and values stand in (exact when no edit is
        earlier; attention is causal). `batch` holds the rows' inputs (its mask and positions).
        `last_only`: the logits of the last position alone [len(rows), 1, V]; the last layer's MLP
        then runs there only (nothing reads its other positions)."""
        by_layer = _by_layer(edits, self.n_layers)
        early = [
            e for e in edits if e.layer < layer or (len(e.positions) and int(e.positions.min()) < offset)
        ]
        if early:
            raise RunError(
                f"resume from layer {layer}, position {offset}: an edit at layer {early[0].layer} is earlier"
            )
        # The kept keys and values of positions before `offset`, at every layer from `layer` on.
        prefix = [
            (kept.keys[l][rows, :, :offset], kept.values[l][rows, :, :offset])
            if l >= layer and offset
            else (None, None)
            for l in range(self.n_layers)
        ]
        cache = DynamicCache(prefix, config=self.model.config)
        hidden = kept.resid[layer][rows, offset:]
        positions = batch.position_ids[:, offset:]
        kwargs = dict(attention_mask=batch.attention_mask[:, :, offset:], position_ids=positions)
        norm, rotary, mlp = TOPS[self.model.config.model_type]
        if rotary:
            kwargs["position_embeddings"] = self.module(rotary)(hidden, positions)
        handles = []
        if last_only:
            # The MLP is position-wise and the residual add broadcasts its one position: the last
            # position's output is exact, the others (read by nobody) are not computed.
            last_mlp = getattr(self.layers()[-1], mlp)
            handles.append(
                last_mlp.register_forward_pre_hook(lambda module, args: (args[0][:, -1:], *args[1:]))
            )
        try:
            for l in range(layer, self.n_layers):
                shifted = [Edit(e.layer, e.rows, e.positions - offset, e.values) for e in by_layer.get(l, [])]
                hidden = _first(
                    self.layers()[l](_apply(hidden, shifted), cache=cache, use_cache=True, **kwargs)
                )
        finally:
            for h in handles:
                h.remove()
        return self.model.lm_head(self.module(norm)(hidden[:, -1:] if last_only else hidden))


class TLBackend(Backend):
    """TransformerLens 4.x TransformerBridge hook points (`blocks.{l}.hook_resid_pre`, ...)."""

    name = "tl"

    def __init__(self, model, tokenizer, model_dir=None):
        super().__init__(model, tokenizer, model_dir)
        if model_dir is None:
            raise RunError("backend tl needs the checkpoint directory (TransformerBridge boots from it)")
        from transformer_lens.model_bridge import TransformerBridge

        try:
            # On a copy: booting replaces the HF model's modules with bridge components in place, and
            # their attention ignores transformers 5's KV cache (`cache=`; TransformerLens 4.3 looks
            # for `past_key_values`), so greedy decoding and `HFBackend.resume` on the same model
            # object would silently attend to nothing before the new tokens.
            self.bridge = TransformerBridge.boot_transformers(
                str(model_dir), hf_model=copy.deepcopy(model), tokenizer=tokenizer, device="cpu"
            )
        except Exception as err:  # noqa: BLE001 - any boot failure means the architecture is unsupported
            raise RunError(
                f"backend tl: cannot wrap {model.config.model_type!r} in a TransformerBridge ({err})"
            ) from None

    @property
    def lens_model(self) -> object:
        return self.bridge

    @staticmethod
    def site(l: int, n_layers: int) -> str:
        return f"blocks.{l}.hook_resid_pre" if l < n_layers else f"blocks.{n_layers - 1}.hook_resid_post"

    def _forward(self, batch, capture, edits, capture_attn):
        out = Output(logits=torch.empty(0))
        hooks = []

        def resid_hook(l):
            def hook(tensor, hook):
                if l in capture:
                    out.resid[l] = tensor.detach().clone()
                return _apply(tensor, edits.get(l, []))

            return hook

        def attn_hook(l):
            def hook(tensor, hook):
                out.attn[l] = _first(tensor).detach().clone()

            return hook

        for l in set(capture) | set(edits):
            hooks.append((self.site(l, self.n_layers), resid_hook(l)))
        for l in capture_attn:
            hooks.append((f"blocks.{l}.hook_attn_out", attn_hook(l)))
        out.logits = self.bridge.run_with_hooks(
            batch.input_ids,
            fwd_hooks=hooks,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        )
        return out


class NNsightBackend(Backend):
    """nnsight 0.8 `TransformersModel`: reads and writes module inputs inside a trace."""

    name = "nnsight"

    def __init__(self, model, tokenizer, model_dir=None):
        super().__init__(model, tokenizer, model_dir)
        from nnsight.modeling.transformers import TransformersModel

        self.wrapped = TransformersModel(model, tokenizer=tokenizer)

    def _forward(self, batch, capture, edits, capture_attn):
        envoy = self.wrapped
        for part in self.layers_path.split("."):
            envoy = getattr(envoy, part)
        saved_resid, saved_attn = {}, {}
        with self.wrapped.trace(**batch.model_inputs(), use_cache=False):
            # nnsight requires modules to be visited in execution order.
            for l in range(self.n_layers):
                layer = envoy[l]
                if l in capture:
                    saved_resid[l] = layer.input.clone().save()
                for e in edits.get(l, []):
                    layer.input[e.rows, e.positions] = e.new(layer.input[e.rows, e.positions])
                if l in capture_attn:
                    saved_attn[l] = _first(getattr(layer, self.attn_name).output).clone().save()
            if self.n_layers in capture:
                saved_resid[self.n_layers] = _first(envoy[self.n_layers - 1].output).clone().save()
            logits = self.wrapped.lm_head.output.save()
        return Output(logits=logits, resid=dict(saved_resid), attn=dict(saved_attn))


def make_backend(
    name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_dir: str | Path | None = None
) -> Backend:
    """The backend called `name` ("hf", "tl" or "nnsight") over a loaded checkpoint."""
    classes = {"hf": HFBackend, "tl": TLBackend, "nnsight": NNsightBackend}
    if name not in classes:
        raise RunError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return classes[name](model, tokenizer, model_dir)
