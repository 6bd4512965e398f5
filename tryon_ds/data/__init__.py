"""Data: input layouts and shard writing (``sources``, ``shards``), the synthetic set, and the training
input pipeline (``pipeline``, ``transforms``)."""
