"""Compute: load models and transcoders, train and evaluate transcoders, compute the catalog's parts (pullbacks, token
edges, statistics, attribution graphs) and interventions, and write them as Parquet.

Called, this package is the API's ingest function: `ingest(model, transcoders, catalog_dir, *, settings=None,
layers=None, dataset=None, n_tokens=100_000, ctx_len=128, prompts=None, attribution=None, device=None, dtype=None,
executor="serial", address=None)`,
i.e. `circuit_catalog.ingest.pipeline.ingest` (see there). One name for the design's compute folder and the
verb a notebook calls; the package stays importable as before (`circuit_catalog.ingest.job`, ...).
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from circuit_catalog.ingest.pipeline import ingest

        return ingest(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
