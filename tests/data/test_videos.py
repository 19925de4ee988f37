"""Video rows: frame lists and video files (PyAV), validated up front like images (file, line, column), sampled as
Qwen samples them, and rendered once into frames, sizes and token counts that the processor agrees with."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_sapo.data import DataError, VideoRef, load_samples, load_video, prompt_model_inputs, render_prompt
from vlm_sapo.data.prompts import PromptTooLongError, video_budget

BLOCK = 12  # the moving red block's side, pixels


def frame(x: int, size=(56, 56)) -> Image.Image:
    """White frame with a red block whose left edge is at `x` (tells the frames apart by content)."""
    a = np.full((size[1], size[0], 3), 255, np.uint8)
    a[20:20 + BLOCK, x:x + BLOCK] = (220, 40, 40)
    return Image.fromarray(a)


def block_x(img: Image.Image) -> float:
    """Centroid column of the red pixels, minus half the block: the `x` the frame was drawn with (within a pixel)."""
    a = np.asarray(img.convert("RGB")).astype(int)
    red = (a[..., 0] > 150) & (a[..., 1] < 110) & (a[..., 2] < 110)
    return float(np.nonzero(red)[1].mean()) - (BLOCK - 1) / 2


def write_frames(folder: Path, xs: list[int], size=(56, 56)) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for k, x in enumerate(xs):
        frame(x, size).save(folder / f"f{k}.png")
        names.append(f"{folder.name}/f{k}.png")
    return names


def write_mp4(path: Path, n: int, fps: int = 4) -> Path:
    """n frames, the block moving 4 pixels a frame (x = 4 k), mpeg4 (lossy: positions read back within a pixel)."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 56, 56, "yuv420p"
        for k in range(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame(4 * k)), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def rows_file(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_frame_list_and_file_rows_load_and_sample(tmp_path: Path) -> None:
    names = write_frames(tmp_path / "clip", [0, 8, 16, 24, 32, 40])
    write_mp4(tmp_path / "clip.mp4", 8)
    path = rows_file(tmp_path, [
        {"id": "frames", "video": names, "question": "Which way?", "answer": "right"},
        {"id": "file", "video": "clip.mp4", "question": "Which way?", "answer": "right", "level": 2},
        {"id": "both", "image": names[0], "video": names[:2], "question": "Same?", "answer": "yes"},
    ])
    res = load_samples(path, task="motion")
    frames, file, both = res.samples
    assert frames.images == [] and len(frames.video.frames) == 6 and frames.video.num_frames == 6
    assert file.video.path == tmp_path / "clip.mp4" and file.video.num_frames == 8 and file.video.source_fps == 4.0
    assert file.meta == {"level": 2} and len(both.images) == 1 and len(both.video.frames) == 2

    # a frame list is taken as it is, thinned evenly to max_frames: 6 frames -> indices 0, 2, 3, 5 of 0..5
    thin = load_video(frames.video, max_frames=4, fps=2.0)
    assert thin.frames_indices == [0, 2, 3, 5] and thin.total_num_frames == 6 and thin.fps == 2.0
    assert [round(block_x(f)) for f in thin.frames] == [0, 16, 24, 40]
    assert load_video(frames.video, max_frames=16, fps=2.0).frames_indices == list(range(6))
    # a file is sampled at fps (qwen-vl-utils' smart_nframes): 8 frames at 4 fps is 2 s, 2 fps -> 4 frames
    sampled = load_video(file.video, max_frames=16, fps=2.0)
    assert sampled.frames_indices == [0, 2, 5, 7] and sampled.fps == 4.0 and sampled.total_num_frames == 8
    assert [block_x(f) for f in sampled.frames] == pytest.approx([0, 8, 20, 28], abs=1.0)
    assert load_video(file.video, max_frames=2, fps=2.0).frames_indices == [0, 7]


BAD = [
    ({"video": ["clip/f0.png", "clip/nope.png"]}, "video[1]", "image file not found"),
    ({"video": ["clip/f0.png", "small/f0.png"]}, "video[1]", "frame 1 is 40x40, frame 0 is 56x56"),
    ({"video": []}, "video", "video frame list is empty"),
    ({"video": "missing.mp4"}, "video", "video file not found"),
    ({"video": "junk.mp4"}, "video", "unreadable or truncated video"),
    ({"video": "empty.mp4"}, "video", "video file is empty"),
    ({"video": "../outside.mp4"}, "video", "escapes the data folder"),
    ({"video": 7}, "video", "video must be a file path or a list of frames, got int"),
    ({"video": "data:image/png;base64,AAAA"}, "video", "not inline data"),
    ({}, "image", "missing required field 'images' (or 'image', or 'video')"),
]


def test_bad_videos_name_file_line_and_column(tmp_path: Path) -> None:
    write_frames(tmp_path / "clip", [0])
    write_frames(tmp_path / "small", [0], size=(40, 40))
    (tmp_path / "junk.mp4").write_bytes(b"\x00\x01not a video" * 50)
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path.parent / "outside.mp4").write_bytes(b"x")
    rows = [{"id": f"r{i}", "question": "q", "answer": "a", **extra} for i, (extra, _, _) in enumerate(BAD)]
    path = rows_file(tmp_path, rows)
    with pytest.raises(DataError) as err:
        load_samples(path, task="motion")
    bad = err.value.bad_rows
    assert [(b.row, b.column) for b in bad] == [(i + 1, col) for i, (_, col, _) in enumerate(BAD)]
    for b, (_, _, problem) in zip(bad, BAD):
        assert problem in b.problem, (b, problem)
        assert str(b).startswith(f"{path} line {b.row}, column '{b.column}': ")
    skipped = load_samples(rows_file(tmp_path, [*rows, {"id": "ok", "question": "q", "answer": "a",
                                                        "video": ["clip/f0.png"]}]), task="motion", on_bad_row="skip")
    assert [s.id for s in skipped.samples] == ["ok"] and len(skipped.skipped) == len(BAD)


def test_oversized_video_frames_are_refused_before_decoding(tmp_path: Path) -> None:
    write_mp4(tmp_path / "clip.mp4", 2)
    names = write_frames(tmp_path / "clip", [0])
    path = rows_file(tmp_path, [{"id": "a", "video": "clip.mp4", "question": "q", "answer": "a"},
                                {"id": "b", "video": names, "question": "q", "answer": "a"}])
    with pytest.raises(DataError) as err:
        load_samples(path, task="motion", max_image_pixels=1000)
    assert [b.column for b in err.value.bad_rows] == ["video", "video[0]"]
    assert "decompression-bomb guard" in err.value.bad_rows[0].problem


@pytest.fixture(scope="module", params=["tiny_qwen25_dir", "tiny_qwen3_dir"])
def processor(request):
    from vlm_sapo.models.loading import load_processor

    patch = 16 if "qwen3" in request.param else 14
    f = 2 * patch
    return load_processor(request.getfixturevalue(request.param), video_min_pixels=f * f,
                          video_max_pixels=6 * f * f, video_max_frames=4, video_fps=2.0), patch


def test_rendered_video_is_sampled_padded_resized_once_and_counted_by_the_processor(tmp_path: Path,
                                                                                   processor) -> None:
    proc, patch = processor
    f = 2 * patch
    assert video_budget(proc).max_frames == 4 and video_budget(proc).max_pixels == 6 * f * f
    names = write_frames(tmp_path / "clip", [0, 8, 16], size=(90, 50))  # 3 frames: padded to 4
    sample = load_samples(rows_file(tmp_path, [{"id": "v", "video": names, "question": "Which way?",
                                                "answer": "right"}]), task="motion").samples[0]
    p = render_prompt(proc, sample, instruction="One word.", min_pixels=f * f, max_pixels=4 * f * f,
                      image_patch_size=patch, max_prompt_tokens=None)
    (video,) = p.videos
    # smart_resize of 90 x 50 into [f^2, 6 f^2] pixels: the same rule the images follow, once, for every frame
    from qwen_vl_utils.vision_process import smart_resize

    h, w = smart_resize(50, 90, factor=f, min_pixels=f * f, max_pixels=6 * f * f)
    assert video.frames.shape == (4, 3, h, w) and video.frames.dtype.is_floating_point is False
    assert video.frames_indices == [0, 1, 2, 2] and video.total_num_frames == 3  # the last frame repeated
    assert bool((video.frames[3] == video.frames[2]).all())
    assert video.metadata()["fps"] == 2.0 and p.images == [] and p.model_input_sizes == []
    # the aspect ratio survives (qwen-vl-utils' fetch_video would squash a frame list into a square first)
    assert abs(w / h - 90 / 50) < 0.5
    inputs = prompt_model_inputs(proc, p)
    assert int(inputs["input_ids"].shape[-1]) == p.num_prompt_tokens
    n_video = int((inputs["input_ids"] == proc.tokenizer.convert_tokens_to_ids("<|video_pad|>")).sum())
    assert n_video == (4 // 2) * (h // f) * (w // f)
    assert inputs["video_grid_thw"].tolist() == [[2, h // patch, w // patch]]
    # video tokens are never truncated: too long means dropped
    with pytest.raises(PromptTooLongError, match="and a video"):
        render_prompt(proc, sample, instruction="One word.", min_pixels=f * f, max_pixels=4 * f * f,
                      image_patch_size=patch, max_prompt_tokens=p.num_prompt_tokens - 1)


def test_video_ref_needs_exactly_one_source() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        VideoRef()
    assert math.isclose(0.0, VideoRef(path=Path("x.mp4")).source_fps)
