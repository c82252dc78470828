"""Launch configurations as the launchers size them for a GPU (without one: the configs are
computed for simulated GPUs), and the attention backward's grid check."""
import pytest
import torch
from parity import DEVICE

from fastdit.kernels import attention, attention_backward, launch, runtime
from fastdit.kernels.attention_tiles import tile_shared_bytes

# An RTX 4090's opt-in shared memory per block: 99 KiB.
SM_89 = runtime.GPUSpec("RTX 4090 (sm_89)", (8, 9), 99 * 1024, 128)
META = torch.device("meta")


@pytest.fixture
def compiled(monkeypatch):
    """Launchers configure as for a compiled GPU run, even when the suite runs interpreted."""
    monkeypatch.setattr(launch, "TRITON_INTERPRET", False)


@pytest.mark.parametrize("spec", [runtime.TARGETS[90], runtime.TARGETS[80], SM_89], ids=lambda spec: spec.name)
@pytest.mark.parametrize("head_dim", [64, 72, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_attention_candidate_fits_the_gpu_shared_memory(compiled, spec, head_dim, dtype):
    with runtime.simulate(spec):
        for candidates, blocks in (
            (attention._forward_candidates(4096, head_dim, dtype, META), ("BLOCK_M", "BLOCK_N")),
            (attention_backward._backward_candidates(4096, head_dim, dtype, META), ("OUTER", "INNER")),
        ):
            assert candidates and len(candidates) == len({tuple(c.items()) for c in candidates})
            for candidate in candidates:
                resident, streamed = (candidate[block] for block in blocks)
                if blocks[0] == "OUTER":
                    resident *= 2
                needed = tile_shared_bytes(resident, streamed, candidate["num_stages"], head_dim, dtype)
                assert needed <= spec.shared_memory, candidate


def test_three_stages_where_they_fit_two_where_they_do_not(compiled):
    # Head dim 128 in bf16, 128x64 tiles: 3 stages need 128 KiB (more than sm_89's 99), 2 need 96.
    with runtime.simulate(runtime.TARGETS[90]):
        default_90 = attention._forward_candidates(4096, 128, torch.bfloat16, META)[0]
    with runtime.simulate(SM_89):
        default_89 = attention._forward_candidates(4096, 128, torch.bfloat16, META)[0]
    assert default_90 == {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    assert default_89 == {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}


def test_ampere_gets_8_warps_for_128_query_rows(compiled):
    # mma.sync: 16 rows a warp; 4 warps spilled on sm_80 (see attention._forward_candidates).
    with runtime.simulate(runtime.TARGETS[90]):
        hopper = attention._forward_candidates(256, 72, torch.bfloat16, META)[0]
    with runtime.simulate(runtime.TARGETS[80]):
        ampere = attention._forward_candidates(256, 72, torch.bfloat16, META)[0]
    assert (hopper["num_warps"], ampere["num_warps"]) == (4, 8)


def test_blocks_shrink_to_short_sequences(compiled):
    with runtime.simulate(runtime.TARGETS[90]):
        candidates = attention._forward_candidates(20, 64, torch.bfloat16, META)
    assert all(c["BLOCK_M"] <= 32 and c["BLOCK_N"] <= 32 for c in candidates)


@pytest.mark.parametrize("version, expected", [("3.6.0", (3, 6)), ("3.9.0", (3, 9)), ("3.10.0+git1a2b3c4", (3, 10))])
def test_triton_version(version, expected):
    assert launch.triton_version(version) == expected


def _defaults(version, monkeypatch):
    """Each attention launch's candidates at DiT-XL's head dim (72) in 256 tokens (and 128, where
    the backward lists other tiles), as a Triton ``version`` gets them, per GPU."""
    monkeypatch.setattr(launch, "TRITON_VERSION", version)
    result = {}
    for spec in (runtime.TARGETS[90], runtime.TARGETS[80]):
        with runtime.simulate(spec):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                for head_dim in (72, 128):
                    result[spec.arch, dtype, head_dim] = (attention._forward_candidates(256, head_dim, dtype, META),
                                                          attention_backward._backward_candidates(256, head_dim, dtype,
                                                                                                  META))
    return result


def _config_of(tile, owned, looped):
    block_owned, block_looped, warps, stages = tile
    return launch.config(warps, stages, **{owned: block_owned, looped: block_looped})


def test_triton_3_6_takes_its_own_defaults_from_the_same_candidates(compiled, monkeypatch):
    general, old = _defaults((3, 7), monkeypatch), _defaults((3, 6), monkeypatch)
    assert _defaults((3, 9), monkeypatch) == general
    forward_tile = launch.TRITON_3_6_DEFAULTS["attention_forward", "fp32"][0]
    backward_tile = launch.TRITON_3_6_DEFAULTS["attention_backward", "half"][0]
    for (arch, dtype, head_dim), candidates in old.items():
        # The same candidates, reordered: tuning times the same set.
        for mine, theirs in zip(candidates, general[arch, dtype, head_dim]):
            assert sorted(map(repr, mine)) == sorted(map(repr, theirs))
        forward, backward = (launcher[0] for launcher in candidates)
        expected_forward, expected_backward = (launcher[0] for launcher in general[arch, dtype, head_dim])
        if dtype == torch.float32 and arch == 90:  # warpgroup-MMA GPUs only
            expected_forward = _config_of(forward_tile, "BLOCK_M", "BLOCK_N")
        elif dtype != torch.float32 and arch == 80 and head_dim == 72:  # mma.sync GPUs, a head dim whose tiles list it
            expected_backward = _config_of(backward_tile, "OUTER", "INNER")
        assert (forward, backward) == (expected_forward, expected_backward), (arch, dtype, head_dim)
    # The rule changes something: 3.6's defaults differ from the general ones where it says so.
    assert general[90, torch.float32, 72][0][0] != old[90, torch.float32, 72][0][0]
    assert general[80, torch.bfloat16, 72][1][0] != old[80, torch.bfloat16, 72][1][0]


def test_interpreted_launches_offer_one_configuration():
    assert launch.offer(META, [{"a": 1}, {"a": 2}], {"a": 3}) == (
        [{"a": 3}] if runtime.TRITON_INTERPRET else [{"a": 1}, {"a": 2}])


def _backward_inputs(batch, heads, device):
    q = torch.zeros(batch, 1, heads, 8, device=device)
    lse = torch.zeros(batch, heads, 1, device=device)
    return q, q, q, q, q, lse


def test_attention_backward_rejects_a_grid_beyond_cuda_limit():
    # The launcher itself, as on a GPU: it checks before allocating or launching anything.
    with runtime.simulate(runtime.TARGETS[90]):
        with pytest.raises(ValueError, match=r"^attention_backward: q must have batch \* heads at most 65535 .*, "
                                             r"got 65536 \* 1$"):
            attention_backward._attention_backward_triton(*_backward_inputs(65536, 1, META), 1.0)


@pytest.mark.skipif(runtime.kernel_path(DEVICE) == "torch", reason="the torch path has no grid to check")
def test_the_public_attention_backward_checks_its_grid():
    grad_out, q, k, v, out, lse = _backward_inputs(32769, 2, DEVICE)
    with pytest.raises(ValueError, match=r"got 32769 \* 2"):
        attention_backward.attention_backward(grad_out, q, k, v, out, lse, 1.0)
