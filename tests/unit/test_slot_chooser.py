"""Which llama-server slot a prompt goes to: each conversation keeps its own KV cache."""

from __future__ import annotations

from inference_service.backends.llama_server import SlotChooser

PREAMBLE = [1, 2, 3]  # the tokens every prompt of the template starts with


def turn(chat: int, length: int) -> list[int]:
    """A chat's prompt of `length` tokens after the shared preamble; a later turn extends an earlier."""
    return [*PREAMBLE, *(1000 * chat + i for i in range(length))]


def test_a_chats_next_turn_goes_to_the_slot_holding_its_previous_turn() -> None:
    chooser = SlotChooser(4)
    homes: dict[int, int | None] = {}
    for chat in range(4):
        slot = chooser.acquire(turn(chat, 10))
        chooser.release(slot)
        homes[chat] = slot
    assert set(homes.values()) == {0, 1, 2, 3}, "new chats spread over the slots"
    for chat in reversed(range(4)):
        slot = chooser.acquire(turn(chat, 30))
        chooser.release(slot)
        assert slot == homes[chat]


def test_a_new_chat_sharing_only_the_preamble_takes_the_least_recently_used_slot() -> None:
    chooser = SlotChooser(2)
    for chat in (0, 1, 0):  # slot of chat 1 is now the least recently used
        chooser.release(chooser.acquire(turn(chat, 20 + chat)))
    assert chooser.acquire(turn(7, 20)) == 1, "chat 0's cache, used last, is kept"


def test_a_prompt_that_reuses_most_of_a_cache_takes_that_slot_even_if_another_is_older() -> None:
    chooser = SlotChooser(2)
    system = list(range(100, 200))
    chooser.release(chooser.acquire([*system, 5, 6]))  # slot 0: a chat with a long system prompt
    chooser.release(chooser.acquire([9, 9]))  # slot 1, used later
    assert chooser.acquire([*system, 7, 8]) == 0, "100 of the 102 cached tokens are reused"


def test_busy_slots_are_never_chosen_and_a_full_house_leaves_the_choice_to_the_server() -> None:
    chooser = SlotChooser(2)
    first = chooser.acquire(turn(0, 10))
    second = chooser.acquire(turn(0, 20))  # the same chat again while its slot is busy
    assert {first, second} == {0, 1}
    assert chooser.acquire(turn(1, 10)) is None
    chooser.release(first)
    assert chooser.acquire(turn(1, 10)) == first


def test_new_chats_go_next_to_the_running_slots() -> None:
    chooser = SlotChooser(8)
    for chat in range(8):  # every slot holds a chat; slot 0 is the least recently used
        chooser.release(chooser.acquire(turn(chat, 10)))
    running = chooser.acquire(turn(5, 30))  # chat 5's next turn, in its own slot
    assert running == 5
    newcomers = [chooser.acquire(turn(100 + n, 10)) for n in range(3)]
    # Each joins the running block at an end; of two ends, the older slot (lower here) goes first.
    assert newcomers == [4, 3, 2], "next to the running slots, not the least recently used slot 0"
