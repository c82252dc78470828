"""`python -m fastdit.bench.unpack ARCHIVE`: a device-check archive (benchmarks/device_check.sh) as the
committed documents, on any machine: docs/benchmarks/<gpu>.json/.md/.png (every bench step's rows, each with
its step; the attention rows; the steps table; the test summary) and docs/performance.md (the roofline with
the measured peaks). A damaged archive or one that is not a device-check archive: one line, exit 2."""
import argparse
import json
import os
import sys
import xml.etree.ElementTree as ElementTree

from fastdit.bench import archive
from fastdit.bench import report as bench_report
from fastdit.bench.roofline_document import main as roofline_main
from fastdit.io import write_text_atomic

PROG = "python -m fastdit.bench.unpack"


def merged(manifest: dict, files: dict) -> dict:
    """One report of every step: bench rows in plan order, each with ``step``, speedups as each bench run gave."""
    runs = [(name, json.loads(files[f"bench/{name}/report.json"])) for name in manifest["order"]
            if f"bench/{name}/report.json" in files]
    if not runs:
        raise archive.ArchiveError("the archive holds no bench report (did every bench step fail?)")
    first = runs[0][1]
    report = {"created": first["created"], "command": "benchmarks/device_check.sh", "device": first["device"],
              "peak": first["peak"], "settings": first["settings"], "identity": manifest["identity"],
              "steps": {name: manifest["steps"][name] for name in manifest["order"] if name in manifest["steps"]},
              "runs": [{"step": name, "command": run["command"], "settings": run["settings"]} for name, run in runs],
              "results": [{"step": name, **row} for name, run in runs for row in run["results"]]}
    if "attention/report.json" in files:
        report["attention"] = json.loads(files["attention/report.json"])
    if "tests/junit.xml" in files:
        report["tests"] = test_summary(files["tests/junit.xml"])
    return report


def test_summary(junit: bytes) -> dict:
    root = ElementTree.fromstring(junit)
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(suite.get(key, 0)) for suite in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {**counts, "failed": failed}


def markdown(report: dict) -> str:
    lines = [f"# fastdit on {report['device']['name']}", "",
             f"From `python -m fastdit.bench.unpack` of a benchmarks/device_check.sh archive (fastdit "
             f"{report['identity']['fastdit']}, sources {report['identity']['sources'][:12]}).", "",
             "## Steps", ""]
    lines += bench_report.markdown_table(["step", "status", "seconds", "budget"], [
        [name, step["status"], str(step["seconds"]), str(step["budget"])] for name, step in report["steps"].items()])
    for run in report["runs"]:
        rows = [row for row in report["results"] if row["step"] == run["step"]]
        text = bench_report.markdown({**report, "settings": run["settings"], "results": rows})
        lines += ["", f"## Step {run['step']}: `{run['command']}`", ""]
        lines += ["#" + line if line.startswith("#") else line for line in text.splitlines()[1:]]
    if "attention" in report:
        attention = report["attention"]
        settings = attention["settings"]
        lines += ["", f"## Attention: batch {settings['batch']}, {settings['tokens']} tokens, {settings['heads']} "
                      f"heads of {settings['head_dim']}, {settings['dtype']}", ""]
        lines += bench_report.markdown_table(["implementation", "passes", "time", "TFLOP/s"], [
            [row["implementation"], row["passes"]] + ([f"{row['time']['value'] * 1e3:.3f} ms",
                                                       f"{row['achieved']['value']:.1f}"] if row["status"] == "ok"
                                                      else [row["status"], row["reason"]])
            for row in attention["results"]])
    if "tests" in report:
        tests = report["tests"]
        lines += ["", "## Tests on the device", "",
                  f"{tests['tests']} tests: {tests['failures']} failed, {tests['errors']} errors, {tests['skipped']} "
                  "skipped."]
        lines += [f"- {name}" for name in tests["failed"]]
    return "\n".join(lines) + "\n"


def unpack(path, docs: str) -> str:
    """Write ``docs``/benchmarks/<gpu>.* and ``docs``/performance.md from the archive; return the <gpu> slug."""
    manifest, opened = archive.read(path)
    files = {member.name: opened.extractfile(member).read() for member in opened.getmembers()}
    report = merged(manifest, files)
    slug = manifest.get("device", {}).get("slug") or report["device"]["name"]
    target = os.path.join(docs, "benchmarks")
    os.makedirs(target, exist_ok=True)
    write_text_atomic(os.path.join(target, f"{slug}.json"), json.dumps(report, indent=2) + "\n")
    write_text_atomic(os.path.join(target, f"{slug}.md"), markdown(report))
    first = {}  # one point per configuration and implementation: the first step's (the plot's axes)
    for row in report["results"]:
        first.setdefault(tuple(row.get(k) for k in ("model", "batch_size", "workload", "implementation")), row)
    bench_report.plot({**report, "results": list(first.values())}, os.path.join(target, f"{slug}.png"))
    roofline = ["--out", os.path.join(docs, "performance.md"), "--bench-json", os.path.join(target, f"{slug}.json")]
    kernels = os.path.join(docs, "kernels.json")
    if roofline_main(roofline + (["--kernels-json", kernels] if os.path.exists(kernels) else [])) != 0:
        raise RooflineError("the roofline was not written (its error is above)")
    return slug


class RooflineError(RuntimeError):
    pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("archive", help="device_check.tar.gz from a device run's $OUT")
    parser.add_argument("--docs", default="docs", help="the docs folder to write into (default: docs)")
    args = parser.parse_args(argv)
    try:
        bench_report.check_plotting(f"{PROG} draws docs/benchmarks/<gpu>.png")
        slug = unpack(args.archive, args.docs)
    except (archive.ArchiveError, KeyError, ValueError, ImportError) as error:
        print(f"{PROG}: error: {args.archive}: {error}", file=sys.stderr)
        return 2
    except RooflineError:
        return 1
    print(f"{PROG}: wrote {args.docs}/benchmarks/{slug}.json/.md/.png and {args.docs}/performance.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
