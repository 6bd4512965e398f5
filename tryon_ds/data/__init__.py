"""Data: the input layouts of the releases (``sources``) with their keypoints (``keypoints``) and agnostic
images (``agnostic``), shard writing (``shards``), the procedural set (``synthetic``), how pictures become
the UNets' inputs (``preprocess``), and the training input pipeline (``pipeline``, ``transforms``)."""
