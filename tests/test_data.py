"""divot.data: caption-list datasets that survive corrupt videos."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from divot.data import VideoTextDataset, collate_videos
from divot.video_io import write_video


def _video(k: int, n: int = 24) -> np.ndarray:
    """(n, 32, 48, 3): frame t has brightness 8 t + k, plus a coloured bar."""
    frames = np.zeros((n, 32, 48, 3), np.uint8)
    for t in range(n):
        frames[t] = 8 * t + k
        frames[t, 4:10, 2 * t : 2 * t + 6] = (200, 40, 40)
    return frames


@pytest.fixture()
def caption_list(tmp_path):
    root = tmp_path / "videos"
    lines = []
    for k in range(3):
        write_video(root / f"good{k}.mp4", _video(k))
        lines.append({"video": f"good{k}.mp4", "caption": f"video number {k}"})
    (root / "broken.mp4").write_bytes(np.random.default_rng(1).bytes(2048))
    lines.append({"video": str(root / "broken.mp4"), "caption": "broken"})  # absolute path
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return jsonl, root


def test_items_and_corrupt_marker(caption_list, caplog):
    jsonl, root = caption_list
    ds = VideoTextDataset(jsonl, video_root=root, size=32)
    assert len(ds) == 4
    item = ds[1]
    assert item["video"].shape == (16, 3, 32, 32) and item["video"].dtype == torch.float32
    assert -1 <= item["video"].min() and item["video"].max() <= 1
    assert item["caption"] == "video number 1" and item["path"].endswith("good1.mp4")
    with caplog.at_level(logging.WARNING, logger="divot.data"):
        bad = ds[3]
    assert bad == {"corrupt": str(root / "broken.mp4")}
    assert "broken.mp4" in caplog.text


def test_collate_drops_and_counts(caption_list):
    jsonl, root = caption_list
    ds = VideoTextDataset(jsonl, video_root=root, size=32)
    batch = collate_videos([ds[i] for i in range(4)])
    assert batch["video"].shape == (3, 16, 3, 32, 32)
    assert batch["caption"] == [f"video number {k}" for k in range(3)]
    assert batch["num_corrupt"] == 1 and batch["corrupt_paths"][0].endswith("broken.mp4")
    empty = collate_videos([{"corrupt": "a.mp4"}, {"corrupt": "b.mp4"}])
    assert empty["video"] is None and empty["num_corrupt"] == 2 and empty["caption"] == []


def test_dataloader_batch(caption_list):
    jsonl, root = caption_list
    ds = VideoTextDataset(jsonl, video_root=root, size=32)
    batches = list(DataLoader(ds, batch_size=4, collate_fn=collate_videos))
    assert len(batches) == 1
    assert batches[0]["video"].shape[0] == 3 and batches[0]["num_corrupt"] == 1


def test_random_start_is_deterministic(tmp_path):
    write_video(tmp_path / "long.mp4", _video(0, n=30) , fps=8)  # 3.75 s
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text(json.dumps({"video": "long.mp4", "caption": "c"}) + "\n")
    ds = VideoTextDataset(jsonl, size=32, random_start=True, seed=3)
    starts = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        a, b = ds[0]["video"], ds[0]["video"]
        assert torch.equal(a, b)
        # brightness of the dark corner encodes the first frame's index
        first = round(((a[0, 0, -1, -1].item() + 1) * 127.5) / 8)
        assert 0 <= first <= 30 - 16
        starts.append(first)
    assert len(set(starts)) > 1
    fixed = VideoTextDataset(jsonl, size=32)
    assert round(((fixed[0]["video"][0, 0, -1, -1].item() + 1) * 127.5) / 8) == 0


def test_jsonl_validation(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        VideoTextDataset(tmp_path / "nothere.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"video": "a.mp4", "caption": "x"}\n{not json\n')
    with pytest.raises(ValueError, match="line 2"):
        VideoTextDataset(bad)
    bad.write_text('{"video": "a.mp4", "caption": "x"}\n\n{"video": "b.mp4"}\n')
    with pytest.raises(ValueError, match="line 3.*caption"):
        VideoTextDataset(bad)
    bad.write_text("\n")
    with pytest.raises(ValueError, match="no entries"):
        VideoTextDataset(bad)
