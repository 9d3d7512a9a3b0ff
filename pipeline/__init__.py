"""pvu's library. Sub-packages by family: ``cache`` (write the cache), ``head`` (train and export
the head), ``demo`` (bundled data); ``retry``, ``prefetch`` and ``named`` serve them all."""

from pipeline.retry import configure_storage_clients

configure_storage_clients()  # every pvu process, Ray workers included, retries storage alike
