"""The one record every task, engine and evaluator reads: a `Sample`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from vlm_sapo.data.images import ImageRef, to_rgb
from vlm_sapo.data.videos import DecodedVideo, VideoRef, load_video

IMAGE_PLACEHOLDER = "<image>"  # in a question: where an image stands (see `vlm_sapo.data.prompts.user_content`)


@dataclass
class Sample:
    """One question about one or more images and/or one video.

    `images` holds `ImageRef`s (lazy: decoded by `load_images()` when a prompt is rendered, so a large dataset is
    not held decoded in memory; the loader has already fully decoded each one once to validate it) or PIL images
    given directly. `meta` keeps every source column that is not a project field (e.g. geometry3k `choices`,
    coco `image_width`). `video` (a `VideoRef`) is decoded and sampled by `load_video()` at rendering.
    """

    id: str
    task: str
    images: list[ImageRef | Image.Image]
    question: str
    answer: Any
    meta: dict[str, Any] = field(default_factory=dict)
    video: VideoRef | None = None

    def load_video(self, *, max_frames: int, fps: float) -> DecodedVideo | None:
        """The video's frames for the model (see `vlm_sapo.data.videos.load_video`), or None without a video."""
        return None if self.video is None else load_video(self.video, max_frames=max_frames, fps=fps)

    def load_images(self) -> list[Image.Image]:
        """The images as 8-bit RGB PIL images, converted by the same rules whether they were refs or PIL images."""
        return [im.load() if isinstance(im, ImageRef) else to_rgb(im) for im in self.images]
