"""Storage: the catalog directory's layout and ids, its manifest, atomic writes and Parquet I/O, the writer lock,
the graph schema, and the graph stores (embedded LadybugDB and Neo4j over Bolt) loaded from it."""
