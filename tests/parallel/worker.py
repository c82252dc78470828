"""Run under torchrun by tests/parallel/test_parallel.py: every case's parallel samples against this process's
own single-process ``fastdit.sample``, and the errors that need a process group. Each rank writes its report to report-<rank>.json in the working directory (printed lines of several ranks can
interleave on torchrun's merged stdout)."""
import json
import os
import sys

import torch
import torch.distributed as dist

from fastdit import DiT
from fastdit.diffusion.sampling import sample
from fastdit.models.fp8 import QuantizedActivation
from fastdit.parallel import ParallelDiT, layout_from_group, layout_from_mesh, make_mesh, parallel_sample
from fastdit.parallel.ulysses import UlyssesAttention

SAMPLERS = {"ddpm": 6, "ddim": 4, "dpm++": 4}
LABELS = [1, 2, 3]  # 3 images: more data ranks than images leaves one rank none


class LeakyAttention(UlyssesAttention):
    """The padding left in attention (the keys of all N * T/N rows): the exactness checks must catch it."""

    def forward(self, h):
        self.tokens = (h.values if isinstance(h, QuantizedActivation) else h).shape[1] * self.degree
        return super().forward(h)


def tiny_model(block, heads, device, size=8):
    torch.manual_seed(0)
    model = DiT(input_size=size, patch_size=2, in_channels=4, hidden_size=8 * heads, depth=2, num_heads=heads,
                num_classes=10, block=block).to(device)
    for parameter in model.parameters():  # zero-initialised gates would make every block an identity
        torch.nn.init.normal_(parameter, std=0.2)
    return model.eval()


def relative(out, ref):
    return ((out - ref).abs().max() / ref.abs().max()).item()


def run_case(case, device):
    model = tiny_model(case["block"], case["heads"], device, case["size"])
    if "quantize" in case:  # the blocks' inputs then travel quantized (values and scales split alike)
        model = model.to(torch.bfloat16).quantize(case["quantize"])
    if case["spec"] == "group":
        arguments = {"group": dist.group.WORLD, "dimension": case["dimension"]}
        layout = layout_from_group(dist.group.WORLD, case["dimension"])
    else:
        mesh = make_mesh(case["spec"], device.type)
        arguments, layout = {"mesh": mesh}, layout_from_mesh(mesh)
    errors = {}
    for sampler, steps in SAMPLERS.items():
        for cfg_scale in (1.0, 4.0):
            settings = {"seed": 5, "sampler": sampler, "steps": steps, "cfg_scale": cfg_scale}
            out = parallel_sample(model, LABELS, **arguments, **settings)
            errors[f"{sampler} cfg {cfg_scale}"] = relative(out, sample(model, LABELS, cuda_graphs=False, **settings))
    result = {"sampling": errors, "left in eval mode": not model.training}
    if layout.sp is not None:  # one forward, with the padding leaking into attention
        x = torch.randn(2, 4, case["size"], case["size"], generator=torch.Generator().manual_seed(1)).to(device)
        t, y = torch.tensor([3, 900], device=device), torch.tensor([1, 4], device=device)
        runner = ParallelDiT(model, layout)
        result["tokens"] = model.x_embedder.num_patches + (2 if case["block"] == "in-context" else 0)
        result["sp degree"] = layout.degree("sp")
        with torch.no_grad():
            ref = model(x, t, y)
            result["forward"] = relative(runner(x, t, y), ref)
            runner.wrappers = [LeakyAttention(block.attn, layout.sp) for block in model.blocks]
            result["leaky forward"] = relative(runner(x, t, y), ref)
    return result


def run_errors(device):
    errors = {}

    def caught(name, fn):
        try:
            fn()
            errors[name] = None
        except (ValueError, TypeError) as error:
            errors[name] = f"{type(error).__name__}: {error}"

    model = tiny_model("adaln-zero", 3 * dist.get_world_size() // 2, device)  # 3 heads over 2 ranks, 6 over 4
    caught("heads", lambda: parallel_sample(model, LABELS, mesh=make_mesh("sp", device.type), seed=0, steps=2))
    model = tiny_model("adaln-zero", 4, device)
    caught("seeds differ", lambda: parallel_sample(model, LABELS, mesh=make_mesh("sp", device.type),
                                                   seed=dist.get_rank(), steps=2))
    caught("cuda graphs", lambda: parallel_sample(model, LABELS, mesh=make_mesh("sp", device.type), seed=0,
                                                  steps=2, cuda_graphs=True))
    caught("mesh names", lambda: parallel_sample(
        model, LABELS, mesh=torch.distributed.device_mesh.init_device_mesh(device.type, (dist.get_world_size(),),
                                                                           mesh_dim_names=("tp",)), seed=0))
    return errors


def main():
    cases, device_type = json.loads(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    if device_type == "cuda":
        rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    try:
        results = {json.dumps(case): run_case(case, device) for case in cases}
        results["errors"] = run_errors(device)
        with open(f"report-{dist.get_rank()}.json", "w") as file:
            json.dump({"rank": dist.get_rank(), "results": results}, file)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
