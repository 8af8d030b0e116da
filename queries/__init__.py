"""The query layer: lookups over a catalog (Parquet today; named Cypher over the graph stores)."""
