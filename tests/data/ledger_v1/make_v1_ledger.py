"""Writes this folder with dpagg at commit 9d699ea (ledger schema 1, salt in the data dir).

    git archive 9d699ea dpagg_core | tar -x -C /tmp/old
    OUT=tests/data/ledger_v1 PYTHONPATH=/tmp/old python tests/data/ledger_v1/make_v1_ledger.py

``expected.json`` was then corrected by hand in one place: ``request_digest`` is the key the
old ledger stored (recomputed from the JSON round-tripped plan, as this script now does).
"""

import json
import os
from pathlib import Path

import numpy as np

OUT = Path(os.environ["OUT"])
os.environ["DPAGG_DATA_DIR"] = str(OUT / "data")

from dpagg_core.accountant import calibrate  # noqa: E402
from dpagg_core.embeddings import dataset_id_for  # noqa: E402
from dpagg_core.ledger import Ledger, charge_key, request_key  # noqa: E402

ds = dataset_id_for([b"image-one", b"image-two", b"image-three"])
led = Ledger(OUT / "ledger.sqlite")
vecs = np.random.default_rng(0).normal(size=(3, 4))
plan = calibrate(1.0, delta=1e-5, n=3, sampling="full")
args = dict(
    dataset_id=ds,
    plan=plan,
    clip_norm=1.0,
    center=None,
    centre_kind="origin",
    mode="clip",
    name="v1style",
    base_model_id="tiny",
)
r = led.release(vecs, budget_epsilon=3.0, budget_delta=1e-4, **args)
digest = request_key(vecs, **{**args, "plan": type(plan)(**plan.to_dict())})
np.save(OUT / "vectors.npy", vecs)
sgd_plan = calibrate(0.5, delta=1e-6, n=3, sampling="full")
cargs = dict(dataset_id=ds, plan=sgd_plan, request={"cfg": 1}, name="v1sgd", clip_norm=1e-3)
attempts = [led.charge(**cargs).attempt, led.charge(**cargs).attempt]
expected = {
    "dataset_id": ds,
    "request_digest": digest,
    "release_id": r.release_id,
    "vector": list(r.release.vector),
    "spent_epsilon": r.spent_epsilon,
    "plan": plan.to_dict(),
    "charge_digest": charge_key(centre_kind="initializer", mode="dpsgd", base_model_id="", **cargs),
    "charge_attempts": attempts,
}
(OUT / "expected.json").write_text(json.dumps(expected, indent=1))
