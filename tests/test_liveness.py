"""The one heartbeat clock of broker connections (shared/liveness.py), on given instants."""
import time

from shared.liveness import Liveness


def test_a_beat_is_due_once_per_interval_and_silence_past_the_expiry_is_gone():
    clock = Liveness(interval=0.5, expiry=3.0)
    now = clock.last_heard
    assert clock.beat_due(now) and not clock.beat_due(now + 0.4) and clock.beat_due(now + 0.5)
    assert not clock.gone(now + 3.0) and clock.gone(now + 3.1)
    clock.last_heard -= 10  # long silent, then a word from the peer
    clock.heard()
    assert not clock.gone(clock.last_heard + 3.0) and clock.silent_for(clock.last_heard + 1) == 1


def test_a_new_connection_counts_silence_from_now_and_waits_for_its_first_beat():
    clock = Liveness(interval=0.5, expiry=3.0)
    clock.last_heard -= 10  # long silent
    clock.restart(first_beat_in=0.5)
    now = time.monotonic()
    assert not clock.gone(now) and not clock.beat_due(clock.next_beat - 0.01) and clock.beat_due(clock.next_beat)
