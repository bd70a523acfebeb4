"""The Table 3 control's training data (``fam ablate --only control``): the task pairs plus
the image-caption pairs MAC uses, as a retrieval subset."""
from __future__ import annotations

import json
from pathlib import Path

from fam.config import DemoConfig
from fam.data.types import IMAGE_PLACEHOLDER

__all__ = ["CAPTION_SUBSET", "caption_pairs_train_dir"]

#: Name of the caption subset the control adds to the task pairs.
CAPTION_SUBSET = "Scenes-Captions"


def caption_pairs_train_dir(data: str | Path, plan: DemoConfig) -> Path:
    """``<data>/train_captions``: the task subsets plus MAC's image-caption pairs as a
    retrieval subset (the Table 3 control's training data).

    The pairs are exactly MAC's (:func:`fam.data.captions.load_captions` on
    ``captions.json``, the caption field MAC reads) with MAC's prompts: query = the image
    after ``align.image_instruction``, positive = the caption after
    ``align.text_instruction``. Written once (atomically); the task subsets are linked.
    """
    import shutil

    from fam.data.captions import load_captions

    data = Path(data)
    out = data / "train_captions"
    if (out / f"{CAPTION_SUBSET}.jsonl").exists():
        return out
    tmp = data / "train_captions.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in sorted((data / "train").iterdir()):
        (tmp / f.name).symlink_to(f.resolve())
    mac = plan.align
    lines = []
    for c in load_captions(data / "captions.json", data):
        rel = Path(c.image).resolve().relative_to(data.resolve())
        lines.append(json.dumps({"qry": f"{IMAGE_PLACEHOLDER}\n{mac.image_instruction}",
                                 "qry_image_path": str(rel),
                                 "pos_text": mac.text_instruction + c.target,
                                 "pos_image_path": ""}))
    (tmp / f"{CAPTION_SUBSET}.jsonl").write_text("\n".join(lines) + "\n")
    tmp.rename(out)
    return out
