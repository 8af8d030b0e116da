"""The query layer: named Cypher lookups over the graph stores, DuckDB over the statistics' Parquet, prompt
graphs and paths, the Neuronpedia export, and the HTML reports."""
