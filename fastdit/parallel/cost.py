"""What CFG and sequence parallelism cost and save for one image's guided sampling step, predicted from the
roofline (``fastdit.bench.roofline``) and the bytes each rank sends. ``python -m fastdit.parallel.cost`` prints
the tables of docs/parallel.md.

A rank's compute is the roofline of the ops it runs, one after another; its communication is the bytes it sends
over NVLink at the link's peak plus a fixed latency per collective, not overlapped with compute (each all-to-all
sits between the qkv projection and attention, or between attention and the output projection, on the critical
path). So the predictions are the best these modes can do on the hardware, as the roofline is for one GPU.
"""
import dataclasses

from fastdit.bench.roofline import BF16, DATASHEET_PEAKS, forward_ops, total_seconds
from fastdit.models.flops import named_shape

# Ops a sequence-parallel rank runs on the whole image (fastdit.parallel.ulysses: the embedding, conditioning and
# modulations run on every rank, then each keeps its tokens); every other op runs on its T/N tokens.
WHOLE_IMAGE_OPS = ("patch_embed", "timestep_fc1", "timestep_fc2", "label_embed", "adaln_modulation",
                   "final_modulation", "modulate_layernorm")
RESOLUTIONS = {256: 32, 512: 64, 1024: 128}  # image side -> latent side (the VAE's factor 8)
GPU_COUNTS = (2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Link:
    """One GPU's interconnect: peak bytes per second each way, and the fixed time of one collective."""

    name: str
    bandwidth: float  # bytes/s, one direction
    latency: float  # s per collective
    source: str


# 900 GB/s is NVLink 4's total of both directions (18 links); an all-to-all's sends leave at most 450 GB/s.
# The latency is an assumption, not a measurement: the order of NCCL's small-message collectives inside one
# NVSwitch node. A reader with a measured figure changes this one number.
NVLINK_H100 = Link("H100 SXM NVLink 4 (NVSwitch)", 450e9, 10e-6,
                   "NVIDIA H100 datasheet, SXM column: NVLink 900 GB/s (both directions); latency assumed")


@dataclasses.dataclass(frozen=True)
class Plan:
    """A mode on ``gpus`` GPUs for one image: cfg degree (1 or 2) x sp degree."""

    mode: str
    cfg: int
    sp: int

    @property
    def gpus(self):
        return self.cfg * self.sp


def plans(gpus: int) -> list[Plan]:
    found = [Plan("one GPU", 1, 1)] if gpus == 1 else [Plan("sp", 1, gpus)]
    if gpus == 2:
        found.insert(0, Plan("cfg", 2, 1))
    elif gpus > 2:
        found.append(Plan("cfg+sp", 2, gpus // 2))
    return found


def sp_layer_bytes(shape, batch: int, degree: int) -> float:
    """Bytes one rank sends per layer: its T/N tokens' q, k, v and attention output, less the share it keeps."""
    if degree == 1:
        return 0.0
    tokens = shape.tokens / degree
    return batch * 4 * tokens * shape.hidden_size * BF16 * (degree - 1) / degree


def step_bytes(shape, plan: Plan) -> dict:
    """Bytes one rank sends in one guided step of one image: per layer, in the step, and the collectives."""
    batch = 2 // plan.cfg  # the model's batch on this rank: [cond; null], or its half
    output = shape.tokens * shape.patch_size**2 * shape.out_channels * BF16  # one image's model output
    layer = sp_layer_bytes(shape, batch, plan.sp)
    total, collectives = shape.depth * layer, 0
    if plan.sp > 1:  # two all-to-alls per layer, the final all-gather of the output tokens
        total += batch * output / plan.sp * (plan.sp - 1)
        collectives += 2 * shape.depth + 1
    if plan.cfg > 1:  # the all-gather of the two halves' outputs
        total += batch * output
        collectives += 1
    return {"layer": layer, "step": total, "collectives": collectives}


def step_seconds(shape, plan: Plan, peak, link: Link = NVLINK_H100) -> dict:
    """Predicted seconds of one guided step of one image on one rank of ``plan``: compute and communication."""
    batch = 2 // plan.cfg
    whole, split = forward_ops(shape, batch), forward_ops(shape, batch / plan.sp)
    # Attention over all T tokens with H/N heads moves and computes what all H heads over T/N of the batch's
    # tokens would: the fractional batch stands for both.
    compute = sum(total_seconds([op], peak) for op in (whole if plan.sp == 1 else
                  [w if w.name in WHOLE_IMAGE_OPS else s for w, s in zip(whole, split)]))
    sent = step_bytes(shape, plan)
    sending, latency = sent["step"] / link.bandwidth, sent["collectives"] * link.latency
    return {"compute": compute, "sending": sending, "latency": latency, "total": compute + sending + latency}


def markdown(model: str = "DiT-XL/2", peak=DATASHEET_PEAKS[0], link: Link = NVLINK_H100) -> str:
    volume = [("| image | tokens | mode | GPUs | sent per layer per GPU | sent per step per GPU "
               "| collectives per step |"), "|---|---|---|---|---|---|---|"]
    latency = [(f"| image | mode | GPUs | compute | sending | collectives' latency (assumed) | step | "
                f"vs one GPU ({peak.name}) |"), "|---|---|---|---|---|---|---|---|"]
    for pixels, latent in RESOLUTIONS.items():
        shape = named_shape(model, latent)
        single = step_seconds(shape, Plan("one GPU", 1, 1), peak, link)["total"]
        latency.append(f"| {pixels} px | one GPU | 1 | {single * 1e3:.2f} ms | 0 | 0 | {single * 1e3:.2f} ms | 1.00x |")
        for gpus in GPU_COUNTS:
            for plan in plans(gpus):
                sent = step_bytes(shape, plan)
                volume.append(f"| {pixels} px | {shape.tokens} | {plan.mode} | {gpus} | {sent['layer'] / 1e6:.2f} MB "
                              f"| {sent['step'] / 1e6:.1f} MB | {sent['collectives']} |")
                seconds = step_seconds(shape, plan, peak, link)
                latency.append(f"| {pixels} px | {plan.mode} | {gpus} | {seconds['compute'] * 1e3:.2f} ms | "
                               f"{seconds['sending'] * 1e3:.2f} ms | {seconds['latency'] * 1e3:.2f} ms | "
                               f"{seconds['total'] * 1e3:.2f} ms | "
                               f"{single / seconds['total']:.2f}x |")
    return "\n".join(volume) + "\n\n" + "\n".join(latency) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
