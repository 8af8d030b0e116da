"""The data model: catalog directory, manifest, Parquet I/O and (later) the graph stores."""
