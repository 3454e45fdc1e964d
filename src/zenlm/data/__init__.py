"""The data layer: corpora (text), token shards (ids on disk) and batches (tensors for training)."""
