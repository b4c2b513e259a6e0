"""Writes this folder with dpagg at commit d16c46b (ledger schema 2: one budget per exact set).

    git archive d16c46b dpagg_core | tar -x -C /tmp/old
    OUT=tests/data/ledger_v2 PYTHONPATH=/tmp/old python tests/data/ledger_v2/make_v2_ledger.py

Five 16 x 16 PNG pictures in ``images/``; the set of all five released once at epsilon 1 with a
budget of epsilon 1 (used up), and the first three released once at epsilon 0.5 with a budget
of 2 (room left). ``expected.json`` names both sets' ids and spends.
"""

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(os.environ["OUT"])
os.environ["DPAGG_DATA_DIR"] = str(OUT / "data")

from dpagg_core.io.images import load_image_folder  # noqa: E402
from dpagg_core.privacy.calibration import calibrate  # noqa: E402
from dpagg_core.privacy.ledger import Ledger  # noqa: E402

rng = np.random.default_rng(2)
(OUT / "images").mkdir(parents=True, exist_ok=True)
(OUT / "first3").mkdir(parents=True, exist_ok=True)
for i in range(5):
    pic = Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8), mode="RGB")
    pic.save(OUT / "images" / f"p{i}.png")
    if i < 3:
        pic.save(OUT / "first3" / f"p{i}.png")
ledger = Ledger(OUT / "ledger.sqlite")
full = load_image_folder(OUT / "images", 8, ledger=ledger.path)
three = load_image_folder(OUT / "first3", 8, ledger=ledger.path)
vecs = np.random.default_rng(0).normal(size=(5, 4))
args = dict(clip_norm=1.0, center=None, centre_kind="origin", mode="clip", base_model_id="tiny")
plan5 = calibrate(1.0, delta=1e-5, n=5, sampling="full")
r5 = ledger.release(vecs, dataset_id=full.dataset_id, plan=plan5, name="all5", **args)
plan3 = calibrate(0.5, delta=1e-5, n=3, sampling="full")
r3 = ledger.release(
    vecs[:3], dataset_id=three.dataset_id, plan=plan3, name="first3", budget_epsilon=2.0, **args
)
expected = {
    "all5": {"dataset_id": full.dataset_id, "spent": r5.spent_epsilon, "budget": 1.0},
    "first3": {"dataset_id": three.dataset_id, "spent": r3.spent_epsilon, "budget": 2.0},
}
(OUT / "expected.json").write_text(json.dumps(expected, indent=1))
