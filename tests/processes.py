"""What the tests that start fastdit in other processes share."""
import os


def torch_path_environment(**variables: str) -> dict[str, str]:
    """This process's environment without TRITON_INTERPRET, plus ``variables``: a fastdit started with it runs
    the fused ops' plain torch path. The tests that start processes test processes, files, signals and
    collectives, not the kernels (those are checked in-process, in tests/kernels and tests/models), and a whole
    interpreted run would take minutes on CI's two cores."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment.update(variables)
    return environment


# Every process a test starts inherits this variable (the tests build their children's environments from
# os.environ), set to one value per pytest process: what is still running with it when the session ends was
# started by a test and outlived it (e.g. the forkserver and resource tracker of a SIGKILLed fastdit, which
# init adopts, so that they are no longer this process's descendants).
SESSION_MARKER = "FASTDIT_TEST_SESSION"
HELPER_POOLS = ("multiprocessing", "compile_worker")


def _read(path) -> bytes | None:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError:  # the process ended meanwhile, or is not ours to read
        return None


def marked_processes(marker: str) -> dict[int, str]:
    """pid -> command line of the processes whose environment holds ``SESSION_MARKER=marker``, but this one and
    the helper pools of this one, which end with it (multiprocessing's resource tracker or forkserver, inductor's
    compile workers)."""
    found, entry = {}, f"{SESSION_MARKER}={marker}".encode()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        environment = _read(f"/proc/{name}/environ")
        if environment is None or entry not in environment.split(b"\0"):
            continue
        command = (_read(f"/proc/{name}/cmdline") or b"").replace(b"\0", b" ").decode(errors="replace").strip()
        stat = _read(f"/proc/{name}/stat") or b""
        parent = int(stat.rsplit(b")", 1)[1].split()[1]) if b")" in stat else 0
        if parent == os.getpid() and any(pool in command for pool in HELPER_POOLS):
            continue
        if stat and stat.rsplit(b")", 1)[1].split()[0] == b"Z":  # a zombie has ended: its parent reaps it
            continue
        found[int(name)] = command
    return found
