"""fastdit.stopping: in the block SIGINT and SIGTERM raise Stopped once, later ones are ignored while the program
unwinds, and the handlers come back after; outside the main thread nothing changes."""
import os
import signal
import threading
import time

import pytest

from fastdit.stopping import Stopped, stop_on_signals


def handlers():
    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), threading.excepthook


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda number: number.name)
def test_a_signal_raises_stopped_once_and_the_handlers_come_back(signum):
    before = handlers()
    with stop_on_signals():
        try:
            os.kill(os.getpid(), signum)
            time.sleep(10)  # the handler raises in this thread first
            raise AssertionError("the signal did not raise Stopped")
        except Stopped as stop:
            assert stop.signum == signum and stop.exit_status == 128 + signum and str(stop) == signum.name
            for later in (signal.SIGINT, signal.SIGTERM):  # ignored while the program unwinds
                os.kill(os.getpid(), later)
    assert handlers() == before
    # Ctrl-C's unwinding, and through the sweeps' `except Exception`
    assert isinstance(Stopped(signum), KeyboardInterrupt) and not isinstance(Stopped(signum), Exception)


def test_outside_the_main_thread_nothing_changes():
    before, inside = handlers(), []

    def enter():
        with stop_on_signals():
            inside.append(handlers())

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert inside == [before] and handlers() == before
