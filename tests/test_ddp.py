"""DDP fine-tuning with gloo on CPU: 2 processes, tiny data.

Two processes with 1 clip per step must end with identical weights, and those weights must equal
a single process taking 2 clips per step: DistributedSampler gives rank r the clips r, r+2, ...
of the same shuffled order, DDP averages the two ranks' gradients, and the loss is a mean over the
batch, so both runs take the same steps.
"""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from finetune_data import make_tiny_faces_store, write_standin_vgg16
from emotion_attention.pipeline.configs import FinetuneConfig
from emotion_attention.pipeline.stages.finetune import finetune


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(weights, batch_clips):
    return FinetuneConfig(weights=str(weights), recipe="paper", epochs=1, frames_per_clip=4, batch_clips=batch_clips,
                          crop=32, sgdr_t0=100, precision="fp32", workers=0, heads_hidden=16)


def _rank_main(rank, world, port, faces, weights, run_dir, out_dir):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    result = finetune(faces, run_dir, _cfg(weights, batch_clips=1), log=lambda *a: None)
    torch.save({"state": result.model.state_dict(), "history": result.history,
                "env": (result.env.rank, result.env.world_size)}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_gloo_ranks_agree_with_each_other_and_with_one_process(tmp_path):
    faces = make_tiny_faces_store(tmp_path / "faces.h5", clips_per_class=2)  # 6 clips: 3 per rank
    weights = write_standin_vgg16(tmp_path / "vgg16.pth")
    mp.spawn(_rank_main, args=(2, _free_port(), str(faces), str(weights), str(tmp_path / "ddp"),
                               str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["env"] for r in ranks] == [(0, 2), (1, 2)]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    assert (tmp_path / "ddp" / "checkpoint.pt").exists()            # rank 0 wrote it

    torch.set_num_threads(1)
    single = finetune(faces, tmp_path / "single", _cfg(weights, batch_clips=2), log=lambda *a: None)
    reference = single.model.state_dict()
    for key, value in ranks[0]["state"].items():
        torch.testing.assert_close(value, reference[key], rtol=1e-4, atol=1e-6, msg=key)
    start = torch.load(weights)
    moved = (reference["trunk.28.weight"] - start["features.28.weight"]).abs().max()
    assert moved > 0                                                  # the steps really changed weights
    assert ranks[0]["history"][0]["loss"] == pytest.approx(single.history[0]["loss"], rel=1e-5)
    assert ranks[0]["history"][0]["train_acc"] == single.history[0]["train_acc"]
