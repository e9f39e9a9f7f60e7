"""`python -m inference_service`: run the inference service with settings from the environment."""

import asyncio

from inference_service.server import serve
from inference_service.settings import InferenceSettings

if __name__ == "__main__":
    asyncio.run(serve(InferenceSettings()))
