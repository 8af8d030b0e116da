"""Steered generation: continue a prompt with feature edits applied at every step, beside the unedited model.

Each step is one `run_edited` pass over the whole sequence so far in the default (replacement) regime,
the error terms being the unmodified model's on that same sequence: so a step's logits are exactly what
`intervene` reports for that sequence, and edits at `*` reach the generated tokens too. An edit at a
fixed position (`-1` included) stays at that position of the prompt. No KV cache: simple and exact,
fine for the tens of tokens a steering check needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from circuit_catalog.ingest.interventions import Edit, Regime, clean_run, resolve, run_edited
from circuit_catalog.ingest.transcoder import TranscoderSet

from circuit_catalog.errors import InterventionError


@dataclass
class Generation:
    original: str  # the continuation only, without the prompt
    steered: str


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
    """The next token; sampled on the CPU (in float32) with a CPU generator, so a seed picks the same tokens on every device."""
    if temperature <= 0:
        return int(logits.argmax())
    return int(torch.multinomial((logits.float().cpu() / temperature).softmax(-1), 1, generator=generator))


@torch.no_grad()
def generate(model, tset: TranscoderSet, tokens: torch.Tensor, edits: list[Edit], n_tokens: int,
             temperature: float = 0.0, seed: int = 0, zero_bos: bool = True) -> Generation:
    """Greedy (temperature 0) or sampled continuations of `tokens`, unedited and edited, `n_tokens` each (EOS included)."""
    if len(tokens) + n_tokens > model.cfg.n_ctx:
        raise InterventionError(f"{len(tokens)} prompt tokens + {n_tokens} generated exceed the model's context of {model.cfg.n_ctx}")
    edits = resolve(edits, tset, len(tokens))
    texts = []
    for steer in (False, True):
        generator = torch.Generator().manual_seed(seed)  # the same draws for both, so only the edits differ
        seq = tokens.clone()
        for _ in range(n_tokens):
            if steer:
                logits = run_edited(model, tset, seq, edits, Regime.REPLACEMENT, clean_run(model, tset, seq, zero_bos), zero_bos).logits[-1]
            else:
                logits = model(seq[None])[0, -1]
            seq = torch.cat([seq, torch.tensor([_pick(logits, temperature, generator)], device=seq.device)])
        texts.append(model.tokenizer.decode(seq[len(tokens):].tolist()))
    return Generation(*texts)
