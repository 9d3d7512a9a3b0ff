"""pvu's library. Sub-packages by family: ``cache`` (write the cache), ``head`` (train and export
the head), ``demo`` (bundled data); ``retry`` and ``prefetch`` serve them all."""
