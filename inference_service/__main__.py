"""`python -m inference_service`: run the inference service with settings from the environment."""

import asyncio
import sys

from chatmesh.common.private_files import keep_files_private
from chatmesh.models.store import ModelFileError
from inference_service.server import serve
from inference_service.settings import InferenceSettings

if __name__ == "__main__":
    # llama-server's log may hold prompts: files for the owner alone.
    keep_files_private()
    try:
        asyncio.run(serve(InferenceSettings()))
    except ModelFileError as exc:
        # A missing, partial or corrupt model file: the message says which and how to fix it; no engine
        # was started with it.
        sys.exit(f"inference_service cannot start: {exc}")
