"""Compute: load model and transcoders, train, and write the catalog's Parquet parts."""
