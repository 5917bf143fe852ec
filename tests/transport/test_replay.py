"""The RFC 6479 replay window: edges, jumps, duplicates, reordering, and a model check."""

from hypothesis import given, settings
from hypothesis import strategies as st

from transport.replay import WINDOW, WORDS, ReplayWindow

MAX_COUNTER = 2**64 - 1


def test_counter_zero_is_accepted_once() -> None:
    window = ReplayWindow()
    assert window.top == -1
    assert window.check(0)
    assert window.accept(0)
    assert window.top == 0
    assert not window.check(0)
    assert not window.accept(0)


def test_in_order_counters_are_each_accepted_once() -> None:
    window = ReplayWindow()
    for counter in range(3 * WINDOW):
        assert window.accept(counter), counter
    for counter in range(2 * WINDOW + 1, 3 * WINDOW):
        assert not window.accept(counter), counter


def test_duplicates_are_rejected_wherever_they_fall() -> None:
    window = ReplayWindow()
    for counter in (5, 70, 64, 63, 200, 128):
        assert window.accept(counter)
    for counter in (5, 70, 64, 63, 200, 128):
        assert not window.check(counter)
        assert not window.accept(counter)


def test_reordering_within_the_window_is_accepted() -> None:
    window = ReplayWindow()
    assert window.accept(1000)
    for counter in reversed(range(1000)):
        assert window.accept(counter), counter
    assert window.top == 1000


def test_window_edges() -> None:
    window = ReplayWindow()
    top = 100_000
    assert window.accept(top)
    assert not window.check(top - WINDOW)  # just outside: too old
    assert not window.accept(top - WINDOW)
    assert window.check(top - WINDOW + 1)  # the oldest counter still inside
    assert window.accept(top - WINDOW + 1)
    assert not window.accept(top - WINDOW + 1)
    assert window.accept(top + 1)  # the window moves by one...
    assert not window.accept(top - WINDOW + 1)  # ...and the old edge falls out


def test_edge_when_the_top_sits_on_a_word_boundary() -> None:
    for top in (64 * 200, 64 * 200 + 63):
        window = ReplayWindow()
        assert window.accept(top)
        assert window.accept(top - WINDOW + 1)
        assert not window.accept(top - WINDOW)


def test_far_jump_forgets_the_old_bits() -> None:
    window = ReplayWindow()
    for counter in range(500):
        assert window.accept(counter)
    far = 10**12 + 37
    assert window.accept(far)
    assert not window.accept(499)  # far behind now
    # Counters inside the new window that share ring slots with the old ones are fresh.
    for counter in range(far - WINDOW + 1, far - WINDOW + 600):
        assert window.accept(counter), counter


def test_jump_by_exactly_the_ring_clears_every_word() -> None:
    window = ReplayWindow()
    for counter in range(0, WORDS * 64, 7):
        assert window.accept(counter)
    jump = WORDS * 64 * 3
    assert window.accept(jump)
    for counter in range(jump - WINDOW + 1, jump, 5):
        assert window.accept(counter), counter


def test_check_changes_nothing() -> None:
    window = ReplayWindow()
    assert window.check(10)
    assert window.check(10)
    assert window.top == -1
    assert window.accept(10)


def test_negative_and_largest_counters() -> None:
    window = ReplayWindow()
    assert not window.check(-1)
    assert not window.accept(-1)
    assert window.accept(MAX_COUNTER)
    assert not window.accept(MAX_COUNTER)
    assert window.accept(MAX_COUNTER - 1)
    assert not window.accept(MAX_COUNTER - WINDOW)


class Model:
    """The obvious set-based definition the window must agree with."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.top = -1

    def accept(self, counter: int) -> bool:
        if counter <= self.top - WINDOW or counter in self.seen:
            return False
        self.seen.add(counter)
        self.top = max(self.top, counter)
        return True


steps = st.lists(
    st.one_of(
        st.integers(-3, 200),  # a step forward or back from the current top
        st.integers(-WINDOW - 70, -WINDOW + 70),  # around the trailing edge
        st.integers(WINDOW - 70, 2 * WINDOW),  # a jump
        st.integers(0, 10**15),  # a far jump
    ),
    max_size=300,
)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_agrees_with_the_set_model(deltas: list[int]) -> None:
    window, model = ReplayWindow(), Model()
    for delta in deltas:
        counter = max(0, model.top + delta)
        assert window.check(counter) == (counter > model.top - WINDOW and counter not in model.seen)
        assert window.accept(counter) == model.accept(counter), counter
        assert window.top == model.top
