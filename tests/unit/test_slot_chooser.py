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


def test_a_new_chat_whose_prompt_is_mostly_the_shared_preamble_leaves_other_chats_slots_alone() -> None:
    # The few-shot preamble is most of a first prompt: 69 of 79 tokens are shared between two new chats.
    # Counting that as "the same conversation" put each new chat into the previous one's slot, and at
    # their second turns every chat re-read its whole prompt (prefix_reuse.py: turn 2 at 6x turn 1).
    chooser = SlotChooser(4)
    preamble = list(range(100, 169))
    homes: list[int | None] = []
    for chat in range(4):
        slot = chooser.acquire([*preamble, *(1000 * chat + i for i in range(10))])
        chooser.release(slot)
        homes.append(slot)
    assert set(homes) == {0, 1, 2, 3}, "each new chat gets a slot of its own"
    for chat in range(4):
        slot = chooser.acquire([*preamble, *(1000 * chat + i for i in range(40))])
        chooser.release(slot)
        assert slot == homes[chat], "and its next turn finds its whole cached prompt there"


def test_a_repeated_prompt_goes_back_to_its_slot_and_a_cut_history_starts_afresh() -> None:
    chooser = SlotChooser(3)
    long_chat = turn(0, 50)
    home = chooser.acquire(long_chat)
    chooser.release(home)
    chooser.release(chooser.acquire(turn(1, 10)))
    retry = chooser.acquire(long_chat)
    chooser.release(retry)
    assert retry == home, "a retry of the same prompt extends the whole cache"
    window = [*PREAMBLE, *long_chat[-20:]]  # the oldest turns dropped: only the preamble is shared
    cut = chooser.acquire(window)
    assert cut != home and cut is not None, "the old cache would give it only the preamble"


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


def test_slots_warmed_with_the_shared_start_take_new_chats_next_to_the_running_ones() -> None:
    chooser = SlotChooser(4)
    for slot in range(4):
        chooser.holds(slot, PREAMBLE)  # what warm_slots leaves: every slot caches the preamble
    first = chooser.acquire(turn(0, 10))
    second = chooser.acquire(turn(1, 10))
    assert (first, second) == (0, 1), "new chats extend the warmed preamble, packed together"
    chooser.release(first)
    chooser.release(second)
    assert chooser.acquire(turn(2, 10)) == 2, "a third chat takes a warmed slot, not a chat's"
    assert chooser.acquire(turn(0, 30)) == first, "and the first chat's next turn finds its own"
