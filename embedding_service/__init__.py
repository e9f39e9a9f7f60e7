"""chatmesh embedding service: sentence embeddings (all-MiniLM-L6-v2 on CPU) over gRPC, micro-batched,
and the vector index over texts (Qdrant) that the semantic cache searches in one hop."""
