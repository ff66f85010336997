import json

import pytest
import torch

from sp_grpo.data.video import VideoDecodeError, VideoFolder, load_prompts, prompt_from_name, read_video, write_video


def _blocks(t=6, h=32, w=48):
    """Frames of flat colour blocks (robust to yuv420 chroma subsampling), brightness rising with t."""
    video = torch.zeros(t, 3, h, w)
    for i in range(t):
        video[i, 0, :, : w // 2] = 0.2 + 0.05 * i
        video[i, 2, :, w // 2 :] = 0.8 - 0.05 * i
        video[i, 1] = 0.3
    return video


def test_write_with_pyav_read_with_decord(tmp_path):
    video = _blocks()
    path = write_video(tmp_path / "clip.mp4", video, fps=8)
    frames = read_video(path)
    assert frames.shape == video.shape and frames.dtype == torch.float32
    # Lossy H.264 + yuv420: flat blocks come back within a few grey levels away from block edges.
    inner = (slice(None), slice(None), slice(4, -4), slice(4, 20))
    assert (frames[inner] - video[inner]).abs().max() < 0.03
    assert frames.min() >= 0 and frames.max() <= 1


def test_read_video_subsampling_and_resizing(tmp_path):
    video = _blocks(t=10)
    path = write_video(tmp_path / "clip.mp4", video)
    picked = read_video(path, num_frames=4)  # frames 0, 3, 6, 9
    assert picked.shape[0] == 4
    red = picked[:, 0, 16, 8]
    expected = torch.tensor([0.2 + 0.05 * i for i in (0, 3, 6, 9)])
    assert (red - expected).abs().max() < 0.03
    assert read_video(path, stride=3).shape[0] == 4
    assert read_video(path, size=(16, 24)).shape == (10, 3, 16, 24)
    assert read_video(path, num_frames=50).shape[0] == 10


def test_odd_sizes_are_padded_and_odd_widths_read_back(tmp_path):
    path = write_video(tmp_path / "odd.mp4", torch.rand(3, 3, 15, 23))
    assert read_video(path).shape == (3, 3, 16, 24)


def test_read_video_errors(tmp_path):
    corrupt = tmp_path / "broken.mp4"
    corrupt.write_bytes(b"not a video" * 50)
    with pytest.raises(VideoDecodeError, match="cannot decode video '.*broken.mp4'"):
        read_video(corrupt)
    with pytest.raises(FileNotFoundError, match="no such video file: '.*missing.mp4'"):
        read_video(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match="set `num_frames` \\(2\\) or `stride` \\(2\\), not both"):
        read_video(corrupt, num_frames=2, stride=2)
    with pytest.raises(ValueError, match="`stride` \\(0\\) must be a positive integer"):
        read_video(corrupt, stride=0)
    with pytest.raises(ValueError, match="must have shape \\(T, 3, H, W\\) with T >= 1, got \\(3, 8, 8\\)"):
        write_video(tmp_path / "x.mp4", torch.rand(3, 8, 8))


def test_prompt_from_name():
    assert prompt_from_name("a cat-0.mp4") == "a cat"
    assert prompt_from_name("dir/a-b cat-12.mp4") == "a-b cat"
    assert prompt_from_name("sunset.mp4") == "sunset"


def test_load_prompts_formats(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"sub/a.mp4": "x"}))
    assert load_prompts(tmp_path / "p.json") == {"a.mp4": "x"}
    (tmp_path / "p.csv").write_text('video,prompt\na.mp4,"red, then blue"\n')
    assert load_prompts(tmp_path / "p.csv") == {"a.mp4": "red, then blue"}
    (tmp_path / "p.tsv").write_text("name\ttext\na.mp4\tx\n")
    with pytest.raises(ValueError, match="needs the header columns 'video' and 'prompt', got \\['name', 'text'\\]"):
        load_prompts(tmp_path / "p.tsv")
    with pytest.raises(ValueError, match="unknown prompt file format '.txt'"):
        load_prompts(tmp_path / "p.txt")


def test_video_folder(tmp_path):
    for name in ("b dog-0.mp4", "a red cat-1.mp4"):
        write_video(tmp_path / name, _blocks(t=4, h=16, w=16))
    (tmp_path / "notes.txt").write_text("ignored")
    folder = VideoFolder(tmp_path, num_frames=2)
    assert len(folder) == 2 and folder.prompts == ["a red cat", "b dog"]
    item = folder[0]
    assert item["video"].shape == (2, 3, 16, 16) and item["prompt"] == "a red cat"
    assert VideoFolder(tmp_path, prompts={"a red cat-1.mp4": "x", "b dog-0.mp4": "y"}).prompts == ["x", "y"]
    with pytest.raises(KeyError, match="no prompt for 1 videos, e.g. \\['b dog-0.mp4'\\]"):
        VideoFolder(tmp_path, prompts={"a red cat-1.mp4": "x"})
    with pytest.raises(FileNotFoundError, match="no videos"):
        VideoFolder(_empty(tmp_path))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        VideoFolder(tmp_path / "nope")


def _empty(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    return empty
