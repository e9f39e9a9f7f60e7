"""chatmesh embedding service: sentence embeddings (all-MiniLM-L6-v2 on CPU) over gRPC, micro-batched."""
