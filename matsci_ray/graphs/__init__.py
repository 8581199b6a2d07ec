"""Periodic graphs: neighbour lists, edge geometry and collation into PyG batches."""
