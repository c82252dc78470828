"""Training from memory-mapped shards holds no copy of the data set: a process's anonymous memory (RssAnon: what
it owns, not the page cache that a memory map's file pages are) after start and after N steps stays within a fixed
bound whatever the set's size, while the loader before issue 18 (every shard concatenated in float32) grows with it.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fastdit.train import shards

SAMPLES, SHARD_SIZE, SHAPE = 200_000, 25_000, (4, 4, 4)  # fp16: 128 bytes per latent, 51 MB with the flips
STEPS, BATCH = 30, 256
# The bounds, in MB of RssAnon. Start: what building the trainer adds whatever the data (its imports, the tiny
# model and optimizer, the diffusion's tables; 69 MB measured with 20,000 and with 200,000 samples alike). Steps:
# the first steps' allocations (the optimizer's moments, autograd's buffers, the epoch order of 8 bytes a sample:
# 1.6 MB here; 11 MB measured), then nothing more per step. The old loader's float32 copy alone is
# 2 x 200,000 x 64 x 4 B = 98 MB.
START_MB, STEPS_MB, LATER_STEPS_MB = 80, 16, 2

# argv: mode ("disk" or "memory"), the shard folder. Prints RssAnon in MB before, after start, after the steps.
SCRIPT_TEMPLATE = """
import json, sys
import torch
from fastdit import distributed
from fastdit.train.trainer import TrainConfig, Trainer

def rss_anon_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:")) / 1024

mode, folder = sys.argv[1], sys.argv[2]
model = dict(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10,
             class_dropout_prob=0.1, learn_sigma=True)
config = TrainConfig(out="run", model=None, model_config=model, data=folder, global_batch_size={batch}, steps={steps},
                     precision="fp32", workers=0, lr=1e-3)
process = distributed.Process(0, 1, 0, torch.device("cpu"), None)
before = rss_anon_mb()
if mode == "memory":  # the loader before issue 18: every shard read whole, concatenated, held as float32
    from fastdit.train.data import TensorData
    from fastdit.train.shards import LatentShards
    shards = LatentShards(folder)
    parts = [shards.gather(range(start, start + count)) for start, count in zip(shards.offsets, shards.counts)]
    whole = {{name: torch.cat([torch.from_numpy(part[name]) for part in parts]) for name in parts[0]}}
    del parts
    data = TensorData(whole["latents"], whole["labels"], shards.num_classes, "old loader", whole["flipped"])
    import fastdit.train.trainer as trainer_module
    trainer_module.load_data = lambda config, rank=0, world_size=1: data
trainer = Trainer(config, process)
started = rss_anon_mb()
for _ in range({first}):
    trainer.train_step()
stepped = rss_anon_mb()
for _ in range({second}):
    trainer.train_step()
print(json.dumps({{"before": before, "started": started, "stepped": stepped, "stepped_twice": rss_anon_mb(),
                   "samples": len(trainer.data)}}))
"""
SCRIPT = SCRIPT_TEMPLATE.format(batch=BATCH, steps=3 * STEPS, first=STEPS, second=STEPS)


def write_set(directory, samples):
    rng = np.random.default_rng(0)
    records = []
    for index, start in enumerate(range(0, samples, SHARD_SIZE)):
        count = min(SHARD_SIZE, samples - start)
        arrays = {"latents": rng.standard_normal((count, *SHAPE), np.float32),
                  "flipped": rng.standard_normal((count, *SHAPE), np.float32), "labels": rng.integers(0, 10, count)}
        records.append(shards.write_shard(directory, index, arrays, "fp16", {"latent_dtype": "fp16"}))
    shards.write_manifest(directory, records, 10, {"latent_dtype": "fp16"})


def measure(mode, folder, cwd):
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(folder)], cwd=cwd, capture_output=True, text=True,
                            check=False, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # about 30 s: three processes importing torch and training 60 steps each
def test_memory_stays_bounded_whatever_the_sets_size(tmp_path):
    small, large = tmp_path / "small", tmp_path / "large"
    os.makedirs(small), os.makedirs(large)
    write_set(small, SAMPLES // 10)
    write_set(large, SAMPLES)
    disk = {name: measure("disk", folder, tmp_path) for name, folder in (("small", small), ("large", large))}
    old = measure("memory", large, tmp_path)
    print(json.dumps({"disk": disk, "old": old}))
    for run in disk.values():
        assert run["started"] - run["before"] < START_MB, disk
        assert run["stepped"] - run["started"] < STEPS_MB, disk
        assert run["stepped_twice"] - run["stepped"] < LATER_STEPS_MB, disk
    # Ten times the samples: no more than the epoch order's 8 bytes a sample (1.4 MB) and 2 MB of slack.
    growth = {name: run["stepped_twice"] - run["before"] for name, run in disk.items()}
    assert growth["large"] - growth["small"] < 2 + 8 * SAMPLES * 0.9 / 2**20, growth
    assert old["samples"] == disk["large"]["samples"] == SAMPLES
    assert old["started"] - disk["large"]["started"] > 2 * SAMPLES * 64 * 4 / 2**20, (old, disk)
