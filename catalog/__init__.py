"""Storage: the catalog directory's layout, manifest and Parquet I/O, the graph schema, and the graph stores
(embedded LadybugDB and Neo4j over Bolt) loaded from it."""
