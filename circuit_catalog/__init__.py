"""circuit-catalog: precomputed transcoder circuits, stored and queried.

    from circuit_catalog import Catalog, ingest, load_model, load_transcoders

    model = load_model("smollm2-135m")
    tcs = load_transcoders("transcoders/", model=model)
    ingest(model, tcs, "catalog", prompts=["The capital of France is"])
    with Catalog("catalog") as cat:
        cat.upstream("L8/355").to_pandas()

Names resolve lazily, so `import circuit_catalog` loads neither torch nor a database engine.
`circuit_catalog.ingest` is both the compute package and, called, the ingest function
(`circuit_catalog.ingest.pipeline.ingest`): the design's folder and the API's verb share the name.
"""

from importlib import import_module
from pathlib import Path as _Path

__version__ = "0.1.0"

# The subpackages live at the top of the repository (ingest/, catalog/, queries/: the data flow the layout shows)
# and are installed as circuit_catalog.ingest etc. (pyproject's package-dir). In a source checkout put on
# sys.path directly (no install, or a second worktree beside an editable install) the repository root serves
# them; an installed wheel holds them inside this package and never reaches this branch.
_root = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "ingest").is_dir() and (_root / "ingest" / "__init__.py").is_file():
    __path__.append(str(_root))

_EXPORTS = {
    "Catalog": "circuit_catalog.queries.catalog",
    "load_model": "circuit_catalog.ingest.pipeline",
    "load_transcoders": "circuit_catalog.ingest.pipeline",
    "load": "circuit_catalog.ingest.pipeline",
    "train": "circuit_catalog.ingest.pipeline",
    "evaluate": "circuit_catalog.ingest.pipeline",
    "active": "circuit_catalog.ingest.pipeline",
    "intervene": "circuit_catalog.ingest.pipeline",
    "validate": "circuit_catalog.ingest.pipeline",
    "IngestSettings": "circuit_catalog.ingest.settings",
    "AttributionSettings": "circuit_catalog.ingest.settings",
    "PromptSpec": "circuit_catalog.ingest.settings",
    "TrainConfig": "circuit_catalog.ingest.train",
    "PromptGraph": "circuit_catalog.queries.prompt_graph",
    "UserError": "circuit_catalog.errors",
}
__all__ = ["ingest", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    if name == "ingest":  # the subpackage (callable: see its docstring)
        return import_module("circuit_catalog.ingest")
    raise AttributeError(f"module 'circuit_catalog' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
