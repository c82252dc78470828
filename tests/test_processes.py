"""The session's leftover-process check (tests/conftest.py ``no_leftover_processes``) finds an orphan that a test
left, and not the test process itself."""
import os
import signal
import subprocess
import time

from processes import SESSION_MARKER, marked_processes


def test_an_orphaned_process_with_the_marker_is_found(tmp_path):
    marker = f"check-{os.getpid()}-{time.time_ns()}"  # not the session's: this test cleans up after itself
    pid_file = tmp_path / "pid"
    # sh starts sleep in the background and exits: sleep is adopted by init, as a killed fastdit's helpers are.
    subprocess.run(["sh", "-c", f"sleep 60 & echo $! > {pid_file}"], env={**os.environ, SESSION_MARKER: marker},
                   check=True)
    orphan = int(pid_file.read_text())
    try:
        found = marked_processes(marker)
        assert orphan in found and "sleep 60" in found[orphan], found
        assert os.getpid() not in marked_processes(os.environ[SESSION_MARKER])
    finally:
        os.kill(orphan, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while orphan in marked_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert orphan not in marked_processes(marker)
