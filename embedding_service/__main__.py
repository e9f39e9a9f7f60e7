"""`python -m embedding_service`: run the embedding service with settings from the environment."""

import asyncio

from embedding_service.server import serve
from embedding_service.settings import EmbeddingSettings

if __name__ == "__main__":
    asyncio.run(serve(EmbeddingSettings()))
