"""The roofline of a DiT's forward, guided sampling step and training step, op by op.

Each op that the fast model launches (a cuBLAS GEMM, a fused Triton kernel, a torch elementwise op)
gets its matrix FLOPs (``fastdit.models.flops``) and the HBM bytes it must move: every tensor it reads or
writes crosses HBM exactly once, the least any implementation of that launch can move. At a GPU's
peaks it takes at least max(FLOPs / peak FLOP/s, bytes / bandwidth): compute-bound above the ridge
point (peak FLOP/s / bandwidth), memory-bound below. The ops run one after another, so the sum of
those times is the floor of fastdit's sequence of launches (``Sequence``: the GELU and
the adaLN GEMMs as separate launches, fused, or FP8);
``model_limit_seconds`` is the model's own physical limit, below it. A GPU run
(benchmarks/device_check.sh) measures how far fastdit is from them. ``fastdit.bench.roofline_document`` writes it as docs/performance.md.
"""
import dataclasses

from fastdit.kernels.modulate import TOKENS_PER_PROGRAM
from fastdit.models.flops import DiTShape, forward_attention_products, forward_linears, workload_flops

BF16 = 2  # bytes
FP32 = 4
LABELS = 1001  # rows of the label table: ImageNet's 1000 classes and the null class of guidance


@dataclasses.dataclass(frozen=True)
class Peak:
    """A GPU's dense bf16 (and FP8, where known) tensor-core FLOP/s and HBM bandwidth."""

    name: str
    tflops: float
    bandwidth: float  # TB/s
    source: str
    fp8_tflops: float | None = None

    @property
    def ridge(self) -> float:
        """FLOPs per HBM byte at which an op stops being memory-bound."""
        return self.tflops / self.bandwidth


# Dense = the datasheets' "with sparsity" figures halved (their footnote); 989.4 TFLOP/s is 132 SMs
# x 1,830 MHz x 4,096 dense bf16 FLOPs per SM per clock. H200 has H100's die with faster HBM3e.
DATASHEET_PEAKS = (
    Peak("H100 SXM", 989.4, 3.35, "NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100), "
         "SXM column: BF16 Tensor Core 1,979 TFLOPS with sparsity, FP8 3,958 with sparsity, GPU memory "
         "bandwidth 3.35 TB/s", 1979.0),
    Peak("H200 SXM", 989.4, 4.8, "NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200), "
         "SXM column: BF16 Tensor Core 1,979 TFLOPS with sparsity, FP8 3,958 with sparsity, GPU memory "
         "bandwidth 4.8 TB/s", 1979.0),
)


@dataclasses.dataclass(frozen=True)
class Precision:
    """Bytes per element: ``activation`` for GEMM operands and outputs, normed copies, modulations;
    ``parameter`` for the stored weights, which the residual stream and pos_embed share."""

    name: str
    parameter: int

    @property
    def autocast(self) -> bool:  # fp32 weights: autocast casts a bf16 copy of each for its GEMM
        return self.parameter != BF16


@dataclasses.dataclass(frozen=True)
class Sequence:
    """Which launches fastdit's forward makes: the GELU in fc1's epilogue or a pass of its own, one adaLN
    GEMM for every block or one per block, and FP8 GEMMs (qkv, attn_proj, fc1, fc2) with their inputs
    quantized per token by a pass of their own."""

    name: str
    fused_gelu: bool = True
    one_adaln_gemm: bool = True
    fp8: bool = False


BEFORE = Sequence("bf16, GELU as its own pass, one adaLN GEMM per block", fused_gelu=False, one_adaln_gemm=False)
CURRENT = Sequence("bf16, GELU in fc1's epilogue, one adaLN GEMM for all blocks")
FP8_SEQUENCE = Sequence("FP8 (model.quantize(\"fp8\"))", fused_gelu=False, fp8=True)
FP8_GEMMS = ("qkv", "attn_proj", "fc1", "fc2")

INFERENCE = Precision("bf16 weights, activations and residual stream (the benchmarks' bf16 model)", BF16)
TRAINING = Precision("autocast to bf16: fp32 weights and residual stream, bf16 GEMMs (fastdit train)", FP32)

KINDS = {"gemm": "GEMM (cuBLAS)", "fused": "fused (Triton)", "attention": "attention (Triton)",
         "elementwise": "elementwise (torch)", "optimizer": "optimizer & casts"}


@dataclasses.dataclass(frozen=True)
class Op:
    """One op of a step, summed over its ``launches``: matrix FLOPs and HBM bytes."""

    name: str
    kind: str  # a key of KINDS
    stage: str  # "forward", "backward" or "optimizer"
    launches: int
    flops: int
    bytes: int
    kernels: tuple[str, ...] = ()  # fastdit's Triton kernels: rows of the static compile facts
    fp8: bool = False  # FP8 tensor cores: the FLOPs at the FP8 peak

    def tflops(self, peak: Peak) -> float:
        if self.fp8 and peak.fp8_tflops is None:
            raise ValueError(f"peak: {peak.name} has no FP8 FLOP/s, which op {self.name} needs")
        return peak.fp8_tflops if self.fp8 else peak.tflops

    def seconds(self, peak: Peak) -> float:
        return max(self.flops / (self.tflops(peak) * 1e12), self.bytes / (peak.bandwidth * 1e12))

    def bound(self, peak: Peak) -> str:
        ridge = self.tflops(peak) / peak.bandwidth
        return "compute" if self.bytes == 0 or self.flops / self.bytes >= ridge else "memory"


def _gemm(name, stage, rows, k, n, count, a, with_bias=True) -> Op:
    """``count`` GEMMs (rows x k) @ (k x n) in bf16, with a bias epilogue."""
    moved = a * (rows * k + k * n + rows * n + (n if with_bias else 0))
    return Op(name, "gemm", stage, count, 2 * count * rows * k * n, count * moved)


def _fp8_gemm(name, rows, k, n, count) -> Op:
    """``count`` FP8 GEMMs: 1-byte operands, an fp32 scale per row of each, bf16 bias and output."""
    moved = rows * k + k * n + FP32 * (rows + n) + BF16 * (n + rows * n)
    return Op(name, "gemm", "forward", count, 2 * count * rows * k * n, count * moved, fp8=True)


def _quantize(name, rows, features, count) -> Op:
    """``count`` per-token quantizations of (rows, features) bf16 to FP8 and an fp32 scale per row, in
    one pass (the row's maximum taken while it is in registers)."""
    return Op(name, "elementwise", "forward", count, 0, count * rows * (features * (BF16 + 1) + FP32))


def _sizes(shape: DiTShape, batch: int):
    return batch * shape.tokens, shape.hidden_size, shape.mlp_hidden_size


def _adaln_linears(linears, one_gemm) -> list:
    """The adaLN linears as the model runs them: the blocks' and the final layer's, or one stacked linear."""
    blocks, final = linears["adaln_modulation"], linears["final_modulation"]
    if not one_gemm:
        return [blocks, final]
    out_features = blocks.count * blocks.out_features + final.out_features
    return [dataclasses.replace(blocks, out_features=out_features, count=1)]


def forward_ops(shape: DiTShape, batch: int, precision: Precision = INFERENCE, sequence: Sequence = CURRENT) -> list[Op]:
    """The ops of a forward of the adaLN-Zero DiT (fastdit.models.dit), in the order it runs them, as
    ``sequence`` launches them."""
    if shape.block != "adaln-zero":
        raise ValueError(f"block: the roofline covers the adaLN-Zero model, got {shape.block!r}")
    rows, d, mlp = _sizes(shape, batch)
    a, r, depth = BF16, precision.parameter, shape.depth
    linears = {linear.name: linear for linear in forward_linears(shape)}
    (attention,) = forward_attention_products(shape)

    def gemm(name, linear=None):
        linear = linear or linears[name]
        if sequence.fp8 and name in FP8_GEMMS:
            return _fp8_gemm(name, batch * linear.rows, linear.in_features, linear.out_features, linear.count)
        return _gemm(name, "forward", batch * linear.rows, linear.in_features, linear.out_features, linear.count, a)

    def quantize(name, features):
        return [_quantize(name, rows, features, depth)] if sequence.fp8 else []

    if sequence.fp8:  # the GELU's output is quantized in the GELU's own pass: bf16 in, FP8 out
        gelu = [_quantize("gelu + quantize", rows, mlp, depth)]
    elif sequence.fused_gelu:
        gelu = []
    else:
        gelu = [Op("gelu", "elementwise", "forward", depth, 0, depth * 2 * a * rows * mlp)]

    patch = linears["patch_embed"]
    # The stream, each sub-block's gated update plus the next norm: x, y in; x, normed out; 3 modulations.
    stream = rows * d * (2 * r + 2 * a) + 3 * batch * d * a
    heads = shape.num_heads
    return [
        Op("patch_embed", "fused", "forward", 1, 2 * batch * patch.macs,
           a * rows * patch.in_features + a * patch.in_features * d + r * d + r * shape.tokens * d + r * rows * d,
           ("_patch_embed_kernel",)),
        gemm("timestep_fc1"), gemm("timestep_fc2"),
        Op("label_embed", "elementwise", "forward", 1, 0, 2 * r * batch * d),
        *(gemm(linear.name, linear) for linear in _adaln_linears(linears, sequence.one_adaln_gemm)),
        Op("modulate_layernorm", "fused", "forward", 1, 0, rows * d * (r + a) + 2 * batch * d * a,
           ("_modulate_layernorm_kernel",)),
        *quantize("qkv: quantize input", d),
        gemm("qkv"),
        Op("attention", "attention", "forward", depth, 2 * batch * attention.macs,
           depth * (4 * a * rows * d + FP32 * batch * heads * shape.tokens), ("_attention_fwd_kernel",)),
        *quantize("attn_proj: quantize input", d),
        gemm("attn_proj"),
        Op("gated_residual_modulate_layernorm", "fused", "forward", 2 * depth, 0, 2 * depth * stream,
           ("_gated_residual_kernel",)),
        *quantize("fc1: quantize input", d),
        gemm("fc1"),
        *gelu,
        gemm("fc2"),
        gemm("final_linear"),
    ]


def _gemm_backward(linear, batch, a, input_grad=True) -> list[Op]:
    rows, k, n, count = batch * linear.rows, linear.in_features, linear.out_features, linear.count
    ops = [_gemm(f"{linear.name}: grad weight", "backward", rows, k, n, count, a)]  # bias grad in its epilogue
    if input_grad:
        ops.insert(0, _gemm(f"{linear.name}: grad input", "backward", rows, n, k, count, a, with_bias=False))
    return ops


def parameter_count(shape: DiTShape) -> int:
    """Trainable parameters: every linear layer's weight and bias, and the label table."""
    return sum(linear.count * (linear.in_features + 1) * linear.out_features
               for linear in forward_linears(shape)) + LABELS * shape.hidden_size


def backward_ops(shape: DiTShape, batch: int, precision: Precision = TRAINING, one_adaln_gemm: bool = True) -> list[Op]:
    """The ops of the backward, then the optimizer step, in the order they run."""
    rows, d, mlp = _sizes(shape, batch)
    a, r, depth, heads = BF16, precision.parameter, shape.depth, shape.num_heads
    linears = {linear.name: linear for linear in forward_linears(shape)}
    (attention,) = forward_attention_products(shape)
    # Flash backward, in dot products of (queries x keys x head dim) per head ("units"; the forward
    # is 2 units, the model's backward 4): the dk, dv kernel recomputes the scores, then dP, dV and
    # dK (4); the dq kernel recomputes the scores and dP, then dQ (3).
    unit = batch * attention.macs  # FLOPs of one unit over all blocks: half the forward's
    blocks = -(-shape.tokens // TOKENS_PER_PROGRAM)
    partials = batch * blocks * d * FP32 * 2  # fp32 per-program partial sums, written then summed
    stream = rows * d * (3 * r + 3 * a) + 2 * batch * d * a + 3 * partials
    statistics = FP32 * batch * heads * shape.tokens  # lse or delta
    ops = [
        *_gemm_backward(linears["final_linear"], batch, a),
        *_gemm_backward(linears["fc2"], batch, a),
        Op("gated_residual_modulate_layernorm", "fused", "backward", 2 * depth, 0, 2 * depth * stream,
           ("_gated_residual_backward_kernel",)),
        Op("gelu", "elementwise", "backward", depth, 0, depth * 3 * a * rows * mlp),
        *_gemm_backward(linears["fc1"], batch, a),
        *_gemm_backward(linears["attn_proj"], batch, a),
        Op("attention: delta", "attention", "backward", depth, 0, depth * (2 * a * rows * d + statistics),
           ("_attention_bwd_delta_kernel",)),
        Op("attention: dk, dv", "attention", "backward", depth, 4 * unit,
           depth * (6 * a * rows * d + 2 * statistics), ("_attention_bwd_key_kernel",)),
        Op("attention: dq", "attention", "backward", depth, 3 * unit,
           depth * (5 * a * rows * d + 2 * statistics), ("_attention_bwd_query_kernel",)),
        # q, k, v are views of the qkv output: autograd stacks their three gradients into one.
        Op("qkv gradient stack", "elementwise", "backward", depth, 0, depth * 6 * a * rows * d),
        *_gemm_backward(linears["qkv"], batch, a),
        Op("modulate_layernorm", "fused", "backward", 1, 0, rows * d * (2 * r + a) + batch * d * a + 2 * partials,
           ("_modulate_layernorm_backward_kernel",)),
        # The stream's first x feeds the first norm and the first gated update: two gradients to add.
        Op("stream gradient sum", "elementwise", "backward", 1, 0, 3 * r * rows * d),
        *(op for linear in _adaln_linears(linears, one_adaln_gemm) for op in _gemm_backward(linear, batch, a)),
        *_gemm_backward(linears["timestep_fc2"], batch, a),
        # Nothing needs the gradient of the sinusoidal features or of the latents.
        *_gemm_backward(linears["timestep_fc1"], batch, a, input_grad=False),
        # A dense gradient of the table: zeroed, then the batch's rows added in.
        Op("label_embed", "elementwise", "backward", 1, 0, FP32 * (LABELS * d + 2 * batch * d)),
        Op("patch_embed: grad weight", "fused", "backward", 1, 2 * batch * linears["patch_embed"].macs,
           r * rows * d + a * rows * linears["patch_embed"].in_features, ("_patch_embed_grad_weight_kernel",)),
    ]
    parameters = parameter_count(shape)
    if precision.autocast:
        cast = parameters - LABELS * d  # the label table is looked up in fp32: not cast
        ops.insert(0, Op("autocast: weights to bf16", "optimizer", "forward", 1, 0, cast * (FP32 + BF16)))
        ops.append(Op("autocast: weight gradients to fp32", "optimizer", "backward", 1, 0, cast * (FP32 + BF16)))
    # AdamW in one pass: parameter, gradient and both moments read, parameter and moments written.
    ops.append(Op("AdamW (one pass)", "optimizer", "optimizer", 1, 0, parameters * 7 * precision.parameter))
    return ops


def training_ops(shape: DiTShape, batch: int, sequence: Sequence = CURRENT) -> list[Op]:
    """Forward under autocast, backward and optimizer: one training step. Training runs the GELU as a pass
    of its own (fastdit.models.dit.Mlp) and in bf16."""
    if sequence.fp8:
        raise ValueError("sequence: the FP8 path is for inference; training runs bf16")
    backward = backward_ops(shape, batch, TRAINING, sequence.one_adaln_gemm)
    casts = [op for op in backward if op.stage == "forward"]
    forward = forward_ops(shape, batch, TRAINING, dataclasses.replace(sequence, fused_gelu=False))
    return casts + forward + [op for op in backward if op.stage != "forward"]


def workload_ops(shape: DiTShape, workload: str, batch: int, sequence: Sequence = CURRENT) -> list[Op]:
    """A benchmark workload's ops (fastdit.bench.workloads): a guided sampling step runs the model on
    the batch and its unconditional copy; its solver update is a few latent-sized elementwise ops, left out."""
    if workload == "forward":
        return forward_ops(shape, batch, sequence=sequence)
    if workload == "sampling-step":
        return forward_ops(shape, 2 * batch, sequence=sequence)
    if workload == "training-step":
        return training_ops(shape, batch, sequence)
    raise ValueError(f"workload: expected forward, sampling-step or training-step, got {workload!r}")


def total_seconds(ops: list[Op], peak: Peak) -> float:
    return sum(op.seconds(peak) for op in ops)


def shares(ops: list[Op], peak: Peak) -> dict[str, float]:
    """Fraction of the predicted time per kind of op (KINDS)."""
    total = total_seconds(ops, peak)
    return {kind: sum(op.seconds(peak) for op in ops if op.kind == kind) / total for kind in KINDS}


def model_limit_seconds(shape: DiTShape, workload: str, batch: int, peak: Peak, fp8: bool = False) -> float | None:
    """The model's physical limit, whatever launches run it: its FLOPs (the paper's count, 3 forwards for
    a training step) at the dense peak, or the least bytes a step must move at the bandwidth, whichever
    is larger. Least bytes: for inference the weights read once (FP8 ones for the GEMMs of
    ``FP8_GEMMS``, bf16 the rest) and the latents in and out in fp32; for training, AdamW's one pass
    over fp32 weights, gradients and moments. None for FP8 training (fastdit trains in bf16) or a peak
    without FP8 FLOP/s."""
    if fp8 and (workload == "training-step" or peak.fp8_tflops is None):
        return None
    flops = workload_flops(shape, workload) * batch
    parameters = parameter_count(shape)
    images = 2 * batch if workload == "sampling-step" else batch
    latents = FP32 * images * (shape.in_channels + shape.out_channels) * shape.input_size**2
    if workload == "training-step":
        moved = 7 * FP32 * parameters + latents
    else:
        quantized = sum(linear.count * linear.in_features * linear.out_features
                        for linear in forward_linears(shape) if linear.name in FP8_GEMMS) if fp8 else 0
        moved = BF16 * parameters - quantized + latents
    return max(flops / ((peak.fp8_tflops if fp8 else peak.tflops) * 1e12), moved / (peak.bandwidth * 1e12))
