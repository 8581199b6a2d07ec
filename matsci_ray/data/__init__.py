"""Data layer: source readers, validation, Parquet shards and Ray Data streaming."""
