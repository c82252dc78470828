"""`python -m fastdit.bench.probe FILE [--cpu]`: the device a device-check run measures, as JSON in FILE.

Its name (and a file-name slug of it), compute capability, and the versions and optional modules that the
steps need, so that the log says at once what the lent machine has. Without --cpu a machine with no CUDA
device is an error: one line, exit 2."""
import argparse
import importlib.util
import json
import platform
import re
import sys

OPTIONAL_MODULES = ("pytest", "xdist", "matplotlib", "tqdm", "numpy")


def slug(name: str) -> str:
    """A device name as a file name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def probe(cpu: bool) -> dict:
    import torch

    from fastdit.bench.report import device_info

    if not cpu and not torch.cuda.is_available():
        raise RuntimeError(f"no CUDA device: torch {torch.__version__} sees none (torch.cuda.is_available() is "
                           "False); run this on the GPU machine, --cpu for the CPU mode, or --dry-run for the plan")
    device = torch.device("cpu" if cpu else "cuda")
    info = device_info(device)
    info["slug"] = slug(info["name"])
    if not cpu:
        major, minor = torch.cuda.get_device_capability(0)
        info["arch"] = f"{major}{minor}"
    info["modules"] = {name: importlib.util.find_spec(name) is not None for name in OPTIONAL_MODULES}
    info["python"] = platform.python_version()
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdit.bench.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="where to write the JSON")
    parser.add_argument("--cpu", action="store_true", help="describe the CPU (the device check's CPU mode)")
    args = parser.parse_args(argv)
    try:
        info = probe(args.cpu)
    except RuntimeError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    with open(args.file, "w") as file:
        json.dump(info, file, indent=2)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
