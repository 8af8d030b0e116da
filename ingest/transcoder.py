"""The one in-memory representation of transcoders, whatever format they came from.

Shapes follow TransformerLens/SAELens: `W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_out]`,
`b_dec [d_out]`, optional `W_skip [d_in, d_out]` (files store it transposed; converted on load),
optional JumpReLU `threshold [d_sae]`. Config is kept apart from the weights, as in SAELens.

A cross-layer transcoder (CLT) is a set whose features, read at layer l, also write into the MLP
outputs of later layers: `W_dec_later [d_sae, n_later, d_out]`, slice j writing into layer l + 1 + j
(`W_dec` stays the write into layer l itself). A per-layer set is the case n_later = 0, so code that
asks the set what writes into a layer (`TranscoderSet.writes_into`, `reconstruct`, `total_write`)
serves both; code that reads `W_dec` alone is per-layer only and says so (`require_per_layer`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from circuit_catalog.ingest.mapped_weights import prefetch_mapped, release_mapped

from circuit_catalog.errors import TranscoderError

ACTIVATIONS = ("relu", "jumprelu", "topk")


def check_tensors(tensors: dict[str, torch.Tensor | None], shapes: dict[str, tuple[int, ...]], where: object) -> None:
    """Each of these tensors that is present has its expected shape and finite values; one-line error otherwise."""
    for name, shape in shapes.items():
        t = tensors.get(name)
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise TranscoderError(f"{where}: {name} has shape {tuple(t.shape)}, expected {shape}")
        if not torch.isfinite(t).all():
            raise TranscoderError(f"{where}: {name} contains NaN or infinite values")


@dataclass(kw_only=True)
class TranscoderConfig:
    """What a transcoder reads and writes, and how it activates."""

    layer: int
    d_in: int
    d_sae: int
    d_out: int
    hook_in: str  # e.g. blocks.8.ln2.hook_normalized
    hook_out: str  # e.g. blocks.8.hook_mlp_out
    activation: str = "relu"
    k: int | None = None  # TopK only
    model_name: str = ""
    # trained on the Hugging Face modules: the MLP's input after the norm's weight (and bias), its output
    # uncentred; `TranscoderSet.bind` re-expresses it in TransformerLens's terms (folded norms, centred writes)
    hf_modules: bool = False


@dataclass
class Transcoder:
    """Weights plus config; `source` names the file it was read from (for error messages)."""

    cfg: TranscoderConfig
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    W_skip: torch.Tensor | None = None
    threshold: torch.Tensor | None = None
    source: str = ""
    W_dec_later: torch.Tensor | None = None  # [d_sae, n_later, d_out]: writes into layers layer+1 .. layer+n_later

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Shapes agree with the config and every value is finite; one-line error otherwise."""
        c, where = self.cfg, self.source or f"transcoder for layer {self.cfg.layer}"
        if c.activation not in ACTIVATIONS:
            raise TranscoderError(f"{where}: unknown activation {c.activation!r} (expected one of {ACTIVATIONS})")
        expected = {
            "W_enc": (c.d_in, c.d_sae),
            "b_enc": (c.d_sae,),
            "W_dec": (c.d_sae, c.d_out),
            "b_dec": (c.d_out,),
            "W_skip": (c.d_in, c.d_out),
            "threshold": (c.d_sae,),
        }
        check_tensors({name: getattr(self, name) for name in expected}, expected, where)
        if self.W_dec_later is not None:
            t = self.W_dec_later
            if t.dim() != 3 or (t.shape[0], t.shape[2]) != (c.d_sae, c.d_out):
                raise TranscoderError(f"{where}: cross-layer decoder has shape {tuple(t.shape)}, expected ({c.d_sae}, n_later, {c.d_out})")
            if not torch.isfinite(t).all():
                raise TranscoderError(f"{where}: cross-layer decoder contains NaN or infinite values")
        if c.activation == "jumprelu" and self.threshold is None:
            raise TranscoderError(f"{where}: JumpReLU transcoder without a threshold")
        if c.activation == "topk" and not c.k:
            raise TranscoderError(f"{where}: TopK transcoder without k")

    @property
    def layer(self) -> int:
        return self.cfg.layer

    @property
    def n_later(self) -> int:
        return 0 if self.W_dec_later is None else self.W_dec_later.shape[1]

    def decoder_into(self, layer: int) -> torch.Tensor | None:
        """[d_sae, d_out]: what one unit of each feature writes into `layer`'s MLP output (None: nothing)."""
        if layer == self.layer:
            return self.W_dec
        if self.layer < layer <= self.layer + self.n_later:
            return self.W_dec_later[:, layer - self.layer - 1]
        return None

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] -> [..., d_sae] encoder pre-activations, in the weights' dtype (TransformerLens hands norm
        outputs over in float32 when the model runs in bf16/fp16)."""
        return x.to(self.W_enc.dtype) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.cfg.activation == "relu":
            return torch.relu(pre)
        if self.cfg.activation == "jumprelu":
            return pre * (pre > self.threshold)
        top = torch.topk(pre, self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_acts(x))

    def decode(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction of this layer's MLP output by this layer's features alone (all of it for a
        per-layer transcoder; see `TranscoderSet.reconstruct` for a CLT); the skip path needs the input `x`."""
        out = z @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise ValueError("a skip transcoder needs its input to decode")
            out = out + x.to(self.W_skip.dtype) @ self.W_skip
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x)

    @torch.no_grad()
    def fold_into(self, model) -> None:
        """Re-express a transcoder trained on the Hugging Face modules for the loaded model, exactly.

        It was trained on `x' = x * w + b`, the norm's output with its weight w (and bias b), where the loaded
        model's `ln2.hook_normalized` gives `x` (TransformerLens folds w and b into the next weights); so
        `W_enc <- w * W_enc`, `b_enc <- b_enc + b @ W_enc`, and the same for a skip path (its `b @ W_skip` joins
        `b_dec`). It predicts the MLP's output as the module writes it, which LayerNorm models loaded with
        centred writes see centred: every write (decoder rows and slices, `b_dec`, skip) is centred too.
        """
        norms = getattr(model, "mlp_input_norms", None)
        where = self.source or f"transcoder for layer {self.layer}"
        if norms is None or self.layer not in norms:
            raise TranscoderError(f"{where}: trained on the Hugging Face MLP input, and the model's norm weights are unknown "
                                  "(load the model through circuit-catalog's loader from a local directory or GGUF)")
        if not self.cfg.hook_in.endswith("ln2.hook_normalized"):
            raise TranscoderError(f"{where}: trained on the Hugging Face MLP input but hooked at {self.cfg.hook_in}")
        w, b = norms[self.layer]
        if b is not None:
            self.b_enc = self.b_enc + b @ self.W_enc
        self.W_enc = w[:, None] * self.W_enc
        if self.W_skip is not None:
            if b is not None:
                self.b_dec = self.b_dec + b @ self.W_skip
            self.W_skip = w[:, None] * self.W_skip
        if model.cfg.normalization_type in ("LN", "LNPre"):  # TransformerLens centred the writes
            def centre(t: torch.Tensor) -> torch.Tensor:
                return t - t.mean(-1, keepdim=True)
            self.W_dec, self.b_dec = centre(self.W_dec), centre(self.b_dec)
            self.W_skip = None if self.W_skip is None else centre(self.W_skip)
            self.W_dec_later = None if self.W_dec_later is None else centre(self.W_dec_later)
        self.cfg.hf_modules = False
        self.check()


@dataclass
class TranscoderSet:
    """Per-layer transcoders keyed by layer, with the files they came from (hashed in the manifest)."""

    by_layer: dict[int, Transcoder]
    files: list[Path] = field(default_factory=list)
    format: str = ""
    source: str = ""  # the path or release it was loaded from (the manifest names files relative to it)

    @property
    def layers(self) -> list[int]:
        return sorted(self.by_layer)

    def __getitem__(self, layer: int) -> Transcoder:
        return self.by_layer[layer]

    def __iter__(self):
        return (self.by_layer[layer] for layer in self.layers)

    @property
    def cross_layer(self) -> bool:
        return any(tc.n_later for tc in self)

    def require_per_layer(self, what: str) -> None:
        """One-line refusal for computations not yet defined for cross-layer transcoders."""
        if self.cross_layer:
            raise TranscoderError(f"{what} does not support cross-layer transcoders yet")

    def writes_into(self, layer: int) -> list[tuple[Transcoder, torch.Tensor]]:
        """Every transcoder whose features write into `layer`'s MLP output, with that decoder slice."""
        out = []
        for tc in self:
            W = tc.decoder_into(layer)
            if W is not None:
                out.append((tc, W))
        return out

    def total_write(self, layer: int, before: int) -> torch.Tensor:
        """[d_sae, d_out]: what one unit of each feature of `layer` writes into the residual stream
        in the layers from `layer` up to (not including) `before`: the sum of its decoder slices (each
        slice's mapped pages handed back once added, so a CLT's many slices never sit in memory together)."""
        tc = self[layer]
        total = tc.W_dec.clone()
        for lay in range(layer + 1, before):
            W = tc.decoder_into(lay)
            if W is not None:
                total += W
                release_mapped()
        return total

    def writes_from(self, layer: int, readers: list[int]) -> Iterator[tuple[int, torch.Tensor]]:
        """(reader, `total_write(layer, reader)`) for each reader after `layer`, in increasing order, kept as one
        running sum: a CLT's decoder slices are each read once per source layer, not once per (source, reader)
        pair. The tensor yielded is updated in place at the next step: use it before asking for the next.

        Mapped pages are handed back after each reader except the source's decoder file's, and those after the
        last: a CLT's slices are interleaved row by row in that file, so reading one slice faults in the pages of
        its neighbours too, and handing them back between readers read the whole file from disk once per slice
        (memory stays bounded: one source's decoder, one reader's encoder)."""
        tc = self[layer]
        readers = sorted(r for r in readers if r > layer)
        prefetch_mapped((tc.W_dec, tc.W_dec_later, *(self[r].W_enc for r in readers[:1])))
        total, upto = tc.W_dec.clone(), layer + 1
        for i, reader in enumerate(readers):
            if i + 1 < len(readers):  # the next reader's encoder is read from disk while this one's pullbacks compute
                prefetch_mapped((self[readers[i + 1]].W_enc,))
            for lay in range(upto, reader):
                W = tc.decoder_into(lay)
                if W is not None:
                    total += W
            upto = reader
            yield reader, total
            release_mapped(keep=(tc.W_dec, tc.W_dec_later))
        release_mapped()

    def decode_into(self, layer: int, z: dict[int, torch.Tensor], x: dict[int, torch.Tensor]) -> torch.Tensor:
        """Layer `layer`'s reconstructed MLP output from the activations `z` of every layer writing into it
        (and its input `x[layer]`, for a skip path): its `b_dec`, its skip path, and every decoder slice."""
        tc = self[layer]
        recon = tc.b_dec + (x[layer].to(tc.W_skip.dtype) @ tc.W_skip if tc.W_skip is not None else 0)
        for src, W in self.writes_into(layer):
            recon = recon + z[src.layer] @ W
        return recon

    def reconstruct(self, z: dict[int, torch.Tensor], x: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Every layer's reconstructed MLP output (`decode_into` for each)."""
        return {layer: self.decode_into(layer, z, x) for layer in self.layers}

    def select(self, layers: list[int] | None) -> TranscoderSet:
        """The subset for `layers` (None: all); unknown layers are a user error."""
        if layers is None:
            return self
        if self.cross_layer and sorted(layers) != self.layers:
            raise TranscoderError("a cross-layer transcoder is used whole: its features write into every later layer")
        missing = sorted(set(layers) - set(self.by_layer))
        if missing:
            raise TranscoderError(f"no transcoder for layer(s) {missing}; available: {self.layers}")
        return replace(self, by_layer={layer: self.by_layer[layer] for layer in layers})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TranscoderSet:
        """Move every weight to `device` and/or cast it to `dtype`, in place (returns the set).

        Weights already there stay the same tensors: on the CPU in float32 the memory-mapped views of the
        files stay views (no copy), which keeps the bounded-memory pullback ingest bounded. Elsewhere they are
        copied (a set larger than the device's memory does not fit there)."""
        names = ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip", "threshold", "W_dec_later")
        for tc in self:
            for name in names:
                t = getattr(tc, name)
                if t is not None:
                    setattr(tc, name, t.to(device=device, dtype=dtype))
        return self

    def bind(self, model) -> None:
        """Check the set fits `model`, move it to the model's device and dtype, and express every transcoder
        trained on the Hugging Face modules in the loaded model's terms (`Transcoder.fold_into`, in float32
        before the cast), once."""
        self.validate_against(model)
        self.to(model.W_E.device)
        for tc in self:
            if tc.cfg.hf_modules:
                tc.fold_into(model)
        self.to(dtype=model.W_E.dtype)

    def require_bound(self) -> None:
        """Computations on a model need `bind(model)` first where a transcoder was trained on the HF modules."""
        unbound = [tc.layer for tc in self if tc.cfg.hf_modules]
        if unbound:
            raise TranscoderError(f"transcoders of layers {unbound} were trained on the Hugging Face modules; "
                                  "bind them to the model first (TranscoderSet.bind)")

    def validate_against(self, model) -> None:
        """Layer range, widths and hook names must fit the model."""
        n_layers, d_model = model.cfg.n_layers, model.cfg.d_model
        for tc in self:
            c, where = tc.cfg, tc.source or f"layer {tc.layer}"
            if not 0 <= c.layer < n_layers:
                raise TranscoderError(f"{where}: layer {c.layer} is outside the model's 0..{n_layers - 1}")
            if c.d_in != d_model or c.d_out != d_model:
                raise TranscoderError(
                    f"{where}: transcoder maps d_in={c.d_in} -> d_out={c.d_out}, the model's d_model is {d_model}"
                )
            for hook in (c.hook_in, c.hook_out):
                if hook not in model.hook_dict:
                    raise TranscoderError(f"{where}: hook {hook!r} does not exist in the model")
