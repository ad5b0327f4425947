"""Engine library: model families, loading, dataset, training loop, saving."""
