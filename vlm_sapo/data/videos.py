"""Videos: a list of frame images or a video file, opened as safely as images and sampled the way Qwen samples them.

A row's `video` is either a list of frames (paths or bytes, each one an image and opened by `open_image`, with its
decompression-bomb guard, EXIF rotation and RGB rules) or one video file decoded with PyAV (FFmpeg). A file is checked
before any frame is decoded (a video stream, its declared frame size against `max_pixels`) and then decoded once in
full at validation, so a truncated or corrupt file fails there with the row's file, line and column, not mid-rollout.

Frames for the model (`load_video`):
- a frame list is taken as sampled at `fps` frames per second already; more than `max_frames` frames are thinned
  to `max_frames`, evenly;
- a file is sampled at `fps` (qwen-vl-utils' `smart_nframes`: at least 4 frames, at most `max_frames`, an even
  count), frames picked at evenly spaced indices as qwen-vl-utils' own readers do.
The result carries the metadata transformers and vLLM need for the temporal positions and Qwen3-VL's timestamps
(source fps, indices of the kept frames, source frame count). Resizing is the renderer's (`data.prompts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vlm_sapo.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, ImageRef, open_image

FRAME_FACTOR = 2  # Qwen-VL merges 2 frames per temporal patch; qwen-vl-utils pads to an even count
FILE_MIN_FRAMES = 4  # qwen-vl-utils' FPS_MIN_FRAMES


class VideoError(ImageError):
    """One video cannot be used; the message says why (the caller adds file, row and column)."""


@dataclass(frozen=True)
class VideoRef:
    """A not-yet-decoded video: `frames` (image refs) or `path` (a video file), with what validation measured."""

    frames: tuple[ImageRef, ...] = ()
    path: Path | None = None
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    num_frames: int = 0  # frames in the source (set by validation for files)
    source_fps: float = 0.0  # a file's frame rate (0 for a frame list: it is sampled at the recipe's fps)

    def __post_init__(self) -> None:
        if bool(self.frames) == (self.path is not None):
            raise ValueError("VideoRef needs exactly one of frames or path")

    def describe(self) -> str:
        return str(self.path) if self.path is not None else f"<{len(self.frames)} frames>"


@dataclass
class DecodedVideo:
    frames: list[Image.Image]  # 8-bit RGB, all one size
    fps: float  # frames per second of the source the indices count in
    frames_indices: list[int]  # which source frames were kept
    total_num_frames: int


def probe_video_file(path: Path, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, max_aspect_ratio: float | None = None,
                     min_side: int = 1) -> VideoRef:
    """Open `path`, check its stream and frame size (as `open_image` checks an image's), decode every frame once;
    the ref records the frame count and rate."""
    import av

    if not path.is_file():
        raise VideoError(f"video file not found: {path}")
    if path.stat().st_size == 0:
        raise VideoError(f"video file is empty (0 bytes): {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"no video stream in {path}")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > max_pixels:
                raise VideoError(f"video frames are {width}x{height} = {width * height:,} pixels, above the limit "
                                 f"of {max_pixels:,} (decompression-bomb guard); not decoded")
            if min(width, height) < min_side:
                raise VideoError(f"video frames are {width}x{height}, a side below the minimum of {min_side} pixels")
            ratio = max(width, height) / max(min(width, height), 1)
            if max_aspect_ratio is not None and ratio > max_aspect_ratio:
                raise VideoError(f"video frames are {width}x{height}, aspect ratio {ratio:.1f} above "
                                 f"{max_aspect_ratio:g} (Qwen's smart_resize rejects it)")
            count = 0
            for frame in container.decode(stream):
                if (frame.width, frame.height) != (width, height):
                    raise VideoError(f"frame {count} is {frame.width}x{frame.height}, the stream says {width}x{height}")
                count += 1
            rate = float(stream.average_rate or stream.guessed_rate or 0)
    except VideoError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as err:  # PyAV reports corrupt data as these
        raise VideoError(f"unreadable or truncated video: {type(err).__name__}: {err}") from err
    if count == 0:
        raise VideoError(f"video has no decodable frame: {path}")
    if rate <= 0:
        raise VideoError(f"video has no frame rate: {path}")
    return VideoRef(path=path, max_pixels=max_pixels, num_frames=count, source_fps=rate)


def _even_indices(total: int, count: int) -> list[int]:
    if count >= total:
        return list(range(total))
    if count == 1:
        return [0]
    return [round(i * (total - 1) / (count - 1)) for i in range(count)]


def load_video(ref: VideoRef, *, max_frames: int, fps: float) -> DecodedVideo:
    """The frames the model sees and their metadata (see the module docstring)."""
    if max_frames < 1 or fps <= 0:
        raise ValueError(f"need max_frames >= 1 and fps > 0, got {max_frames} and {fps}")
    if ref.frames:
        keep = _even_indices(len(ref.frames), max_frames)
        frames = [open_image(ref.frames[i], max_pixels=ref.max_pixels) for i in keep]
        return DecodedVideo(frames, fps, keep, len(ref.frames))
    return _sample_file(ref, max_frames=max_frames, fps=fps)


def _sample_file(ref: VideoRef, *, max_frames: int, fps: float) -> DecodedVideo:
    import av
    from qwen_vl_utils.vision_process import smart_nframes

    total = ref.num_frames
    if total < FRAME_FACTOR:
        keep = [0]
    else:
        most = max(FRAME_FACTOR, min(max_frames, total))
        ele = {"fps": fps, "min_frames": min(FILE_MIN_FRAMES, most), "max_frames": most}
        keep = _even_indices(total, smart_nframes(ele, total_frames=total, video_fps=ref.source_fps))
    wanted, frames = set(keep), []
    try:
        with av.open(str(ref.path)) as container:
            for i, frame in enumerate(container.decode(container.streams.video[0])):
                if i in wanted:
                    frames.append(frame.to_image().convert("RGB"))
                if i >= keep[-1]:
                    break
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as err:
        raise VideoError(f"unreadable video {ref.path}: {type(err).__name__}: {err}") from err
    if len(frames) != len(keep):
        raise VideoError(f"video {ref.path} gave {len(frames)} of the {len(keep)} frames sampled (changed since it "
                         "was validated?)")
    return DecodedVideo(frames, ref.source_fps, keep, total)
