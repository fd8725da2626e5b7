"""Regenerate the Fashion-MNIST sample that ships in edgemix/resources/data/ (needs dataset-fashion-mnist).

    .venv/bin/python tools/make_sample.py        # 1,000 test + 2,000 train images, stratified, seed 0
"""

from pathlib import Path

from edgemix.data import SAMPLE_DIR, load_dataset, stratified_indices
from edgemix.data.idx import FILES, write_idx

COUNTS = {"test": 1000, "train": 2000}

if __name__ == "__main__":
    SAMPLE_DIR.mkdir(parents=True, exist_ok=True)
    for split, n in COUNTS.items():
        full = load_dataset("fashion-mnist", split)
        part = full.subset(stratified_indices(full.labels, n, seed=0))
        img_name, lbl_name = FILES[split]
        write_idx(SAMPLE_DIR / f"{img_name}.gz", part.images[:, 0].numpy())
        write_idx(SAMPLE_DIR / f"{lbl_name}.gz", part.labels.numpy())
        print(f"{split}: {len(part)} images -> {Path(SAMPLE_DIR).relative_to(Path.cwd())}")
