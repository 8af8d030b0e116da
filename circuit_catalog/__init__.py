"""circuit-catalog: precomputed transcoder circuits, stored and queried."""

from pathlib import Path as _Path

__version__ = "0.1.0"

# The subpackages live at the top of the repository (ingest/, catalog/, queries/: the data flow the layout shows)
# and are installed as circuit_catalog.ingest etc. (pyproject's package-dir). In a source checkout put on
# sys.path directly (no install, or a second worktree beside an editable install) the repository root serves
# them; an installed wheel holds them inside this package and never reaches this branch.
_root = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "ingest").is_dir() and (_root / "ingest" / "__init__.py").is_file():
    __path__.append(str(_root))
