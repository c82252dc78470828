"""`fastdit evaluate SAMPLES REF`: FID, sFID, Inception Score, precision and recall as the ADM suite reports them
(``fastdit.evaluation``); `--digits`: the same on a digits classifier's features, with the digits accuracy."""
import glob
import os

from fastdit.cli import options
from fastdit.evaluation.report import DIGITS, run_evaluation
from fastdit import distributed


def add_arguments(parser):
    parser.description = ("Evaluate samples as the ADM suite (openai/guided-diffusion's evaluator.py) does. On many "
                          "GPUs: torchrun --nproc_per_node K -m fastdit evaluate ..., which gives the same numbers. "
                          "A killed evaluation, rerun, resumes from its finished feature shards.")
    parser.add_argument("samples", metavar="SAMPLES", help="a samples.npz (arr_0 or images), a `fastdit sample` "
                        "--out folder, or a folder of its batch files")
    parser.add_argument("ref", metavar="REF", nargs="?", help="a reference batch .npz (ADM's "
                        "VIRTUAL_imagenet256_labeled.npz and the like: images and/or mu, sigma, mu_s, sigma_s) or "
                        "another samples.npz; not with --digits")
    parser.add_argument("--digits", action="store_true", help="compare with scikit-learn's digits in the feature "
                        "space of a small digits classifier (trained at first use, cached), and report the digits "
                        "accuracy")
    parser.add_argument("--inception", metavar="PATH", help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
                        "(default: torch.hub's checkpoints folder, where torch-fidelity keeps it); fastdit never "
                        "downloads it")
    parser.add_argument("--batch-size", type=int, default=64, help="images per network call (default 64)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader processes reading images (default 2)")
    parser.add_argument("--device", help="default: cuda if there is one, else cpu (under torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--out", metavar="JSON", help="also write the report to this file")
    parser.add_argument("--restart", action="store_true", help="discard the feature shards a killed evaluation left")


def check_flags(args):
    if (args.ref is None) == (not args.digits):
        raise ValueError("REF: expected a reference batch, or --digits, not both" if args.ref else
                         "REF: expected a reference batch .npz (or --digits)")
    options.check_range("--batch-size", args.batch_size, 1, options.MAX_BATCH)
    options.check_range("--workers", args.workers, 0, options.MAX_WORKERS)


def kept(args) -> str:
    """What a stopped evaluation kept, for the line that says so: the finished feature shards beside SAMPLES."""
    parent, name = os.path.split(os.path.abspath(args.samples).rstrip(os.sep))
    shards = glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.features-*", "*.npz"))
    return f"{len(shards)} finished feature shard{'' if len(shards) == 1 else 's'} beside {args.samples}"


def run(args):
    check_flags(args)
    if args.device is not None:
        options.resolve_device(args.device)
    with distributed.launch(args.device) as process:
        run_evaluation(args.samples, DIGITS if args.digits else args.ref, process, inception=args.inception,
                       out=args.out, batch_size=args.batch_size, workers=args.workers, restart=args.restart)
    return 0
