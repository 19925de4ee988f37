"""Writing the synthetic splits as the project's rows: `<out>/<family>/<split>.jsonl` plus PNGs beside them.

Each family draws from its own seeded stream, and a scene whose key (content up to pixel jitter, and question) was
already drawn is drawn again, so the test, validation and train splits never share a scene. The same seed gives the
same files, byte for byte.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

from vlm_sapo.synthetic.tasks import FAMILIES, GENERATORS, VIDEO_GENERATORS, SyntheticConfig, SyntheticItem

SPLITS = ("train", "val", "test")
MAX_DUPLICATES_IN_A_ROW = 2000  # this many repeats in a row: the scene space is (nearly) exhausted


def generate_split_items(family: str, counts: dict[str, int], *, seed: int = 0,
                         config: SyntheticConfig | None = None) -> dict[str, list[SyntheticItem]]:
    """`counts[split]` distinct scenes per split, test first, then val, then train (so growing the train split never
    changes the test split)."""
    if family not in GENERATORS and family not in VIDEO_GENERATORS:
        known = ", ".join([*FAMILIES, *VIDEO_GENERATORS])
        raise ValueError(f"unknown synthetic family {family!r} (known: {known})")
    cfg = config or SyntheticConfig()
    rng = random.Random(f"vlm_sapo-synthetic-{family}-{seed}")
    seen: set[tuple] = set()
    out: dict[str, list[SyntheticItem]] = {}
    for split in ("test", "val", "train"):
        items: list[SyntheticItem] = []
        repeats = 0
        while len(items) < counts.get(split, 0):
            if family in VIDEO_GENERATORS:
                item = VIDEO_GENERATORS[family](rng, cfg, len(items))
            else:
                item = GENERATORS[family](rng, cfg)
            if item.key in seen:
                repeats += 1
                if repeats >= MAX_DUPLICATES_IN_A_ROW:
                    raise ValueError(f"{family}: only {len(seen)} distinct scenes found for {sum(counts.values())} "
                                     f"rows; ask for fewer rows or a larger grid/more colours")
                continue
            repeats = 0
            seen.add(item.key)
            items.append(item)
        out[split] = items
    return out


def make_synthetic_data(out_dir: str | Path, *, seed: int = 0, n_train: int = 1000, n_val: int = 64,
                        n_test: int = 200, families: tuple[str, ...] = FAMILIES,
                        config: SyntheticConfig | None = None) -> dict[str, dict[str, Path]]:
    """Write every family's splits; returns {family: {split: jsonl path}}. Rows: id, image (relative path; a video
    family: video, the list of its frames' paths), question, answer, and meta columns (question_kind, ...; grounding
    adds phrase, image_width, image_height; motion start, step, frames)."""
    cfg = config or SyntheticConfig()
    out = Path(out_dir)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    paths: dict[str, dict[str, Path]] = {}
    for family in families:
        split_items = generate_split_items(family, counts, seed=seed, config=cfg)
        fam_dir = out / family
        paths[family] = {}
        for split in SPLITS:
            img_dir = fam_dir / "images" / split
            img_dir.mkdir(parents=True, exist_ok=True)
            lines = []
            for i, item in enumerate(split_items[split]):
                row_id = f"{family}-{split}-{i:05d}"
                row = {"id": row_id, "question": item.question, "answer": item.answer, **item.meta}
                if item.frames:  # a video: its frames as PNGs, listed in order
                    row["video"] = [f"images/{split}/{row_id}-{k}.png" for k in range(len(item.frames))]
                    for rel, frame in zip(row["video"], item.frames):
                        frame.save(fam_dir / rel, format="PNG", optimize=False)
                else:
                    row["image"] = f"images/{split}/{row_id}.png"
                    item.image.save(fam_dir / row["image"], format="PNG", optimize=False)
                if cfg.instruction:
                    row["instruction"] = cfg.instruction
                lines.append(json.dumps(row, sort_keys=True))
            path = fam_dir / f"{split}.jsonl"
            path.write_text("".join(f"{line}\n" for line in lines))
            paths[family][split] = path
    manifest = {"seed": seed, "counts": counts, "families": list(families), "config": asdict(cfg)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return paths
