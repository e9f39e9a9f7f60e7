"""The per-user completion slots on the chat service's database: rows leased to the replica whose stream
holds them, counted across every replica (see `chat_service.limits.CompletionLimit`)."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import cast

from sqlalchemy import Table, delete, func, insert, select
from sqlalchemy import update as sql_update

from chat_service.storage.base import Lease, LimitReached
from chat_service.storage.models import GenerationSlotRow
from chat_service.storage.sql.database import SLOTS_LOCK, SqlDatabase
from chat_service.storage.sql.rows import utc_now

_SLOTS = cast(Table, GenerationSlotRow.__table__)


class SqlGenerationSlots:
    """The slot methods of `ConversationStore` (`take_generation_slot`, `renew_generation_slot`,
    `release_generation_slot`), as a base of `SqlConversationStore`."""

    def __init__(self, database: SqlDatabase) -> None:
        self._slots_db = database

    async def take_generation_slot(self, user_id: str, slot_id: uuid.UUID, lease: Lease, limit: int) -> bool:
        slots = _SLOTS
        now = utc_now()
        async with self._slots_db.engine.begin() as connection:
            await self._slots_db.lock_user(connection, SLOTS_LOCK, user_id)
            # Slots of replicas that died: their lease lapsed, they count no more; the user's own clean-up.
            await connection.execute(
                delete(slots).where(slots.c.user_id == user_id, slots.c.lease_until < now)
            )
            held = await connection.scalar(
                select(slots.c.id).where(slots.c.id == slot_id, slots.c.user_id == user_id)
            )
            if held is not None:
                return False
            await connection.execute(
                insert(slots).values(
                    id=slot_id,
                    user_id=user_id,
                    holder=lease.holder,
                    acquired_at=now,
                    lease_until=now + timedelta(seconds=lease.seconds),
                )
            )
            others, oldest = (
                await connection.execute(
                    select(func.count(), func.min(slots.c.acquired_at)).where(
                        slots.c.user_id == user_id, slots.c.id != slot_id
                    )
                )
            ).one()
            if others >= limit:
                # Raised inside the transaction: the slot just inserted is rolled back.
                raise LimitReached(others, oldest)
        return True

    async def renew_generation_slot(self, slot_id: uuid.UUID, lease: Lease) -> None:
        async with self._slots_db.engine.begin() as connection:
            await connection.execute(
                sql_update(_SLOTS)
                .where(_SLOTS.c.id == slot_id)
                .values(lease_until=utc_now() + timedelta(seconds=lease.seconds))
            )

    async def release_generation_slot(self, slot_id: uuid.UUID) -> None:
        async with self._slots_db.engine.begin() as connection:
            await connection.execute(delete(_SLOTS).where(_SLOTS.c.id == slot_id))
