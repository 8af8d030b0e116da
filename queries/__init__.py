"""The query layer: `Catalog` (the Python API every CLI lookup calls), named Cypher lookups over the graph stores,
prompt graphs and paths, DuckDB over the Parquet (statistics, SQL), the Neuronpedia export, interventions on
catalog prompts, and the HTML reports."""
