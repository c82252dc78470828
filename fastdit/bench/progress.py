"""A benchmark's report kept the moment each measurement is made, and read back to resume.

A lent GPU stops each command at its time limit: a run that wrote its report only at the end would
bring back nothing. Under ``fastdit.stopping.stop_on_signals`` SIGINT and SIGTERM raise ``Stopped``, so the
measurement in flight is abandoned, the report holds every finished one, and the process exits 128 + the
signal's number. ``previous_rows`` reads such a report back, so that ``--resume`` measures only what it lacks."""
import json
import os


def previous_rows(path, settings: dict, what: str) -> tuple[dict | None, list[dict]]:
    """(the report at ``path``, its rows) for ``--resume``; (None, []) where no report is there yet.
    A report whose ``settings`` differ in any key of ``settings`` is refused (ValueError): its rows were
    measured under other conditions and must not be merged."""
    if not os.path.exists(path):
        return None, []
    try:
        with open(path) as file:
            report = json.load(file)
        rows, recorded = report["results"], report["settings"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--resume: {path} is not a readable {what} report ({type(error).__name__}: {error})") from None
    for key, value in settings.items():
        if recorded.get(key) != value:
            raise ValueError(f"--resume: {path} was measured with {key}={recorded.get(key)!r}, this run has "
                             f"{key}={value!r}; use another --out or leave out --resume")
    return report, rows
