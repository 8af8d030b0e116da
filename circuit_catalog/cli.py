"""The `circuit-catalog` command: a thin click shell over the Python API.

Each command parses its options, calls one API function and prints. User errors (`UserError`)
are caught once, here, and printed as one line with exit code 1.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from circuit_catalog.errors import UserError
from circuit_catalog.ingest.settings import MAX_FEATURE_NODES

out = Console()
err = Console(stderr=True)


def _error(message: str, code: int) -> None:
    """One line on stderr, whatever the message holds (user text can carry newlines)."""
    err.print(Text.assemble(("error:", "bold red"), " ", " ".join(message.split())), highlight=False, soft_wrap=True)
    sys.exit(code)


class _Group(click.Group):
    def main(self, *args, **kwargs):
        """Usage errors (exit 2) are one `error:` line too, not click's usage block."""
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:  # a bare command or group asks for its help
            click.echo(exc.format_message(), err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            _error(exc.format_message(), exc.exit_code)
        except click.Abort:
            _error("aborted", 1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            _error(str(exc), 1)


def _finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """click's float ranges let NaN through (every comparison with it is false)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def _count_or(value: str, word: str, minimum: int = 1) -> int | None:
    """`word` (e.g. 'all', 'auto') -> None; an integer >= `minimum` (1 or 0) as itself."""
    kind = "positive" if minimum == 1 else "non-negative"
    if value.strip().lower() == word:
        return None
    try:
        n = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a {kind} integer nor {word!r}") from None
    if n < minimum:
        raise click.BadParameter(f"{n} is not a {kind} integer (or {word!r})")
    return n


def parse_layers(text: str | None) -> list[int] | None:
    """'all' -> None; '0-3,8' -> [0, 1, 2, 3, 8]; '0-28:4' -> every 4th layer from 0 to 28."""
    if text is None or text == "all":
        return None
    layers: list[int] = []
    usage = f"{text[:40]!r}: expected e.g. 'all', '0-11', '0,4,8' or '0-28:4'"
    try:
        for item in text.split(","):
            span, _, step = item.partition(":")
            lo, _, hi = span.partition("-")
            lo, hi, step = int(lo), int(hi or lo), int(step or 1)
            if not 0 <= lo <= hi < 100_000 or step < 1:
                raise click.BadParameter(f"{usage} (ranges run upwards from 0, steps from 1)", param_hint="'--layers'")
            layers.extend(range(lo, hi + 1, step))
    except ValueError:
        raise click.BadParameter(usage, param_hint="'--layers'") from None
    return sorted(set(layers))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="circuit-catalog")
def main() -> None:
    """Precompute transcoder circuits (pullbacks, de-embeddings, logit lens) once, then query them.

    Typical flow: `train` (or bring SAELens / circuit-tracer transcoders), `ingest` into a catalog
    directory, then `show` a feature.
    """


MODEL_HELP = "TransformerLens name, local Hugging Face directory, .gguf file, or alias smollm2-135m."


def compute_options(f):
    """--device, --dtype: where and in what precision the model and transcoders run (results are stored in float32)."""
    f = click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
                     help="Precision of the model and transcoders (weights are read and processed in float32, then cast); "
                          "results are stored in float32 whatever it is.")(f)
    return click.option("--device", default="auto", show_default=True,
                        help="'auto' (CUDA when available, else the CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'.")(f)


@main.command()
@click.option("--model", required=True, help=MODEL_HELP)
@click.option("--dataset", default="brown", show_default=True, help="'brown', a .txt/.jsonl file or folder, or a HF dataset name.")
@click.option("--layers", default="all", show_default=True, help="Layers to train: 'all', '0-11', '0,4,8', '0-28:2'.")
@click.option("--d-sae", type=click.IntRange(1), default=2304, show_default=True, help="Features per transcoder.")
@click.option("--tokens", "n_tokens", type=click.IntRange(1), default=40_000, show_default=True, help="Training tokens (collected once, reused each epoch).")
@click.option("--epochs", type=click.IntRange(1), default=1, show_default=True)
@click.option("--lr", type=float, callback=_finite, default=4e-4, show_default=True, help="Adam learning rate (peak, between the warm-up and the decay).")
@click.option("--activation", type=click.Choice(["batchtopk", "relu"]), default="batchtopk", show_default=True,
              help="batchtopk: k active features per token on average, an auxiliary loss for dead features, saved as JumpReLU; "
                   "relu: the seed's ReLU with an L1 penalty.")
@click.option("--k", type=click.IntRange(1), default=32, show_default=True, help="batchtopk: mean active features per token (L0).")
@click.option("--l1", "l1_coefficient", type=float, callback=_finite, default=0.02, show_default=True, help="relu: L1 coefficient, in units where each layer's target has unit variance.")
@click.option("--warmup", type=click.FloatRange(0, 1), callback=_finite, default=0.05, show_default=True, help="Fraction of the steps over which the learning rate rises from 0.")
@click.option("--decay", type=click.FloatRange(0, 1), callback=_finite, default=0.2, show_default=True, help="Fraction of the steps, at the end, over which it falls to 0.")
@click.option("--matmul-dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
              help="The training's matmuls: auto is bfloat16 where the device has it natively (CUDA, AVX512-BF16/AMX CPUs); weights stay float32.")
@click.option("--outliers", "outlier_factor", type=click.FloatRange(0), callback=_finite, default=200.0, show_default=True,
              help="Leave out of training a token whose MLP output lies more than this many times the median token's squared "
                   "distance from the mean (massive activations); 0 keeps every token.")
@click.option("--outlier-feature/--no-outlier-feature", default=True, show_default=True,
              help="batchtopk: after training, fit one feature per layer in closed form to the tokens --outliers left out "
                   "(in the slot of the feature that fires least); without it their output is left to the error term.")
@click.option("--resamples", type=click.IntRange(0), default=6, show_default=True,
              help="batchtopk: times, evenly spread before the decay, that features silent for the second half of the steps "
                   "since the previous time (and 5,000 tokens at least) are re-initialised on badly reconstructed tokens.")
@click.option("--curve-ce", type=click.IntRange(0), default=0, show_default=True,
              help="Measure CE loss recovered (all layers replaced, held-out tokens) at this many points of the training curve.")
@click.option("--minibatch", type=click.IntRange(1), default=128, show_default=True)
@click.option("--ctx-len", type=click.IntRange(2), default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Directory for the SAELens-format transcoders.")
@click.option("--skip", is_flag=True, help="Skip transcoders: add an affine skip connection (SAELens skip_transcoder).")
@click.option("--force", is_flag=True, help="Retrain even if OUT already holds a run with the same settings.")
@compute_options
def train(model, dataset, layers, d_sae, n_tokens, epochs, lr, activation, k, l1_coefficient, warmup, decay, matmul_dtype,
          outlier_factor, outlier_feature, resamples, curve_ce, minibatch, ctx_len, seed, skip, out_dir, force, device, dtype):
    """Train one transcoder per layer (ln2.hook_normalized -> hook_mlp_out), saved in SAELens format, with its
    training curve (OUT/training.json)."""
    from circuit_catalog.ingest.pipeline import train as train_
    from circuit_catalog.ingest.train import TrainConfig

    cfg = TrainConfig(model=model, dataset=dataset, layers=parse_layers(layers) or [], d_sae=d_sae, n_tokens=n_tokens, epochs=epochs,
                      lr=lr, activation=activation, k=k, l1_coefficient=l1_coefficient, warmup=warmup, decay=decay,
                      matmul_dtype=matmul_dtype, outlier_factor=outlier_factor, outlier_feature=outlier_feature, resamples=resamples, curve_ce=curve_ce, minibatch=minibatch, ctx_len=ctx_len, seed=seed, skip=skip, dtype=dtype)
    result, reused = train_(model, out_dir, cfg, force=force, device=device)
    if reused:
        err.print(f"reusing transcoders in {out_dir} (same settings; --force retrains)")
    table = Table("layer", "FVU", "L0", "dead", title=f"transcoders in {out_dir}")
    for m in result.metrics:
        table.add_row(str(m.layer), f"{m.fvu:.3f}", f"{m.l0:.1f}", f"{m.dead_fraction:.1%}")
    out.print(table)
    out.print(f"mean FVU {result.mean_fvu:.3f} over {len(result.metrics)} layers (held-out tokens)")
    if result.outlier_features:
        out.print("features fitted to the outlier tokens: " + ", ".join(f"L{layer}/{f}" for layer, f in result.outlier_features.items()))
    if result.curve:
        last = result.curve[-1]
        measured = [p for p in result.curve if p.ce_recovered is not None]
        ce = f"; CE recovered at {', '.join(f'{p.seconds / 60:.1f} min {p.ce_recovered:.3f}' for p in measured)}" if measured else ""
        out.print(f"training curve ({len(result.curve)} points, {out_dir / 'training.json'}): {last.step} steps in "
                  f"{last.seconds / 60:.1f} min{ce}")


@main.command()
@click.option("--model", required=True, help=MODEL_HELP)
@click.option("--transcoders", required=True, type=click.Path(path_type=Path), help="SAELens dir(s), circuit-tracer dir, or original GPT-2 .pt files.")
@click.option("--catalog", "catalog_dir", required=True, type=click.Path(path_type=Path), help="Catalog directory to write (resumable).")
@click.option("--layers", default="all", show_default=True, help="Transcoder layers to ingest.")
@click.option("--top-k", type=click.IntRange(1), default=16, show_default=True, help="Pullback sources kept per (feature, earlier layer).")
@click.option("--min-weight", type=click.FloatRange(0), callback=_finite, default=None, help="Drop pullback edges with |weight| below this.")
@click.option("--token-top-k", type=click.IntRange(1), default=20, show_default=True, help="Tokens kept per feature for de-embedding and logit lens.")
@click.option("--heads-top-k", type=click.IntRange(1), default=None, help="Also OV pullbacks per attention head: feature and token sources kept per (feature, head).")
@click.option("--trust-pickle", is_flag=True, help="Allow the pickled original GPT-2 transcoder files (pickle can run code).")
@click.option("--dataset", default=None, help="Also collect activation statistics over this dataset ('brown', files, HF name).")
@click.option("--tokens", "n_tokens", type=click.IntRange(1), default=100_000, show_default=True, help="Tokens of --dataset for statistics.")
@click.option("--ctx-len", type=click.IntRange(2), default=128, show_default=True, help="Context length for statistics.")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="Also compute attribution graphs: one prompt per line (.txt) or JSON lines with 'prompt' and optional 'target'.")
@click.option("--max-feature-nodes", type=click.IntRange(1), default=MAX_FEATURE_NODES, show_default=True, help="Feature nodes per graph, chosen by estimated influence.")
@click.option("--all-features", is_flag=True, help="No cap on feature nodes (every active feature).")
@click.option("--max-n-logits", type=click.IntRange(1), default=10, show_default=True, help="Logit targets at most.")
@click.option("--desired-logit-prob", type=click.FloatRange(0, 1), callback=_finite, default=0.95, show_default=True, help="Logit targets up to this cumulative probability.")
@click.option("--node-threshold", type=click.FloatRange(0, 1), callback=_finite, default=0.8, show_default=True, help="Pruning: keep nodes carrying this share of influence.")
@click.option("--edge-threshold", type=click.FloatRange(0, 1), callback=_finite, default=0.98, show_default=True, help="Pruning: keep edges carrying this share of influence.")
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True, help="Attribution targets per backward sweep.")
@click.option("--bos-features", is_flag=True, help="Give position 0 (the BOS or other leading special token) feature nodes too; by default it has none and its MLP output is a constant in each target's bias.")
@click.option("--head-edges", default="1000", show_default=True, callback=lambda ctx, param, value: _count_or(value, "all"),
              help="Pruned edges split by attention head (edges_heads), the most influential first; 'all' for every one (~50 bytes an edge).")
@click.option("--unpruned-edges", is_flag=True,
              help="Keep every non-zero edge of the unpruned graph (edges_full, ~2-3 MB a SmolLM2 prompt); by default only those into the logits and the custom target, which validation reads.")
@click.option("--target", "custom_tokens", multiple=True, help="Custom attribution target for every prompt without its own: the sum of these tokens' logits (repeatable).")
@click.option("--contrast", multiple=True, help="With --target: minus these tokens' logits, e.g. --target ' Paris' --contrast ' London'.")
@click.option("--direction", type=click.Path(path_type=Path), default=None, help="Custom target: a .npy vector of d_model values read after the final norm at the last position.")
@click.option("--target-weight", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True, help="The custom target's weight in pruning (as a logit's probability).")
@compute_options
@click.option("--pullback-score-dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
              help="Precision of the pullback scores that choose each feature's candidate edges (twice --top-k, or those near "
                   "--min-weight); the kept edges' weights are then recomputed and stored in float32. 'auto': bfloat16 on CUDA, "
                   "float32 elsewhere (on a CPU the bf16 path measured slower).")
@click.option("--executor", type=click.Choice(["serial", "ray"]), default="serial", show_default=True,
              help="Where the independent units (token edges, layer pairs, statistics shards, prompts) run: in this process "
                   "one after another, or as Ray tasks (pip install 'circuit-catalog[ray]'); the catalog is the same.")
@click.option("--address", default=None,
              help="With --executor ray: the cluster, 'auto' or HOST:PORT from one of its nodes, ray://HOST:10001 from anywhere "
                   "(default: start a local one). The catalog, model and transcoders must be on storage every worker sees.")
def ingest(model, transcoders, catalog_dir, layers, top_k, min_weight, token_top_k, heads_top_k, trust_pickle, dataset, n_tokens, ctx_len,
           prompts_file, max_feature_nodes, all_features, max_n_logits, desired_logit_prob, node_threshold, edge_threshold, batch_size,
           bos_features, head_edges, unpruned_edges, custom_tokens, contrast, direction, target_weight, device, dtype, pullback_score_dtype,
           executor, address):
    """Write pullback, de-embedding and logit-lens edges for every layer pair into a catalog directory;
    with --dataset, activation statistics (DIR/stats/); with --prompts, attribution graphs (DIR/prompts/)."""
    from circuit_catalog.ingest.pipeline import ingest as ingest_
    from circuit_catalog.ingest.settings import AttributionSettings, IngestSettings, read_prompts, with_custom_target

    specs = with_custom_target(read_prompts(prompts_file) if prompts_file is not None else [], custom_tokens, contrast,
                               None if direction is None else str(direction), target_weight)
    attribution = AttributionSettings(max_feature_nodes=None if all_features else max_feature_nodes, max_n_logits=max_n_logits,
                                      desired_logit_prob=desired_logit_prob, node_threshold=node_threshold,
                                      edge_threshold=edge_threshold, batch_size=batch_size, zero_bos=not bos_features,
                                      head_edges=head_edges, unpruned_edges=unpruned_edges)
    settings = IngestSettings(top_k=top_k, min_weight=min_weight, token_top_k=token_top_k, pullback_score_dtype=pullback_score_dtype,
                              heads_top_k=heads_top_k)
    result = ingest_(model, transcoders, catalog_dir, layers=parse_layers(layers), trust_pickle=trust_pickle, settings=settings,
                     dataset=dataset, n_tokens=n_tokens, ctx_len=ctx_len, prompts=specs, attribution=attribution,
                     device=device, dtype=dtype, executor=executor, address=address)
    if result.unchanged:
        out.print(f"{catalog_dir} is up to date: the last ingest had the same arguments, inputs and files (nothing loaded)", soft_wrap=True)
    table = Table("part", "rows", title=f"catalog {catalog_dir}")
    for name, n in result.counts.items():
        table.add_row(name, f"{n:,}")
    out.print(table)
    if specs:
        _print_prompts(result.prompts)


def _print_prompts(rows) -> None:
    """PromptInfo rows: from the catalog's files (with node counts) or from a store (without)."""
    counts = bool(rows) and rows[0].n_feature_nodes is not None
    table = Table("prompt", "tokens", "replacement", "completeness", *(["feature nodes"] if counts else []), "target", "text",
                  title="attribution graphs")
    table.columns[0].no_wrap, table.columns[0].min_width = True, 16  # ids are what the other commands take: never cut
    for r in rows:
        nodes = [f"{r.n_feature_nodes}" + (f" of {r.n_active_features}" if r.capped else "")] if counts else []
        table.add_row(r.id, str(r.n_tokens), f"{r.replacement_score:.3f}", f"{r.completeness_score:.3f}", *nodes,
                      "" if r.target is None else repr(r.target), r.text[:60])
    out.print(table)


def _with_catalog(f):
    """Turn --catalog/--store/--database into one `cat` argument: a Catalog, closed when the command ends."""

    @functools.wraps(f)
    def command(*args, catalog_dir, store_uri="embedded", database=None, **kwargs):
        from circuit_catalog.queries.catalog import Catalog

        with Catalog(catalog_dir, store_uri, database) as cat:
            return f(*args, cat=cat, **kwargs)

    return command


def catalog_option(f):
    """--catalog alone: commands that read the directory's files and need no store."""
    return click.option("--catalog", "catalog_dir", required=True, type=click.Path(path_type=Path),
                        help="Catalog directory (from `ingest`).")(_with_catalog(f))


def store_options(f):
    """--catalog, --store, --database: where the graph lives."""
    f = _with_catalog(f)
    f = click.option("--database", default=None, help="Neo4j database name (server default if omitted).")(f)
    f = click.option("--store", "store_uri", default="embedded", show_default=True, envvar="CIRCUIT_CATALOG_STORE",
                     help="'embedded' (LadybugDB at CATALOG/graph) or a bolt:// / neo4j:// URI (default from "
                          "CIRCUIT_CATALOG_STORE); credentials from NEO4J_USER / NEO4J_PASSWORD.")(f)
    return click.option("--catalog", "catalog_dir", required=True, type=click.Path(path_type=Path), help="Catalog directory (from `ingest`).")(f)


def format_option(f):
    return click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)(f)


def _print_json(value) -> None:
    from circuit_catalog.queries.rows import plain

    click.echo(json.dumps(plain(value), indent=2, ensure_ascii=False, default=str))


NORMALISE_HELP = ("Weights times the reading feature's E[1/norm scale] (recorded with the statistics), so edges into "
                  "different layers compare; raw weights leave the reader's norm scale out.")


def _edges_table(title: str, edges, normalise: bool = False) -> Table:
    weight = "normalised weight" if normalise else "raw weight"
    table = Table("feature", weight, "its top extended de-embedding tokens", title=title)
    for e in edges:
        table.add_row(e.feature, f"{e.weight:+.4f}", " ".join(repr(t) for t in e.tokens))
    return table


@main.command()
@store_options
@click.option("--writers", type=click.IntRange(1), default=None,
              help="Neo4j only: writer sessions loading parts that share no node at once (default 1).")
def load(cat, writers):
    """Load (or bring up to date) a graph store from a catalog directory; idempotent."""
    changed = cat.load(writers)
    out.print(f"store {cat.store_uri} {'loaded from' if changed else 'already up to date with'} {cat.directory}")


def _edge_command(direction: str):
    @click.argument("feature")
    @store_options
    @click.option("-k", type=click.IntRange(1), default=10, show_default=True, help="Edges shown.")
    @click.option("--layer", type=click.IntRange(0, 99_999), default=None, help="Only edges from/to this layer.")
    @click.option("--sign", type=click.Choice(["+", "-"]), default=None, help="Only positive or negative weights.")
    @click.option("--normalise", is_flag=True, help=NORMALISE_HELP)
    @format_option
    def command(feature, cat, k, layer, sign, normalise, fmt):
        edges = getattr(cat, direction)(feature, k, layer, None if sign is None else (1 if sign == "+" else -1), normalise)
        if fmt == "json":
            _print_json([{"feature": e.feature, "weight": e.weight} for e in edges])
        else:
            out.print(_edges_table(f"{direction} of {feature}", edges, normalise))

    command.__doc__ = {
        "upstream": "What feeds FEATURE: its strongest incoming pullback edges (e.g. L27/113). A weight is the change in "
                    "FEATURE's pre-activation per unit of the earlier feature along the direct residual path: attention, "
                    "and the MLPs and skip paths of the layers in between, are left out, as is FEATURE's norm scale "
                    "(--normalise puts in its typical value).",
        "downstream": "What FEATURE feeds: its strongest outgoing pullback edges. A weight is the later feature's "
                      "pre-activation change per unit of FEATURE along the direct residual path (attention, and the "
                      "MLPs and skip paths of the layers in between, left out; the later norm scale left out, so raw "
                      "weights favour layers of large norm scale: --normalise to compare layers).",
    }[direction]
    return main.command(name=direction)(command)


_edge_command("upstream")
_edge_command("downstream")


def weights_options(f):
    """--model/--transcoders (optional): compute from the weights what the catalog keeps only for the top tokens."""
    f = click.option("--transcoders", type=click.Path(path_type=Path), default=None, help="With --model: the catalog's transcoders.")(f)
    return click.option("--model", default=None, help="Compute token weights from the model and --transcoders for tokens "
                        "outside the stored top --token-top-k (a warm `serve` answers when one runs).")(f)


def _from_weights(model, transcoders, op: str, **args):
    """A token-lens computation (`ingest.token_lens`) through `warm.run`; both --model and --transcoders needed."""
    from circuit_catalog import warm

    if model is None or transcoders is None:
        raise click.UsageError("this needs the weights: give --model and --transcoders")
    return warm.run(model, transcoders, None, False, "auto", "float32", op, **args)


@main.command()
@click.argument("feature")
@store_options
@click.option("-k", type=click.IntRange(1), default=10, show_default=True, help="Tokens shown per list.")
@click.option("--token", "token_text", default=None, help="This token's weights for FEATURE and their ranks in the whole "
              "vocabulary, computed from the weights (needs --model and --transcoders).")
@weights_options
@format_option
def tokens(feature, cat, k, token_text, model, transcoders, fmt):
    """FEATURE's de-embedding (raw and extended) and logit-lens tokens; with --token, one token's weights for it."""
    if token_text is not None:
        cat.lookups.check_feature(feature)
        w = _from_weights(model, transcoders, "token_weights", fid=feature, token=token_text)
        if fmt == "json":
            _print_json(w)
            return
        table = Table("list", "weight", "rank of 'TOKEN'".replace("TOKEN", w["token"]), title=f"feature {feature} and {w['token']!r}")
        for name, key in (("de-embedding", "deembed"), ("extended", "deembed_ext"), ("logit lens", "logit_lens")):
            table.add_row(name, f"{w[key]:+.3f}", f"{w[key + '_rank']:,}")
        out.print(table)
        return
    card = cat.tokens(feature, k)
    if fmt == "json":
        _print_json(card)
    else:
        out.print(_tokens_table(card, k))


TOKEN_SCALES = ("Columns are on different scales; compare tokens within a column. De-embedding: W_E[t] . W_enc[:, f], the "
                "embedding as written, the reader's norm scale left out. Extended: the token's extended embedding put through "
                "the reader's norm as if it were the whole residual, i.e. divided by its own norm scale (so ~9x larger on "
                "SmolLM2). Logit lens: W_dec[f] . W_U[:, t], the final norm's scale left out.")


def _tokens_table(card, k: int) -> Table:
    table = Table("de-embedding", "", "extended", "", "logit lens", "", title=f"feature {card.id}",
                  caption=Text(TOKEN_SCALES), caption_justify="left")  # Text: `[t]` is not markup
    for i in range(k):
        row = []
        for pairs in (card.deembed, card.deembed_extended, card.logits):
            row += [repr(pairs[i].token), f"{pairs[i].weight:+.3f}"] if i < len(pairs) else ["", ""]
        table.add_row(*row)
    return table


@main.command()
@click.argument("feature")
@store_options
@click.option("-k", type=click.IntRange(1), default=10, show_default=True, help="Sources shown per kind (features, tokens).")
@click.option("--head", default=None, help="Only this head, e.g. L7H3.")
@click.option("--layer", type=click.IntRange(0, 99_999), default=None, help="Only feature sources of this layer.")
@format_option
def heads(feature, cat, k, head, layer, fmt):
    """Which earlier features and tokens reach FEATURE through which attention heads (OV pullbacks per head: the change
    in FEATURE's pre-activation per unit of the source when the head attends to it with weight 1, norm scales left out)."""
    found = cat.heads(feature, k, head, layer)
    if fmt == "json":
        _print_json(found)
        return
    table = Table("source", "head", "weight", "its top extended de-embedding tokens", title=f"features reaching {feature} through heads")
    for r in found.features:
        table.add_row(r.source, r.head, f"{r.weight:+.4f}", " ".join(repr(t) for t in r.tokens))
    out.print(table)
    table = Table("token", "head", "weight", title=f"tokens reaching {feature} through heads")
    for r in found.tokens:
        table.add_row(repr(r.source), r.head, f"{r.weight:+.4f}")
    out.print(table)


@main.command()
@click.argument("token")
@store_options
@click.option("-k", type=click.IntRange(1), default=20, show_default=True, help="Features shown per kind.")
@format_option
def search(token, cat, k, fmt):
    """Features whose top de-embedding or logit-lens tokens include TOKEN (with or without a leading space)."""
    hits = cat.search(token, k)
    if fmt == "json":
        _print_json(hits)
        return
    table = Table("feature", "via", "token", "weight", title=f"features mentioning {token!r}")
    for h in hits:
        table.add_row(h.feature, h.via, repr(h.token), f"{h.weight:+.3f}")
    out.print(table)


@main.command()
@store_options
@click.option("--prompt", "prompt_key", default=None, help="Search this prompt's attribution graph (id or exact text) instead of the weights graph.")
@click.option("--from-token", default=None, help="Input token text (with --prompt: also a position; omit for every token).")
@click.option("--to-logit", required=True, help="Output token text.")
@click.option("--max-hops", type=click.IntRange(0), default=2, show_default=True, help="Weights graph: pullback edges between first and last feature.")
@click.option("-k", type=click.IntRange(1), default=10, show_default=True, help="Paths shown.")
@click.option("--beam", type=click.IntRange(1), default=256, show_default=True, help="Weights graph: partial paths kept per hop.")
@click.option("--rank", type=click.Choice(["bottleneck", "attribution"]), default="bottleneck", show_default=True,
              help="With --prompt: bottleneck = the smallest share of the target's input any edge of the path carries "
              "(finds the chains the logit depends on, however long); attribution = the path's own effect on the logit "
              "(favours short paths: every hop splits the effect).")
@click.option("--via", default=None, help="With --prompt: only paths through this feature (L8/355 at any position, L8/355@4 at one).")
@click.option("--no-errors", is_flag=True, help="With --prompt: only paths that avoid error nodes.")
@click.option("--min-hops", type=click.IntRange(1), default=1, show_default=True, help="With --prompt: paths of at least this many edges.")
@click.option("--greedy", is_flag=True, help="With --prompt: the seed's greedy search back from the logit (see --iters, --branches).")
@click.option("--iters", type=click.IntRange(1), default=3, show_default=True, help="Greedy search: path length in edges.")
@click.option("--branches", type=click.IntRange(1), default=5, show_default=True, help="Greedy search: paths kept per iteration.")
@click.option("--ends-k", type=click.IntRange(1), default=20, show_default=True,
              help="Weights graph with --model: features per layer computed for each end.")
@weights_options
@format_option
def paths(cat, prompt_key, from_token, to_logit, max_hops, k, beam, rank, via, no_errors, min_hops, greedy, iters, branches,
          ends_k, model, transcoders, fmt):
    """Strongest token -> feature (-> feature ...) -> logit paths, in the weights graph or (--prompt) a prompt's graph.

    In a prompt's graph each path shows its bottleneck (the smallest edge influence on the logit along it, as a
    share of the logit's input) and its attribution (the token's effect on the logit through exactly that path, as
    a share of the logit's total absolute input); --rank chooses the order.
    """
    if prompt_key is not None:
        found = cat.prompt_paths(prompt_key, to_logit, from_token, k, greedy, iters, branches, rank, via, no_errors, min_hops)
        if fmt == "json":
            _print_json(found)
            return
        title = f"prompt {prompt_key}: {'greedy paths' if greedy else f'paths by {rank}'} to {to_logit!r}"
        table = Table("bottleneck", "attribution", "path", title=title)
        for p in found:
            table.add_row(f"{p.bottleneck:.4f}", f"{p.share:+.2%}", " -> ".join(p.labels))
        out.print(table if found else f"no path to {to_logit!r} in prompt {prompt_key}'s pruned graph meets the constraints "
                  "(try without --via, --no-errors or --min-hops)")
        return
    if from_token is None:
        raise click.UsageError("--from-token is required for the weights graph (without --prompt)")
    if via is not None or no_errors or min_hops > 1:
        raise click.UsageError("--via, --no-errors and --min-hops search a prompt's graph: give --prompt")
    ends = {}
    if model is not None or transcoders is not None:  # both ends from the weights, whatever the stored top K holds
        ends = {"starts": _from_weights(model, transcoders, "token_ends", token=from_token, k=ends_k, end="token"),
                "ends": _from_weights(model, transcoders, "token_ends", token=to_logit, k=ends_k, end="logit")}
    found = cat.paths(from_token, to_logit, k=k, max_hops=max_hops, beam=beam, **ends)
    if fmt == "json":
        _print_json(found)
        return
    table = Table("strength", "path", title=f"paths {from_token!r} -> {to_logit!r}")
    for p in found:
        table.add_row(f"{p.strength:+.4g}", " -> ".join([repr(p.nodes[0]), *p.nodes[1:-1], repr(p.nodes[-1])]))
    out.print(table if found else cat.why_no_paths(from_token, to_logit, max_hops))


@main.command(name="prompts")
@store_options
@format_option
def list_prompts(cat, fmt):
    """The prompts with attribution graphs in the catalog, with their targets, replacement and completeness scores."""
    rows = cat.prompts()
    if fmt == "json":
        _print_json(rows)
        return
    _print_prompts(rows)


@main.command()
@store_options
@click.option("--prompt", "prompt_keys", multiple=True, help="A prompt (id or exact text); give it twice: A then B.")
@click.option("--target", default=None, help="The logit token both graphs are read against (default: each prompt's own "
              "target: the token it was ingested with, else its most probable logit).")
@click.option("-k", type=click.IntRange(1), default=20, show_default=True, help="Nodes and edges shown.")
@format_option
def diff(cat, prompt_keys, target, k, fmt):
    """Compare two prompts' pruned attribution graphs: the nodes and edges whose attribution to the target changes
    most from A to B. A node's attribution is its total effect on the target logit through its graph, an edge's its
    weight times its destination's effect per unit; positions of the shared token prefix align, later ones count
    from the end (@-1 is the last token)."""
    if len(prompt_keys) != 2:
        raise click.UsageError(f"give --prompt exactly twice (A, then B); got {len(prompt_keys)}")
    d = cat.diff(*prompt_keys, target=target, k=k)
    if fmt == "json":
        _print_json(d)
        return
    out.print(f"A {d.prompt_a.id}: {d.prompt_a.text!r} -> {d.target_a}\nB {d.prompt_b.id}: {d.prompt_b.text!r} -> {d.target_b}\n"
              f"shared prefix: {d.prefix} tokens (positions after it count from the end)")
    nodes = Table("node", "A", "B", "attribution A", "attribution B", "change", title="nodes by change in attribution")
    for r in d.nodes:
        nodes.add_row(r.node, r.local_a or "-", r.local_b or "-", f"{r.attribution_a:+.4g}", f"{r.attribution_b:+.4g}", f"{r.change:+.4g}")
    out.print(nodes)
    edges = Table("edge", "attribution A", "attribution B", "change", title="edges by change in attribution")
    for r in d.edges:
        edges.add_row(f"{r.src} -> {r.dst}", f"{r.attribution_a:+.4g}", f"{r.attribution_b:+.4g}", f"{r.change:+.4g}")
    out.print(edges)


@main.command(name="prompts-using")
@click.argument("feature")
@store_options
@click.option("-k", type=click.IntRange(1), default=20, show_default=True, help="Prompts shown.")
@format_option
def prompts_using(feature, cat, k, fmt):
    """Prompts whose pruned attribution graph contains FEATURE, by its influence on their logits."""
    found = cat.prompts_using(feature, k)
    if fmt == "json":
        _print_json(found)
        return
    table = Table("prompt", "influence", "activation", "positions", "text", title=f"prompts using {feature}")
    for u in found:
        table.add_row(u.prompt, f"{u.influence:.4f}", f"{u.activation:.3f}", ",".join(map(str, u.positions)), u.text[:60])
    out.print(table if found else f"{feature} is in no prompt's pruned graph")


@main.command()
@store_options
@click.option("-k", type=click.IntRange(1), default=20, show_default=True, help="Features shown.")
@format_option
def recurring(cat, k, fmt):
    """Features that appear in the most prompts' pruned attribution graphs."""
    found = cat.recurring(k)
    if fmt == "json":
        _print_json(found)
        return
    table = Table("feature", "prompts", "influence", "extended de-embedding", "logit lens", title="recurring features")
    for r in found:
        table.add_row(r.feature, str(r.prompts), f"{r.influence:.4f}", " ".join(map(repr, r.tokens)), " ".join(map(repr, r.logit_tokens)))
    out.print(table)


@main.command()
@click.argument("feature", required=False)
@store_options
@click.option("--prompt", "prompt_key", default=None, help="This prompt's supernodes (id or exact text); without it and "
              "FEATURE, those over the whole prompt set.")
@format_option
def supernodes(feature, cat, prompt_key, fmt):
    """Supernodes: groups of features that play one role (similar attribution edges and decoder directions), found
    automatically in each prompt's pruned graph and over the whole prompt set; with FEATURE, the groups holding it."""
    if feature is not None and prompt_key is not None:
        raise click.UsageError("give FEATURE or --prompt, not both")
    found = cat.supernodes(prompt_key, feature)
    if fmt == "json":
        _print_json(found)
        return
    scope = f"holding {feature}" if feature else f"of prompt {prompt_key}" if prompt_key else "over the prompt set"
    table = Table("supernode", "prompt", "name (members' top tokens)", "influence", "members", title=f"supernodes {scope}")
    for g in found:
        table.add_row(g.id, g.prompt or "(all)", g.name, f"{g.influence:.4f}", " ".join(g.members))
    out.print(table if found else f"no supernodes {scope}")


@main.command()
@click.argument("feature")
@store_options
@click.option("-k", type=click.IntRange(1), default=20, show_default=True, help="Partner features shown.")
@format_option
def cooccur(feature, cat, k, fmt):
    """Features found in the same prompts' pruned graphs as FEATURE, by the number of prompts they share."""
    found = cat.cooccurring(feature, k)
    if fmt == "json":
        _print_json(found)
        return
    table = Table("feature", "prompts", "influence", title=f"features co-occurring with {feature}")
    for r in found:
        table.add_row(r.feature, str(r.prompts), f"{r.influence:.4f}")
    out.print(table if found else f"{feature} shares no prompt's pruned graph with another feature")


@main.command(name="recurring-paths")
@store_options
@click.option("--hops", type=click.Choice(["1", "2"]), default="1", show_default=True, help="Edges (1) or two-edge paths (2).")
@click.option("-k", type=click.IntRange(1), default=20, show_default=True, help="Paths shown.")
@format_option
def recurring_paths(cat, hops, k, fmt):
    """Edges or two-edge paths of pruned graphs found in the most prompts, nodes named by feature id (tokens and logits
    by their text) whatever their position."""
    found = cat.recurring_paths(int(hops), k)
    if fmt == "json":
        _print_json(found)
        return
    table = Table("path", "prompts", "summed weight", title="recurring paths")
    for r in found:
        table.add_row(" → ".join(n if kind == "feature" else f"{kind} {n!r}" for n, kind in zip(r.nodes, r.kinds)),
                      str(r.prompts), f"{r.weight:+.4f}")
    out.print(table)


@main.command()
@store_options
@click.option("--prompt", "prompt_key", required=True, help="Prompt id or exact text.")
@click.option("-k", type=click.IntRange(1), default=15, show_default=True, help="Nodes to list by influence.")
@format_option
def graph(cat, prompt_key, k, fmt):
    """A prompt's pruned attribution graph: scores, node and edge counts, the most influential nodes."""
    g = cat.graph_summary(prompt_key, k)
    info = g.prompt
    if fmt == "json":
        _print_json({"prompt": info, "nodes": g.nodes, "edges": g.edges, "warning": g.warning, "quality": g.quality,
                     "layer_flags": {str(layer): flags for layer, flags in g.layer_flags.items()},
                     "logits": [{"token": n.token, "probability": n.probability} for n in g.logits],
                     "top": [{"node": n.local, "label": g.labels[n.id], "influence": n.influence, "activation": n.activation,
                              "flags": g.flags.get(n.feature_id, [])} for n in g.top]})
        return
    out.print(Text(f"prompt {info.id}: {info.text!r} ({info.n_tokens} tokens)\n"
                   f"replacement score {info.replacement_score:.3f}, completeness score {info.completeness_score:.3f}\n"
                   f"pruned graph: {', '.join(f'{v} {kind}' for kind, v in g.nodes.items())} nodes, {g.edges} edges\n{g.quality}"), soft_wrap=True)
    _print_warnings([g.warning] if g.warning else [])
    _print_warnings(str(f) for flags in g.layer_flags.values() for f in flags)
    logits = Table("logit", "probability", title="logit targets")
    for n in g.logits:
        logits.add_row(repr(n.token), f"{n.probability:.3f}")
    out.print(logits)
    table = Table("node (token at its position; <- top de-embedding, -> top logit-lens tokens)", "influence", "activation", "flags",
                  title="most influential nodes")
    for n in g.top:
        table.add_row(Text(g.labels[n.id]), f"{n.influence:.4f}", "" if n.activation is None else f"{n.activation:.3f}",
                      ", ".join(f.kind for f in g.flags.get(n.feature_id, [])))
    out.print(table)


def _print_warnings(lines) -> None:
    """Each warning on its own line, as plain text (a token such as [the] is not rich markup)."""
    for line in lines:
        out.print(Text(f"warning: {line}"), soft_wrap=True)


@main.command()
@catalog_option
@click.option("--prompt", "prompt_key", required=True, help="Prompt id or exact text.")
@click.option("--neuronpedia", "out_file", required=True, type=click.Path(path_type=Path),
              help="Graph JSON to write (Neuronpedia / circuit-tracer viewer format); graph-metadata.json beside it lists it.")
@click.option("--heads", is_flag=True, help="Add the attention heads that carried each link (a `heads` field) and each node's "
              "inputs (in its label, which the viewer shows); without it the file is exactly circuit-tracer's.")
def export(cat, prompt_key, out_file, heads):
    """Export a prompt's pruned attribution graph for circuit-tracer's local viewer or Neuronpedia."""
    graph = cat.export_neuronpedia(prompt_key, out_file, heads)
    out.print(f"wrote {out_file}: {len(graph['nodes'])} nodes, {len(graph['links'])} links "
              f"(serve {out_file.parent} with circuit-tracer's local viewer)")


def _parse_param(text: str) -> tuple[str, object]:
    name, sep, raw = text.partition("=")
    if not sep or not name.isidentifier():
        raise click.BadParameter(f"{text!r}: expected name=value")
    try:
        return name, json.loads(raw)
    except json.JSONDecodeError:
        return name, raw


def _rows_table(rows) -> Table:
    table = Table(*(rows.columns or ["(no rows)"]))
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    return table


@main.command()
@click.argument("query")
@store_options
@click.option("--param", "params", multiple=True, help="name=value (JSON values, else a string); use $name in QUERY.")
@click.option("--write", is_flag=True, help="Allow clauses that change the graph.")
@format_option
def cypher(query, cat, params, write, fmt):
    """Run a Cypher QUERY with parameters; read-only unless --write."""
    rows = cat.cypher(query, dict(_parse_param(p) for p in params), write=write)
    if fmt == "json":
        _print_json(rows)
    else:
        out.print(_rows_table(rows))


@main.command()
@click.argument("feature")
@store_options
@click.option("-k", type=click.IntRange(1), default=10, show_default=True, help="Edges and tokens to show.")
@click.option("--normalise", is_flag=True, help=NORMALISE_HELP)
@format_option
def show(feature, cat, k, normalise, fmt):
    """A feature card: tokens, then what feeds it and what it feeds."""
    card = cat.show(feature, k, normalise)
    if fmt == "json":
        _print_json({"tokens": card.tokens, "upstream": card.upstream, "downstream": card.downstream, "flags": card.flags,
                     "normalised": normalise})
        return
    out.print(_tokens_table(card.tokens, k))
    _print_warnings(map(str, card.flags))
    for title, edges in (("upstream: what feeds it", card.upstream), ("downstream: what it feeds", card.downstream)):
        out.print(_edges_table(title, edges, normalise) if edges else f"{title}: none in this catalog (no transcoder layers on that side)")


@main.command(name="eval")
@click.option("--model", required=True, help=MODEL_HELP)
@click.option("--transcoders", required=True, type=click.Path(path_type=Path))
@click.option("--dataset", default="brown", show_default=True)
@click.option("--tokens", "n_tokens", type=click.IntRange(1), default=4096, show_default=True)
@click.option("--ctx-len", type=click.IntRange(3), default=128, show_default=True)
@click.option("--layers", default="all", show_default=True)
@click.option("--skip-contexts", default="auto", show_default=True,
              callback=lambda ctx, param, value: _count_or(value, "auto", 0),
              help="Start this many contexts into the dataset; auto: past the contexts the transcoders were trained on when "
                   "their training record (TRANSCODERS/training.json) is of this dataset and --ctx-len, else 0.")
@click.option("--out", "out_file", type=click.Path(path_type=Path), default=None, help="Also write the figures as JSON.")
@click.option("--trust-pickle", is_flag=True)
@compute_options
def evaluate(model, transcoders, dataset, n_tokens, ctx_len, layers, skip_contexts, out_file, trust_pickle, device, dtype):
    """Transcoder fidelity: FVU, L0, dead features, and next-token CE with MLPs replaced / zeroed / mean-ablated."""
    from circuit_catalog.ingest.pipeline import evaluate as evaluate_
    from circuit_catalog.ingest.train import trained_contexts

    if skip_contexts is None:
        skip_contexts = trained_contexts(transcoders, dataset, ctx_len)
        err.print(f"held out: starting past the {skip_contexts} contexts the transcoders were trained on" if skip_contexts else
                  "from the start of the dataset (no training record of this dataset and --ctx-len with the transcoders)")
        skip_contexts = skip_contexts or 0
    result = evaluate_(model, transcoders, dataset, n_tokens, ctx_len, parse_layers(layers), skip_contexts, trust_pickle,
                       device=device, dtype=dtype)
    table = Table("layer", "FVU", "L0", "dead", "CE replaced", "CE zero", "CE mean", "recovered", "KL",
                  title=f"{result.n_tokens:,} tokens; original CE {result.ce_original:.4f} nats")
    rows = [(str(m.layer), m, m.ablations, m.ce_recovered) for m in result.layers]
    rows.append(("all", None, result.all_layers, result.ce_recovered_all))
    for name, m, ab, rec in rows:
        table.add_row(name, f"{m.fvu:.3f}" if m else "", f"{m.l0:.1f}" if m else "", str(m.dead) if m else "",
                      f"{ab.ce_replaced:.4f}", f"{ab.ce_zero:.4f}", f"{ab.ce_mean:.4f}", f"{rec:.3f}", f"{ab.kl_replaced:.4f}")
    out.print(table)
    if out_file is not None:
        from circuit_catalog.catalog.parquet_io import write_text_atomic

        write_text_atomic(json.dumps(asdict(result), indent=2), out_file)


@main.command()
@click.argument("feature")
@catalog_option
@click.option("-k", type=click.IntRange(1), default=10, show_default=True, help="Top examples to show.")
@format_option
def stats(feature, cat, k, fmt):
    """FEATURE's activation statistics, top activating examples and examples from each activation
    interval (DuckDB over DIR/stats/)."""
    card = cat.stats(feature, k)
    flags, rare = cat.flags(feature), cat.rare_warning()
    if fmt == "json":
        from circuit_catalog.queries.rows import plain

        _print_json({**plain(card), "flags": flags, "rare_warning": rare})
        return
    out.print(f"{feature}: fires on {card.frequency:.4%} of tokens ({'live' if card.live else 'dead'}), "
              f"mean {card.mean_act:.3f} when firing, max {card.max_act:.3f}, quantiles 50/90/99% <= {card.q50:.3g}/{card.q90:.3g}/{card.q99:.3g}")
    _print_warnings([*map(str, flags), *([rare] if rare else [])])
    table = Table("activation", "context", title="top activating examples (firing token in brackets)")
    for e in card.examples:
        table.add_row(f"{e.activation:.3f}", Text(e.text))  # Text: a token such as [france] is not rich markup
    out.print(table)
    if card.intervals:
        table = Table("activation", "context", title="examples sampled from each activation interval")
        for interval in card.intervals:
            table.add_section()
            table.add_row(f"({interval.lower:.3g}, {interval.upper:.3g}]", f"{interval.frequency:.4%} of tokens ({interval.count:,})", style="bold")
            for e in interval.examples:
                table.add_row(f"{e.activation:.3f}", Text(e.text))
        out.print(table)


@main.command()
@click.argument("feature")
@catalog_option
@format_option
def components(feature, cat, fmt):
    """What the embeddings, each attention head and each MLP write directly into FEATURE's pre-activation, averaged
    over its top activating examples (norm scale frozen at each example's value; the rows sum to the mean
    pre-activation: the largest terms, then the encoder and attention biases, then the rest)."""
    rows = cat.components(feature)
    if fmt == "json":
        _print_json(rows)
        return
    if not rows:
        out.print(f"{feature} has no top activating examples in the statistics: nothing to tally")
        return
    table = Table("component", "mean contribution", title=f"what writes {feature}'s pre-activation (over its top {rows[0].examples} examples)")
    for r in rows:
        table.add_row(r.component, f"{r.contribution:+.4f}")
    table.add_row("total", f"{sum(r.contribution for r in rows):+.4f}", style="bold")
    out.print(table)


@main.command()
@click.argument("query")
@catalog_option
@format_option
def sql(query, cat, fmt):
    """Run a read-only SQL QUERY (DuckDB) over the catalog's Parquet: views features, tokens, pullbacks,
    deembed, logits, stats, top_examples, quantile_examples, dataset_tokens, components."""
    rows = cat.sql(query)
    if fmt == "json":
        _print_json(rows)
    else:
        out.print(_rows_table(rows))


@main.group()
def report() -> None:
    """Self-contained HTML reports (no network, no scripts): feature cards, prompt graphs and the catalog overview."""


@report.command(name="feature")
@click.argument("features", nargs=-1, required=True)
@store_options
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None, help="Directory for the cards (default CATALOG/reports).")
@click.option("-k", type=click.IntRange(1), default=10, show_default=True, help="Examples, tokens and edges per table.")
@click.option("--with-neighbours", is_flag=True, help="Also write the cards of the upstream and downstream features shown.")
@click.option("--blind", is_flag=True, help="Blind case study: leave out every example's text (cards named L8_355.blind.html).")
@click.option("--normalise", is_flag=True, help=NORMALISE_HELP)
def report_feature(features, cat, out_dir, k, with_neighbours, blind, normalise):
    """Feature cards (e.g. L8/355 -> L8_355.html): histogram, top and per-interval examples, tokens, upstream/downstream."""
    for path in cat.report_feature(features, out_dir, k, blind, with_neighbours, normalise):
        out.print(str(path), highlight=False, soft_wrap=True)


@report.command(name="prompt")
@click.argument("prompt")
@store_options
@click.option("--out", "out_file", type=click.Path(path_type=Path), default=None, help="HTML file (default CATALOG/reports/prompt_<id>.html).")
@click.option("--max-nodes", type=click.IntRange(1), default=60, show_default=True, help="Feature and error nodes drawn (most influential).")
@click.option("-k", type=click.IntRange(1), default=10, show_default=True, help="Paths and nodes per table.")
def report_prompt(prompt, cat, out_file, max_nodes, k):
    """A prompt's attribution graph (PROMPT: id or exact text): picture, scores, logits, strongest paths."""
    path = cat.report_prompt(prompt, out_file, max_nodes=max_nodes, k=k)
    out.print(str(path), highlight=False, soft_wrap=True)


@report.command(name="overview")
@catalog_option
@click.option("--out", "out_file", type=click.Path(path_type=Path), default=None, help="HTML file (default CATALOG/reports/overview.html).")
@click.option("--eval", "eval_file", type=click.Path(path_type=Path), default=None,
              help="`eval --out` JSON for FVU per layer (default CATALOG/eval.json if present).")
def report_overview(cat, out_file, eval_file):
    """The catalog overview: per-layer features, live/dead, L0, FVU, and the pullback weight distribution."""
    path = cat.report_overview(out_file, eval_file)
    out.print(str(path), highlight=False, soft_wrap=True)


@main.command(name="export-neo4j-import")
@click.option("--catalog", "catalog_dir", required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Directory for the CSV files, e.g. data/neo4j-import (mounted at /import by docker-compose.yml).")
@click.option("--import-dir", default="/import", show_default=True, help="The same directory as the Neo4j server sees it.")
@click.option("--database", default="neo4j", show_default=True)
def export_neo4j_import(catalog_dir, out_dir, import_dir, database):
    """Write CSVs, headers and schema.cypher for `neo4j-admin database import full` (for very large catalogs)."""
    from circuit_catalog.catalog.neo4j_import import write_admin_import

    result = write_admin_import(catalog_dir, out_dir, import_dir, database, progress=lambda m: err.print(m))
    out.print(f"With the server stopped, import (this replaces database {database}):\n  {result.import_command}\n"
              f"then start the server and create the constraints and indexes (password from NEO4J_PASSWORD):\n"
              f"  {result.schema_command}", markup=False, highlight=False, soft_wrap=True)


@main.command()
@click.option("--model", required=True, help=MODEL_HELP)
@click.option("--transcoders", required=True, type=click.Path(path_type=Path))
@click.option("--prompt", "prompt_key", required=True, help="Prompt text, or with --catalog the id or exact text of a catalog prompt.")
@click.option("--catalog", "catalog_dir", type=click.Path(path_type=Path), default=None,
              help="Record the intervention in this catalog (interventions.parquet); needed for --validate.")
@click.option("--set", "set_", multiple=True, metavar="L/I[@POS]=V", help="Set a feature's activation, e.g. L12/55@4=0 (0 ablates); POS an index, -1 the last, * (default) every position.")
@click.option("--scale", multiple=True, metavar="L/I[@POS]=F", help="Scale a feature's activation by F.")
@click.option("--add", multiple=True, metavar="L/I[@POS]=A", help="Add A to a feature's activation (steering).")
@click.option("--freeze-attention", is_flag=True, help="Hold attention patterns and norm scales at their unmodified values.")
@click.option("--direct-only", is_flag=True, help="Also hold every other feature fixed: only direct effects (the graph's regime).")
@click.option("--target", "targets", multiple=True, help="A token whose logit change to report (repeatable; default: the top -k tokens).")
@click.option("-k", type=click.IntRange(1), default=None, help="Top tokens shown [10]; with --validate, features ablated [20].")
@click.option("--validate", is_flag=True, help="Ablate the prompt's k most influential features and strongest paths: graph prediction vs measured.")
@click.option("--paths", "n_paths", type=click.IntRange(0), default=5, show_default=True, help="With --validate: strongest paths ablated.")
@click.option("--generate", "n_generate", type=click.IntRange(1), default=None, help="Also continue the prompt N tokens, unedited and edited.")
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="Sampling temperature for --generate (0: greedy).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed for --generate.")
@click.option("--layers", default="all", show_default=True, help="Transcoder layers to use.")
@click.option("--trust-pickle", is_flag=True)
@compute_options
@format_option
def intervene(model, transcoders, prompt_key, catalog_dir, set_, scale, add, freeze_attention, direct_only, targets, k, validate,
              n_paths, n_generate, temperature, seed, layers, trust_pickle, device, dtype, fmt):
    """Run the local replacement model with feature edits: next-token probabilities before and after, each
    target logit's change and KL; --validate compares a catalog prompt's graph with ablations; --generate steers.

    Regimes: by default everything downstream responds (error terms held fixed, so no edit = the model
    exactly); --freeze-attention freezes patterns and norm scales; --direct-only also every other feature."""
    from circuit_catalog.errors import InterventionError
    from circuit_catalog.ingest.interventions import Regime, parse_edit

    edits = [parse_edit(op, text) for op, texts in (("set", set_), ("scale", scale), ("add", add)) for text in texts]
    regime = Regime.DIRECT_ONLY if direct_only else Regime.FREEZE_ATTENTION if freeze_attention else Regime.REPLACEMENT
    if validate and (catalog_dir is None or edits or n_generate):
        raise InterventionError("--validate needs --catalog and takes no --set/--scale/--add or --generate")
    if not validate and not edits:
        raise InterventionError("nothing to do: give --set, --scale or --add (or --validate with --catalog)")
    if n_generate and regime is not Regime.REPLACEMENT:
        raise InterventionError("--generate runs the default regime only (no frozen values exist for generated tokens)")
    from circuit_catalog.ingest import pipeline

    loaded = dict(layers=parse_layers(layers), trust_pickle=trust_pickle, device=device, dtype=dtype)
    if validate:
        _print_validation(pipeline.validate(model, transcoders, catalog_dir, prompt_key, k or 20, n_paths, **loaded), fmt)
        return
    done = pipeline.intervene(model, transcoders, prompt_key, edits, regime, targets, k or 10, catalog_dir, n_generate,
                              temperature, seed, **loaded)
    result, generation = done.outcome, done.generation
    if fmt == "json":
        _print_json({**asdict(result), "generation": asdict(generation) if generation else None, "prompt_id": done.prompt_id, "id": done.id})
        return
    out.print(f"{result.prompt!r} ({regime.value}): {'; '.join(result.edits)}", highlight=False, soft_wrap=True)
    table = Table("before", "p", "after", "p", title="top next tokens")
    for (a, pa), (b, pb) in zip(result.top_before, result.top_after):
        table.add_row(repr(a), f"{pa:.4f}", repr(b), f"{pb:.4f}")
    out.print(table)
    table = Table("target", "logit before", "after", "change", title=f"target logits (KL {result.kl:.4f} nats)")
    for t in result.targets:
        table.add_row(repr(t.token), f"{t.before:.4f}", f"{t.after:.4f}", f"{t.change:+.4f}")
    out.print(table)
    if generation is not None:
        out.print(Text(f"original: {generation.original}\nsteered:  {generation.steered}"))
    if done.id is not None:
        out.print(f"recorded as intervention {done.id} in {catalog_dir}", highlight=False)


def _print_validation(v, fmt: str) -> None:
    if fmt == "json":
        _print_json({**asdict(v), "max_direct_error": v.max_direct_error})
        return
    table = Table("ablated", "predicted", "measured direct", "measured full",
                  title=f"prompt {v.prompt_id}: change of logit {v.targets[0]!r} on ablation (graph prediction vs measured)")
    for c in v.checks:
        table.add_row(c.label, f"{c.predicted[0]:+.5f}", f"{c.direct[0]:+.5f}", f"{c.full[0]:+.5f}")
    out.print(table)
    out.print(f"largest |predicted - measured direct| over all {len(v.targets)} logit targets: {v.max_direct_error:.2e}")


@main.command()
@click.argument("feature")
@store_options
@click.option("-k", type=click.IntRange(1), default=20, show_default=True, help="Interventions shown.")
@format_option
def interventions(feature, cat, k, fmt):
    """Recorded interventions that edited FEATURE (newest first): the edits, the prompt, what they did to the logits."""
    found = cat.interventions(feature, k)
    if fmt == "json":
        _print_json(found)
        return
    table = Table("intervention", "prompt", "regime", "edits", "KL", "largest logit changes", title=f"interventions touching {feature}")
    table.columns[0].no_wrap = True
    for u in found:
        changes = ", ".join(f"{c.token!r} {c.change:+.3f}" for c in u.changes[:3])
        table.add_row(u.id, u.prompt_id or repr(u.prompt[:30]), u.regime, u.spec, f"{u.kl:.4f}", changes)
    out.print(table)


@main.command()
@click.option("--model", required=True, help=MODEL_HELP)
@click.option("--transcoders", required=True, type=click.Path(path_type=Path))
@click.option("--prompt", "prompt_key", required=True, help="Prompt text, or with --catalog the id or exact text of a catalog prompt.")
@click.option("--catalog", "catalog_dir", type=click.Path(path_type=Path), default=None, help="Catalog whose prompts --prompt may name.")
@click.option("--head", required=True, help="Attention head, e.g. L7H3.")
@click.option("--query-pos", type=int, required=True, help="Query position (negative counts from the end).")
@click.option("--key-pos", type=int, required=True, help="Key position (negative counts from the end).")
@click.option("-k", type=click.IntRange(1), default=10, show_default=True, help="Node pairs and one-sided totals shown.")
@click.option("--layers", default="all", show_default=True, help="Transcoder layers to use.")
@click.option("--trust-pickle", is_flag=True)
@compute_options
@format_option
def qk(model, transcoders, prompt_key, catalog_dir, head, query_pos, key_pos, k, layers, trust_pickle, device, dtype, fmt):
    """Why HEAD attended from the query to the key position: its pre-softmax score as the sum of bilinear terms
    (query-side node x key-side node: features, errors, tokens, bias), norm scales frozen, rotary as the model applies it."""
    from circuit_catalog.ingest.pipeline import qk as qk_

    found = qk_(model, transcoders, prompt_key, head, query_pos, key_pos, catalog_dir, parse_layers(layers), trust_pickle,
                device=device, dtype=dtype)
    if fmt == "json":
        _print_json({"head": found.head, "query_pos": found.query_pos, "key_pos": found.key_pos, "score": found.score,
                     "pattern": found.pattern, "sum_of_terms": found.total, "pairs": found.top_pairs(k),
                     "query_totals": found.query_totals(k), "key_totals": found.key_totals(k)})
        return
    out.print(f"{head} from {found.query_pos} ({found.tokens[found.query_pos]!r}) to {found.key_pos} ({found.tokens[found.key_pos]!r}): "
              f"score {found.score:+.4f} (sum of terms {found.total:+.4f}), attention weight {found.pattern:.4f}", highlight=False)
    table = Table("query-side node", "key-side node", "term", title="largest bilinear terms")
    for a, b, v in found.top_pairs(k):
        table.add_row(a, b, f"{v:+.4f}")
    out.print(table)
    for title, rows in (("query-side totals (node . whole key)", found.query_totals(k)), ("key-side totals (whole query . node)", found.key_totals(k))):
        table = Table("node", "total", title=title)
        for name, v in rows:
            table.add_row(name, f"{v:+.4f}")
        out.print(table)


@main.command()
@click.option("--model", required=True, help=MODEL_HELP)
@click.option("--transcoders", required=True, type=click.Path(path_type=Path))
@click.option("--prompt", required=True)
@click.option("--layers", default="all", show_default=True)
@click.option("--pos", type=int, default=-1, show_default=True, help="Token position (negative counts from the end).")
@click.option("-k", type=click.IntRange(1), default=10, show_default=True, help="Features shown.")
@click.option("--rank", type=click.Choice(["activation", "influence"]), default="activation", show_default=True,
              help="activation: the largest activations (a forward pass; favours dense features); influence: the largest "
              f"influence on the logits in the prompt's attribution graph ({MAX_FEATURE_NODES} feature nodes; what the prediction "
              "depends on).")
@click.option("--target", default=None, help="With --rank influence: influence on this token's logit (one token, mind the "
              "leading space) instead of the probability-weighted logits.")
@click.option("--format", "fmt", type=click.Choice(["table", "ids"]), default="table", show_default=True)
@click.option("--trust-pickle", is_flag=True)
@compute_options
def active(model, transcoders, prompt, layers, pos, k, rank, target, fmt, trust_pickle, device, dtype):
    """The most active (or --rank influence: most influential) transcoder features at one position of a prompt.
    Asks the warm process of `circuit-catalog serve` with the same arguments when one runs (no loading)."""
    from types import SimpleNamespace

    from circuit_catalog import warm

    found = [SimpleNamespace(**f) for f in warm.run(model, transcoders, parse_layers(layers), trust_pickle, device, dtype, "active",
                                                      prompt=prompt, pos=pos, k=k, rank=rank, target=target)]
    if fmt == "ids":
        out.print("\n".join(f.feature for f in found))
        return
    by = "most influential" + (f" on {target!r}" if target else "") if rank == "influence" else "most active"
    table = Table("feature", "activation", *(["influence"] if rank == "influence" else []), title=f"{by} features at position {pos} of {prompt!r}")
    for f in found:
        table.add_row(f.feature, f"{f.activation:.3f}", *([f"{f.influence:.4f}"] if rank == "influence" else []))
    out.print(table)


@main.command()
@click.option("--model", required=True, help=MODEL_HELP)
@click.option("--transcoders", required=True, type=click.Path(path_type=Path))
@click.option("--layers", default="all", show_default=True)
@click.option("--trust-pickle", is_flag=True)
@click.option("--idle-minutes", type=click.FloatRange(0, min_open=True), default=30.0, show_default=True,
              help="Exit after this long without a request.")
@compute_options
def serve(model, transcoders, layers, trust_pickle, idle_minutes, device, dtype):
    """Keep MODEL and its transcoders loaded and answer `active` calls with the same --model, --transcoders, --layers,
    --device and --dtype from other processes (a forward pass each, no loading). Runs in the foreground: start it
    in another terminal or with `&`; it listens on a UNIX socket only its user can open."""
    from circuit_catalog import warm
    from circuit_catalog.ingest.pipeline import load

    path = warm.socket_path(model, transcoders, parse_layers(layers), trust_pickle, device, dtype)
    lm, tset = load(model, transcoders, parse_layers(layers), trust_pickle, device, dtype)
    warm.serve(path, lm, tset, idle_minutes, ready=lambda: click.echo(f"serving {model} on {path} (idle exit after {idle_minutes:g} min)", err=True))


if __name__ == "__main__":
    main()
