"""What `intervene` does, as one API call: a prompt (text, or a catalog prompt's id or text), edits, an
optional steered continuation, and the record in the catalog.

A catalog prompt is run on the token ids its graph was built on (and with its position-0 setting), so
the intervention and the graph speak of the same positions; any other text is tokenized as the graphs
are (`prompt_tokens`). Everything is checked and computed before the catalog is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from circuit_catalog.catalog import layout
from circuit_catalog.catalog.manifest import Manifest
from circuit_catalog.ingest.attribution import prompt_tokens, target_token
from circuit_catalog.ingest.intervention_log import add_intervention, intervention_row
from circuit_catalog.ingest.interventions import Edit, Outcome, Regime, intervene
from circuit_catalog.ingest.steering import Generation, generate
from circuit_catalog.ingest.transcoder import TranscoderSet
from circuit_catalog.queries.neuronpedia import find_prompt_id

from circuit_catalog.errors import UserError


@dataclass
class Recorded:
    outcome: Outcome
    generation: Generation | None
    prompt_id: str | None  # the catalog prompt run, if it was one
    id: str | None  # the intervention's id in the catalog, if recorded


def catalog_prompt(catalog_dir: Path, key: str) -> tuple[str, dict]:
    """(id, prompt.json) of a catalog prompt given by id or exact text."""
    pid = find_prompt_id(Path(catalog_dir), key)
    return pid, json.loads(layout.prompt_info(Path(catalog_dir), pid).read_text())


def graph_tokens(model, info: dict) -> tuple[torch.Tensor, bool]:
    """The token ids a catalog prompt's graph was built on, and whether position 0 had no features."""
    tokens = torch.tensor(info["tokens"], dtype=torch.long, device=model.cfg.device)
    return tokens, json.loads(info["settings"]).get("zero_bos", True)


def run_intervention(model, tset: TranscoderSet, prompt: str, edits: list[Edit], regime: Regime = Regime.REPLACEMENT,
                     targets: list[str] = (), k: int = 10, catalog_dir: Path | None = None, n_generate: int | None = None,
                     temperature: float = 0.0, seed: int = 0) -> Recorded:
    """Run the edits on the prompt; with `catalog_dir`, record them there (the prompt may then be a catalog id)."""
    manifest = Manifest.read(Path(catalog_dir)) if catalog_dir is not None else None
    prompt_id, info = None, None
    if catalog_dir is not None and (Path(catalog_dir) / layout.PROMPT_INDEX).is_file():
        try:
            prompt_id, info = catalog_prompt(catalog_dir, prompt)
        except UserError:
            pass  # text that is not a catalog prompt: run as given
    tokens, zero_bos = graph_tokens(model, info) if info is not None else (prompt_tokens(model, prompt), True)
    target_ids = [target_token(model, t) for t in targets]
    result = intervene(model, tset, tokens, edits, regime, target_ids, k, zero_bos)
    generation = generate(model, tset, tokens, edits, n_generate, temperature, seed, zero_bos) if n_generate else None
    row_id = None
    if manifest is not None:
        settings = {"n": n_generate, "temperature": temperature, "seed": seed} if n_generate else None
        row = intervention_row(manifest, tokens.tolist(), prompt_id, edits, result, generation, settings)
        add_intervention(Path(catalog_dir), row)
        row_id = row["id"]
    return Recorded(result, generation, prompt_id, row_id)
