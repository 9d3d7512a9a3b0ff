"""The cache path: shards -> samples -> augmented tensors -> backbone -> Arrow -> committed Parquet.

One module per step (``shards``, ``samples``, ``decode``, ``augment``, ``backbone``, ``writer``),
``unit`` wiring them into one unit of work, ``manifest`` and ``index`` recording and reading what
is committed, and ``distribute`` the only module that knows about Ray.
"""
