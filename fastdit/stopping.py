"""SIGINT and SIGTERM as an exception: a program stopped by either unwinds as from Ctrl-C, keeps what it has
done, and exits 128 + the signal's number (the shells' convention: 130, 143).

``fastdit``'s commands stop this way (``fastdit.cli.commands``: one line, then the exit status), and so do the
benchmarks, which write their report of every finished measurement before exiting."""
import contextlib
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread. A KeyboardInterrupt: DataLoaders stop their workers and
    staging folders keep the finished work as on Ctrl-C, and an ``except Exception`` (a sweep noting a failed
    measurement and going on) lets it through."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def _stop(signum, frame):
    # Later signals are ignored while the program unwinds: it only stops its workers and keeps what is done.
    for other in STOP_SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    # A helper thread's error from here on is the stop's consequence (multiprocessing's resource sharer, when a
    # DataLoader worker it was handing a tensor to is stopped): not a second report beside the one line.
    threading.excepthook = lambda arguments: None
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_signals():
    """Within the block SIGINT and SIGTERM raise ``Stopped`` (in the main thread; elsewhere nothing changes);
    the previous handlers and ``threading.excepthook`` come back after."""
    try:
        previous = {signum: signal.signal(signum, _stop) for signum in STOP_SIGNALS}
    except ValueError:  # not the main thread
        yield
        return
    excepthook = threading.excepthook
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        threading.excepthook = excepthook
