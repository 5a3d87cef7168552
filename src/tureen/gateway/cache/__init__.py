"""The gateway's response caches: an exact tier in Redis and a semantic tier in Qdrant (see ``step``)."""
