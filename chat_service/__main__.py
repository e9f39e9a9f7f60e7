"""`python -m chat_service`: run the chat service with settings from the environment."""

import asyncio

from chat_service.server import serve
from chat_service.settings import ChatSettings
from chatmesh.common.private_files import keep_files_private

if __name__ == "__main__":
    # Its SQLite database (and -wal/-shm) holds users' chats: files for the owner alone.
    keep_files_private()
    asyncio.run(serve(ChatSettings()))
