"""Files a user hands in are data, never code: a crafted pickle given as backbone weights, as an
exported head or as a training checkpoint is refused, and its payload never runs."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from support import BACKBONE
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.cache.backbone import create_backbone_model
from pipeline.demo.data import write_digit_shards
from pipeline.head.checkpoint import CHECKPOINT_DIR, CHECKPOINT_JSON, load_checkpoint
from pipeline.head.export import HEAD_WEIGHTS, export_head, load_head
from pipeline.head.model import HeadConfig, create_head
from pipeline.head.stream import StreamConfig
from pipeline.head.train import ScheduleConfig, TrainConfig, create_optimizer


class Payload:
    """Unpickling this touches ``marker``: the proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    marker = tmp_path / "payload-ran"
    pickle.loads(pickle.dumps(Payload(marker)))  # the payload works when unpickled...
    assert marker.exists()
    marker.unlink()
    return marker  # ...and each test checks that no pvu loader unpickled it


def crafted_files(tmp_path: Path, marker: Path) -> list[Path]:
    """The payload as a torch.save zip (what a .pth is) and as a bare pickle."""
    torch.save({"state_dict": Payload(marker)}, tmp_path / "evil.pth")
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"weight": Payload(marker)}))
    return [tmp_path / "evil.pth", tmp_path / "evil.pkl"]


def test_weights_file_with_a_pickle_payload_never_runs_it(tmp_path: Path, marker: Path) -> None:
    for evil in crafted_files(tmp_path, marker):
        with pytest.raises(Exception, match=r"(?i)weights_only|unpickl|not a state dict"):
            create_backbone_model(BACKBONE, str(evil))
        assert not marker.exists(), evil.name


def test_cache_cli_refuses_pickle_weights_without_running_them(
    tmp_path: Path, marker: Path
) -> None:
    evil = crafted_files(tmp_path, marker)[0]
    write_digit_shards(str(tmp_path / "shards"), shards=1, per_shard=2, size=32)
    args = ["cache", "--shards", str(tmp_path / "shards"), "--output", str(tmp_path / "c")]
    result = CliRunner().invoke(app, [*args, "--backbone", BACKBONE, "--weights", str(evil)])
    print(result.output)
    assert result.exit_code == 2 and "evil.pth" in result.output
    assert not marker.exists()


def test_head_with_pickled_weights_never_runs_them(tmp_path: Path, marker: Path) -> None:
    head = create_head(HeadConfig(embedding_dim=8, hidden=(4,)), seed=0)
    export_head(head, str(tmp_path / "head"), backbone=BACKBONE, weights_digest="x", loss="l2")
    for evil in crafted_files(tmp_path, marker):
        (tmp_path / "head" / HEAD_WEIGHTS).write_bytes(evil.read_bytes())
        with pytest.raises(Exception, match=r"(?i)header|safetensor|deserializ"):
            load_head(str(tmp_path / "head"))
        assert not marker.exists(), evil.name


def test_checkpoint_with_pickled_tensors_never_runs_them(tmp_path: Path, marker: Path) -> None:
    config = TrainConfig(
        hidden=(4,),
        schedule=ScheduleConfig(episodes=2, episode_size=8, batch_size=4, warmup_episodes=1),
        stream=StreamConfig(seed=0),
    )
    head = create_head(HeadConfig(embedding_dim=8, hidden=(4,)), seed=0)
    optimizer = create_optimizer(head, config.schedule)
    folder = tmp_path / "run" / CHECKPOINT_DIR
    folder.mkdir(parents=True)
    for evil in crafted_files(tmp_path, marker):
        (folder / "episode-00001.safetensors").write_bytes(evil.read_bytes())
        state = {
            "episode": 1,
            "tensors": "episode-00001.safetensors",
            "stream": {},
            "param_groups": optimizer.state_dict()["param_groups"],
            "config": config.identity(),
        }
        (folder / CHECKPOINT_JSON).write_text(json.dumps(state))
        with pytest.raises(Exception, match=r"(?i)header|safetensor|deserializ"):
            run = str(tmp_path / "run")
            load_checkpoint(
                run, head=head, optimizer=optimizer, settings=config.identity(), data={}
            )
        assert not marker.exists(), evil.name
