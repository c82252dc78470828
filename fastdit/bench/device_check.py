"""benchmarks/device_check.sh: every measurement a lent GPU owes fastdit, in one call that survives its limits.

The steps (``fastdit.bench.device_plan``) run in order of value, each under ``timeout -s INT`` with its budget
and a grace period, writing into a scratch folder. After every step the scratch folder becomes one archive in
``--out`` (built under a temporary name, then renamed), beside the log: whatever stops the run, the archive
holds every finished measurement, and ``--out`` holds two files. SIGINT or SIGTERM is passed to the running
step as SIGINT (a bench step then writes what it has), the log's last line names the step that was stopped,
and the archive is rebuilt before exiting 128 + the signal's number. ``--resume ARCHIVE`` continues an earlier
call: finished steps are kept, and a stopped bench step measures only what its report lacks.
``python -m fastdit.bench.unpack ARCHIVE`` turns an archive into docs/benchmarks/<gpu>.* and the roofline."""
import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from fastdit.bench import archive
from fastdit.bench.device_plan import plan
from fastdit.io import atomic_path
from fastdit.stopping import STOP_SIGNALS

PROG = "benchmarks/device_check.sh"
ARCHIVE = "device_check.tar.gz"
LOG = "device_check.log"


def finished(status: str) -> bool:
    """Whether a --resume keeps a step of this status: ok, skipped, or failed (it would fail the same way again);
    a step that was stopped, timed out, killed or not run runs again."""
    return status == "ok" or status.startswith(("failed", "skipped"))


class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{PROG}: error: {message}\n")


def arguments(argv):
    parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT"),
                        help=f"where {ARCHIVE} and {LOG} go, and nothing else (default: $OUT)")
    parser.add_argument("--resume", metavar="ARCHIVE", help="an archive of an earlier call on this GPU and checkout: "
                                                            "its finished measurements are kept, the rest run")
    parser.add_argument("--time-limit", type=int, default=570,
                        help="seconds this call may take in all (default 570: the device's 10-minute command limit "
                             "less 30 s to stop a step and write the archive); a step gets what is left if less "
                             "than its budget")
    parser.add_argument("--grace", type=int, default=20,
                        help="seconds a step has after SIGINT to write its report before it is killed (default 20)")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every step's budget (a busy CPU running the CPU mode needs more; default 1)")
    parser.add_argument("--cpu", action="store_true", help="the CPU mode: the same steps and writers on small "
                                                           "models, for the tests")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (steps, budgets, commands); no GPU")
    args = parser.parse_args(argv)
    if args.out is None and not args.dry_run:
        parser.error("--out: no directory given and $OUT is not set")
    if args.time_limit < 60 or args.grace < 1 or not args.budget_scale > 0:
        parser.error(f"--time-limit: expected >= 60, --grace >= 1 and --budget-scale > 0, got {args.time_limit}, "
                     f"{args.grace} and {args.budget_scale}")
    return args


class Run:
    """The scratch folder, the log and the archive of one call."""

    def __init__(self, args, scratch, manifest):
        self.args, self.scratch, self.manifest = args, scratch, manifest
        self.out_archive, self.out_log = os.path.join(args.out, ARCHIVE), os.path.join(args.out, LOG)
        self.log_file = open(os.path.join(scratch, LOG), "a", buffering=1)
        self.start, self.stopped, self.process, self.current = time.monotonic(), None, None, None

    def say(self, line: str) -> None:
        for stream in (self.log_file, sys.stdout):
            stream.write(line + "\n")
            stream.flush()

    def save(self) -> None:
        """The archive and the log copy in --out, each replaced atomically."""
        self.log_file.flush()
        archive.write(self.scratch, self.out_archive, self.manifest)
        with atomic_path(self.out_log) as temporary:
            shutil.copyfile(os.path.join(self.scratch, LOG), temporary)

    def on_signal(self, signum, frame):
        self.stopped = signal.Signals(signum).name
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGINT)  # timeout relays it to the step

    def run_step(self, step, budget: int) -> str:
        # The launch configs tuned in one step (and call: the file is archived) serve the later ones.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "FASTDIT_TUNING_CACHE": os.path.join(self.scratch, "tuning.json"),
               **step.env}
        command = ["timeout", "-s", "INT", "-k", str(self.args.grace), str(budget), *step.argv]
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        start_new_session=True, text=True, errors="replace")
        self.last_line = ""

        def copy_output():
            for line in self.process.stdout:
                self.say("  " + line.rstrip("\n"))
                self.last_line = line.strip() or self.last_line

        reader = threading.Thread(target=copy_output)
        reader.start()
        asked = None
        while True:
            try:
                rc = self.process.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if self.stopped and asked is None:
                    asked = time.monotonic()
                if asked is not None and time.monotonic() - asked > self.args.grace:
                    os.killpg(self.process.pid, signal.SIGKILL)
        reader.join()
        self.process = None
        if self.stopped:
            return f"stopped ({self.stopped})"
        return {0: "ok", 124: "timeout", 137: "killed"}.get(rc, f"failed ({rc})")


def main(argv=None) -> int:
    args = arguments(sys.argv[1:] if argv is None else argv)
    python = os.environ.get("PYTHON", "python3")
    if args.dry_run:
        total = 0
        print(f"{PROG} plan ({'cpu' if args.cpu else 'gpu'}), time limit {args.time_limit}s, grace {args.grace}s:")
        for step in plan(python, args.cpu, "$SCRATCH"):
            total += 0 if step.skip else step.budget
            what = f"skipped: {step.skip}" if step.skip else " ".join(f"{k}={v}" for k, v in step.env.items()) + \
                (" " if step.env else "") + " ".join(step.argv)
            print(f"  {step.name:<30} {step.budget:>4}s  {what}")
        print(f"total budget: {total}s")
        return 0
    identity = archive.code_identity()
    previous = None
    try:
        if args.resume:
            previous, opened = archive.read(args.resume)
            archive.check_identity(previous, identity, args.resume)
            if previous.get("mode") != ("cpu" if args.cpu else "gpu"):
                raise archive.ArchiveError(f"{args.resume} is from a {previous.get('mode')} run, not a "
                                           f"{'cpu' if args.cpu else 'gpu'} one")
        os.makedirs(args.out, exist_ok=True)
    except (archive.ArchiveError, OSError) as error:
        print(f"{PROG}: error: --{'out' if isinstance(error, OSError) else 'resume'}: {error}", file=sys.stderr)
        return 2
    scratch = tempfile.mkdtemp(prefix="device-check-")
    try:
        if previous is not None:
            archive.extract(opened, scratch)
        return _run(args, python, scratch, identity, previous)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(args, python, scratch, identity, previous) -> int:
    steps = plan(python, args.cpu, scratch)
    manifest = previous or {"identity": identity, "mode": "cpu" if args.cpu else "gpu", "steps": {}}
    manifest["order"] = [step.name for step in steps]
    run = Run(args, scratch, manifest)
    handlers = {signum: signal.signal(signum, run.on_signal) for signum in STOP_SIGNALS}
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    run.say(f"device_check: {stamp} {'resuming ' + args.resume if previous else 'start'}; "
            f"time limit {args.time_limit}s, grace {args.grace}s")
    reserve = args.grace + 10  # to stop the last step and write the archive inside the time limit
    for step in steps:
        record = manifest["steps"].get(step.name)
        if record and finished(record["status"]) and step.name != "probe":
            run.say(f"=== {step.name}: kept from the resumed archive ({record['status']})")
            continue
        left = int(args.time_limit - (time.monotonic() - run.start) - reserve)
        if run.stopped:
            break
        if step.skip or left < 10:
            status = f"skipped ({step.skip})" if step.skip else "not run (no time left in this call)"
            manifest["steps"][step.name] = {"status": status, "seconds": 0, "budget": step.budget}
            run.say(f"=== {step.name}: {status}")
            run.save()
            continue
        budget = min(round(step.budget * args.budget_scale), left)
        run.current = step.name
        run.say(f"=== {step.name} (budget {budget}s of {step.budget}s): " + " ".join(
            [f"{k}={v}" for k, v in step.env.items()] + step.argv))
        began = time.monotonic()
        status = run.run_step(step, budget)
        manifest["steps"][step.name] = {"status": status, "seconds": round(time.monotonic() - began, 1),
                                        "budget": step.budget, "command": step.argv, "env": step.env}
        if step.name == "probe" and status == "ok" and not _check_device(run, args, previous):
            return 2
        run.say(f"=== {step.name}: {status} in {manifest['steps'][step.name]['seconds']}s")
        run.save()
        if step.name == "probe" and status != "ok":  # no device to measure: the probe's own line, as ours
            run.say(f"device_check: the probe {status}; nothing was measured")
            run.save()
            print(f"{PROG}: error: {run.last_line.split('error: ', 1)[-1]}", file=sys.stderr)
            return 2
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
    if run.stopped:
        run.say(f"device_check: stopped by {run.stopped} during step {run.current}; {ARCHIVE} holds every "
                "finished measurement (--resume it to go on)")
        run.save()
        return 128 + signal.Signals[run.stopped].value
    undone = [name for name, record in manifest["steps"].items() if not finished(record["status"])]
    for step in steps:
        record = manifest["steps"][step.name]
        run.say(f"| {step.name:<28} | {record['status']:<40} | {record['seconds']:>6} |")
    run.say(f"device_check: done; {len(undone)} step(s) unfinished{': ' + ', '.join(undone) if undone else ''}; "
            f"python -m fastdit.bench.unpack {run.out_archive}")
    run.save()
    return 1 if undone or any(r["status"].startswith("failed") for r in manifest["steps"].values()) else 0


def _check_device(run, args, previous) -> bool:
    """Record the probed device in the identity; refuse a resumed archive of another device (one line)."""
    with open(os.path.join(run.scratch, "probe.json")) as file:
        device = json.load(file)
    if previous is not None and previous["identity"].get("device") not in (None, device["name"]):
        print(f"{PROG}: error: --resume: {args.resume} was measured on {previous['identity']['device']!r}, this "
              f"device is {device['name']!r}: its measurements cannot be merged", file=sys.stderr)
        return False
    run.manifest["identity"]["device"] = device["name"]
    run.manifest["device"] = device
    return True


if __name__ == "__main__":
    sys.exit(main())
