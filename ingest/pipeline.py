"""The compute side of the API: load a model and its transcoders, then ingest, train, evaluate, look at activations.

Each function takes a model and transcoders either already loaded (a HookedTransformer, a TranscoderSet)
or as what the CLI takes (a model name / directory / .gguf / alias; a transcoder directory or file), so a
notebook and the CLI run the same code. `load` is the one place that loads both, selects layers and binds
the transcoders to the model (checking that they fit); every model-running command goes through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from typing import TYPE_CHECKING

from circuit_catalog.errors import ExecutorError
from circuit_catalog.ingest.settings import STATS_ADDED, AttributionSettings, IngestSettings, PromptSpec, read_prompts

if TYPE_CHECKING:
    from circuit_catalog.ingest.transcoder import TranscoderSet

def load_model(model, device: str | None = None, dtype: str | None = None):
    """A HookedTransformer from a TransformerLens name, a Hugging Face directory, a .gguf file or an alias
    (`smollm2-135m`), on `device` (None: CUDA when available) in `dtype` (None: float32); a model already loaded is
    returned as it is."""
    if not isinstance(model, (str, Path)):
        return model
    from circuit_catalog.ingest.models import load_model as load

    return load(str(model), device=device, dtype=dtype)


def load_transcoders(transcoders, layers: list[int] | None = None, trust_pickle: bool = False,
                     model=None) -> TranscoderSet:
    """A transcoder set from a SAELens / circuit-tracer / Gemma Scope / sparsify directory, a `hf://` release or
    original GPT-2 transcoder files (`trust_pickle` for those), restricted to `layers` (None: all), and bound to
    `model` when one is given (checked to fit it)."""
    from circuit_catalog.ingest.transcoder import TranscoderSet
    from circuit_catalog.ingest.transcoder_formats import load_transcoders as load

    tset = transcoders if isinstance(transcoders, TranscoderSet) else load(transcoders, trust_pickle=trust_pickle)
    tset = tset.select(layers)
    if model is not None:
        tset.bind(model)
    return tset


def load(model, transcoders, layers: list[int] | None = None, trust_pickle: bool = False, device: str | None = None,
         dtype: str | None = None):
    """(model, transcoders): the transcoders read first (a bad file fails before a slow model load), then the
    model, then the transcoders bound to it (moved to its device and dtype)."""
    tset = load_transcoders(transcoders, layers, trust_pickle)
    lm = load_model(model, device, dtype)
    tset.bind(lm)
    return lm, tset


def model_name(model) -> str:
    """The name recorded in the manifest: the spec as given, or a loaded model's own name."""
    if not isinstance(model, (str, Path)):
        return model.cfg.model_name
    from circuit_catalog.ingest.models import resolve_model

    return resolve_model(str(model)).name


@dataclass
class IngestResult:
    """What an ingest left in the catalog: rows per part, and the prompts' rows (scores, node counts)."""

    directory: Path
    counts: dict[str, int]
    prompts: list = field(default_factory=list)  # PromptInfo rows of every prompt in the catalog
    unchanged: bool = False  # the receipt matched: nothing was loaded or written (`ingest.receipt`)


def ingest(model, transcoders, catalog_dir: str | Path, *, settings=None, layers: list[int] | None = None,
           trust_pickle: bool = False, dataset: str | None = None, n_tokens: int = 100_000, ctx_len: int = 128,
           prompts: list[str | PromptSpec] | str | Path | None = None, attribution: AttributionSettings | None = None,
           device: str | None = None, dtype: str | None = None, progress: bool = True, executor: str = "serial",
           address: str | None = None) -> IngestResult:
    """Write the catalog: pullback, de-embedding and logit-lens edges (`settings`: an `IngestSettings`); with
    `dataset`, activation statistics over `n_tokens` tokens; with `prompts` (texts, `PromptSpec`s, or a .txt /
    .jsonl file), attribution graphs (`attribution`: an `AttributionSettings`). Resumable: a rerun computes only
    what is missing, and refuses other settings before writing anything.

    `executor="ray"` runs the independent units (token edges, layer pairs, statistics shards, prompts) as Ray tasks
    on the cluster at `address` (None: a local one; `ingest.executor.RayExecutor`), each worker loading `model` and
    `transcoders` (names or paths, then, on storage every worker sees, as is `catalog_dir`) on its own `device`; this
    process loads them on the CPU to plan, check and record. The catalog is the serial run's, part for part."""
    from circuit_catalog.catalog.lock import writer_lock
    from circuit_catalog.catalog.manifest import Manifest
    from circuit_catalog.ingest import receipt
    from circuit_catalog.queries.prompt_graph import PromptInfo, prompt_index

    if executor not in ("serial", "ray") or executor == "serial" and address is not None:
        raise ExecutorError(f"executor {executor!r}" + (" with an address" if executor == "serial" else "")
                            + ": expected 'serial', or 'ray' (with an optional address)")
    catalog_dir = Path(catalog_dir)
    specs = _prompt_specs(prompts)
    request = {"model": model, "transcoders": transcoders, "layers": layers, "trust_pickle": trust_pickle,
               "settings": settings or IngestSettings(), "dataset": dataset, "n_tokens": n_tokens if dataset else None,
               "ctx_len": ctx_len if dataset else None, "prompts": specs, "attribution": attribution or AttributionSettings(),
               "dtype": str(dtype or "float32").removeprefix("torch."), "stats_fields": STATS_ADDED if dataset else None}
    digest = receipt.request_digest(catalog_dir, request)
    if digest is not None:
        with writer_lock(catalog_dir):  # a catalog another process is writing is refused, as the full path would
            if receipt.matches(catalog_dir, digest):
                return IngestResult(catalog_dir, dict(Manifest.read(catalog_dir).counts),
                                    [PromptInfo.from_row(r) for r in prompt_index(catalog_dir)], unchanged=True)
    # the receipt did not answer: the compute modules (torch, TransformerLens) from here on
    from circuit_catalog.catalog.crash import crash_point
    from circuit_catalog.catalog.tallies import refresh_tallies
    from circuit_catalog.ingest.device import DRIVER_DEVICE
    from circuit_catalog.ingest.executor import LoadSpec, RayExecutor, SerialExecutor
    from circuit_catalog.ingest.job import build_manifest, plan_stats, run_ingest, write_stats
    from circuit_catalog.ingest.prompts import check_prompt, run_prompts
    from circuit_catalog.ingest.supernodes import supernodes_stale, write_supernodes

    if executor == "ray":  # the cluster first: an unreachable one fails before the slow load
        runner = RayExecutor(LoadSpec.of(model, transcoders, layers, trust_pickle, device, dtype), address)
        device = DRIVER_DEVICE  # here the model only plans, checks and records: the workers compute
    try:
        lm, tset = load(model, transcoders, layers, trust_pickle, device, dtype)
        if executor == "serial":
            runner = SerialExecutor(lm, tset)
        for spec in specs:  # every refusal comes before the first write
            check_prompt(lm, spec)
        manifest = build_manifest(lm, model_name(model), tset, tset.source or "in memory", settings or IngestSettings(),
                                  device=runner.device)
        stats_plan = plan_stats(lm, tset, catalog_dir, dataset, n_tokens, ctx_len) if dataset is not None else None
        with writer_lock(catalog_dir):  # parts, statistics and prompts under one hold: no other writer in between
            done = run_ingest(lm, tset, catalog_dir, manifest, progress=progress, executor=runner)
            crash_point("phase")  # between the parts and the statistics (tests: the lock is held there too)
            if stats_plan is not None:
                write_stats(lm, tset, catalog_dir, stats_plan, progress=progress, executor=runner)
            if specs:
                run_prompts(lm, tset, catalog_dir, specs, attribution or AttributionSettings(), progress=progress, executor=runner)
                if supernodes_stale(catalog_dir):
                    write_supernodes(catalog_dir, tset)
                refresh_tallies(catalog_dir)  # here, not at the next load, so the receipt covers it
            receipt.write_receipt(catalog_dir, request)
    finally:
        if executor == "ray":
            runner.close()
    return IngestResult(catalog_dir, dict(done.counts), [PromptInfo.from_row(r) for r in prompt_index(catalog_dir)])


def _prompt_specs(prompts) -> list[PromptSpec]:

    if prompts is None:
        return []
    if isinstance(prompts, (str, Path)) and Path(prompts).suffix in (".txt", ".jsonl"):
        return read_prompts(Path(prompts))
    if isinstance(prompts, str):
        prompts = [prompts]
    return [p if isinstance(p, PromptSpec) else PromptSpec(text=p) for p in prompts]


def train(model, out_dir: str | Path, config, force: bool = False, device: str | None = None, progress: bool = True):
    """Train one transcoder per layer of `config` (a `TrainConfig`; its `model` is set from `model`, empty `layers`
    means all) into `out_dir` (SAELens format); a finished run with the same config there is reused unless
    `force`. Returns (TrainResult, reused)."""
    from circuit_catalog.ingest.device import matmul_dtype_for
    from circuit_catalog.ingest.train import reusable, train_transcoders

    out_dir = Path(out_dir)
    lm = load_model(model, device, config.dtype)
    config = replace(config, model=model_name(model), layers=config.layers or list(range(lm.cfg.n_layers)),
                     matmul_dtype=matmul_dtype_for(config.matmul_dtype, lm.W_E.device))
    found = None if force else reusable(out_dir, config)
    if found is not None:
        return found, True
    return train_transcoders(lm, config, out_dir, progress=progress), False


def evaluate(model, transcoders, dataset: str = "brown", n_tokens: int = 4096, ctx_len: int = 128,
             layers: list[int] | None = None, skip_contexts: int | None = 0, trust_pickle: bool = False,
             device: str | None = None, dtype: str | None = None, progress: bool = True):
    """Transcoder fidelity on a dataset: FVU, L0, dead features, next-token CE with MLPs replaced / zeroed /
    mean-ablated (an `EvalResult`). `skip_contexts` None: past the contexts the transcoders were trained on when their
    training record says (`train.trained_contexts`), else from the start."""
    from circuit_catalog.ingest.datasets import token_contexts
    from circuit_catalog.ingest.evaluate import evaluate_transcoders
    from circuit_catalog.ingest.models import check_context

    lm, tset = load(model, transcoders, layers, trust_pickle, device, dtype)
    check_context(lm, ctx_len)
    if skip_contexts is None:
        from circuit_catalog.ingest.train import trained_contexts

        skip_contexts = trained_contexts(Path(transcoders), dataset, ctx_len) or 0
    tokens = token_contexts(lm.tokenizer, dataset, n_tokens, ctx_len, skip_contexts=skip_contexts)
    return evaluate_transcoders(lm, tset, tokens, progress=progress)


def active(model, transcoders, prompt: str, pos: int = -1, k: int = 10, layers: list[int] | None = None,
           trust_pickle: bool = False, device: str | None = None, dtype: str | None = None, rank: str = "activation",
           target: str | None = None):
    """The k transcoder features at one position of a prompt with the largest activation (a real forward pass) or,
    `rank="influence"`, the largest influence on the logits (on `target`'s when given) in the prompt's
    attribution graph (`ingest.activations.rank_features`)."""
    from circuit_catalog.ingest.activations import rank_features

    lm, tset = load(model, transcoders, layers, trust_pickle, device, dtype)
    return rank_features(lm, tset, prompt, pos, k, rank, target)


def intervene(model, transcoders, prompt: str, edits: list, regime=None, targets: list[str] = (), k: int = 10,
              catalog_dir: str | Path | None = None, n_generate: int | None = None, temperature: float = 0.0, seed: int = 0,
              layers: list[int] | None = None, trust_pickle: bool = False, device: str | None = None,
              dtype: str | None = None):
    """Run the local replacement model with feature `edits` (`ingest.interventions.parse_edit("set", "L3/5@4=0")`)
    on a prompt (text, or with `catalog_dir` a catalog prompt's id or text): next-token probabilities and target
    logits before and after; optionally a steered continuation; recorded in the catalog when one is given."""
    from circuit_catalog.ingest.interventions import Regime
    from circuit_catalog.queries.intervention_runs import run_intervention

    lm, tset = load(model, transcoders, layers, trust_pickle, device, dtype)
    return run_intervention(lm, tset, prompt, edits, regime or Regime.REPLACEMENT, list(targets), k,
                            None if catalog_dir is None else Path(catalog_dir), n_generate, temperature, seed)


def validate(model, transcoders, catalog_dir: str | Path, prompt: str, k: int = 20, n_paths: int = 5,
             layers: list[int] | None = None, trust_pickle: bool = False, device: str | None = None,
             dtype: str | None = None):
    """Ablate a catalog prompt's k most influential features and its strongest paths: the graph's predicted
    logit changes against the measured ones (a `Validation`)."""
    from circuit_catalog.queries.validation import validate as validate_prompt

    lm, tset = load(model, transcoders, layers, trust_pickle, device, dtype)
    return validate_prompt(lm, tset, Path(catalog_dir), prompt, k, n_paths)


def qk(model, transcoders, prompt: str, head: str, query_pos: int, key_pos: int, catalog_dir: str | Path | None = None,
       layers: list[int] | None = None, trust_pickle: bool = False, device: str | None = None, dtype: str | None = None):
    """Why `head` (e.g. "L7H3") attended from `query_pos` to `key_pos` of a prompt (text, or with `catalog_dir` a
    catalog prompt's id or text): its pre-softmax score split into exact bilinear node-pair terms (a `QKAttribution`)."""
    from circuit_catalog.queries.heads import qk_for_prompt

    lm, tset = load(model, transcoders, layers, trust_pickle, device, dtype)
    return qk_for_prompt(lm, tset, prompt, head, query_pos, key_pos, None if catalog_dir is None else Path(catalog_dir))
