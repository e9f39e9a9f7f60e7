"""`python -m inference_service`: run the inference service with settings from the environment."""

import asyncio

from chatmesh.common.private_files import keep_files_private
from inference_service.server import serve
from inference_service.settings import InferenceSettings

if __name__ == "__main__":
    # llama-server's log may hold prompts: files for the owner alone.
    keep_files_private()
    asyncio.run(serve(InferenceSettings()))
