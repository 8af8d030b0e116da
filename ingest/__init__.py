"""Compute: load models and transcoders, train and evaluate transcoders, compute the catalog's parts (pullbacks, token
edges, statistics, attribution graphs) and interventions, and write them as Parquet."""
