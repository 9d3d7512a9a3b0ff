"""Demo and test data: digit shards, a tiny trained backbone, synthetic caches."""
