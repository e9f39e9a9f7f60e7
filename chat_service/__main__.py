"""`python -m chat_service`: run the chat service with settings from the environment."""

import asyncio

from chat_service.server import serve
from chat_service.settings import ChatSettings

if __name__ == "__main__":
    asyncio.run(serve(ChatSettings()))
