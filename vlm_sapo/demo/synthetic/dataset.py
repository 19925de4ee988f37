"""Writing the synthetic splits as the project's rows: `<out>/<family>/<split>.jsonl` plus PNGs beside them.

Each family draws from its own seeded stream, and a scene whose key (content up to pixel jitter, and question) was
already drawn is drawn again, so the test, validation and train splits never share a scene. Answers are balanced: each
split holds every answer of the family's answer set (`answer_classes`) equally often (within one row), in a shuffled
order, so no constant answer scores more than one over the number of answers. The same seed gives the same files,
byte for byte.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

from vlm_sapo.data.sample import IMAGE_PLACEHOLDER
from vlm_sapo.demo.synthetic.tasks import (
    FAMILIES,
    GENERATORS,
    VIDEO_GENERATORS,
    SyntheticConfig,
    SyntheticItem,
    answer_classes,
)
from vlm_sapo.tasks.answers import answer_key

SPLITS = ("train", "val", "test")
MAX_MISSES = 20_000  # this many draws without a new scene of the wanted answer: the space is (nearly) exhausted


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
    classes = answer_classes(family, cfg)
    for split in ("test", "val", "train"):
        n = counts.get(split, 0)
        wanted: list[str | None] = [None] * n
        if classes:
            wanted = [classes[i % len(classes)] for i in range(n)]
            rng.shuffle(wanted)
        items: list[SyntheticItem] = []
        for want in wanted:
            misses = 0
            while True:
                item = (VIDEO_GENERATORS[family](rng, cfg, len(items)) if family in VIDEO_GENERATORS
                        else GENERATORS[family](rng, cfg))
                if item.key not in seen and (want is None or answer_key(item.answer) == want):
                    break
                misses += 1
                if misses >= MAX_MISSES:
                    raise ValueError(f"{family}: no new scene with answer {want} in {MAX_MISSES} draws after "
                                     f"{len(seen)} distinct scenes for {sum(counts.values())} rows; ask for fewer rows "
                                     "or a larger grid/more colours")
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
                question = item.question
                if family in cfg.question_first and not item.frames:
                    question = f"{question} {IMAGE_PLACEHOLDER}"
                row = {"id": row_id, "question": question, "answer": item.answer, **item.meta}
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
