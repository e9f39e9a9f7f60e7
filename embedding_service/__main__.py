"""`python -m embedding_service`: run the embedding service with settings from the environment."""

import os

# Before numpy loads: OpenBLAS's worker threads spin (sched_yield) for a while after every BLAS call,
# and the vector index's brute-force scans in qdrant-client's local mode make many small ones. That
# spinning took about 28% of a core while the cache was in use and, on a small machine, delayed the
# engine's next prompt by ~70 ms (docs/benchmarks.md, "Semantic cache"). The scans are tiny per tenant
# partition; one thread is all they need. The encoder (torch) has its own thread pool, untouched.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import asyncio

from chatmesh.common.private_files import keep_files_private
from embedding_service.server import serve
from embedding_service.settings import EmbeddingSettings

if __name__ == "__main__":
    # The local vector index holds users' questions and answers: files for the owner alone.
    keep_files_private()
    asyncio.run(serve(EmbeddingSettings()))
