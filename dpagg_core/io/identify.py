"""One identity step for private and public pictures, in every front end (folders, in-memory
images, ComfyUI tensors): keyed ids under a ledger's key, registration of a private set's
pictures with the ledger (so every release is charged to each, docs/privacy.md invariant 9),
refusal of private pictures as PUBLIC inputs (invariant 8), near-copy warnings. Split from
``images`` (decode and loading) by job."""

from __future__ import annotations

import os
from collections.abc import Sequence

from dpagg_core.errors import DpaggError
from dpagg_core.privacy.identity import dataset_id_for, image_ids_for, look_id_for
from dpagg_core.privacy.ledger import Ledger


def _some(names: list[str]) -> str:
    return f"{', '.join(names[:10])}{' ...' if len(names) > 10 else ''}"


def identify_pictures(
    digests: Sequence[bytes],
    looks: Sequence[bytes],
    *,
    ledger: Ledger | str | os.PathLike[str] | None,
    names: Sequence[str],
    public: bool = False,
    legacy_digests: Sequence[bytes | None] = (),
) -> tuple[str, list[str]]:
    """(dataset id, warnings) of pictures given by their ``pixel_digest`` and ``look_of``, under
    the identity key of ``ledger`` (a Ledger, a path, or None: the default ledger). The one
    identity step of every front end (folders, in-memory images, ComfyUI tensors).

    Private pictures (``public=False``) are registered with the ledger as the set's pictures
    (keyed ids only: ``Ledger.register_set``), so every release of the set is charged to each of
    them (invariant 9); a picture new to the ledger that looks like one already charged (same
    keyed perceptual hash: a resized or re-encoded copy) gets a warning naming it.

    Public pictures (``public=True``: a basis, a public-mean centre, a clip-norm suggestion) are
    NOT registered; any picture the ledger knows as private is refused with an error naming it,
    and one that looks like a private picture gets a warning (invariant 8)."""
    led = ledger if isinstance(ledger, Ledger) else Ledger(ledger)
    key = led.identity_key()
    dataset_id = dataset_id_for(digests, key=key)
    ids = image_ids_for(digests, key=key)
    look_ids = [look_id_for(lk, key=key) for lk in looks]
    warns: list[str] = []
    if public:
        hits = led.private_pictures(ids)
        if hits:
            raise DpaggError(
                f"{len(hits)} of these PUBLIC pictures are recorded as PRIVATE in the privacy "
                f"ledger {led.path}: {_some([names[i] for i in hits])}. A public basis, centre "
                "or clip norm built from private pictures would make the release depend on them "
                "without noise (docs/privacy.md invariant 8). Nothing was trained or spent. Fix: "
                "remove these files from the public folder (use pictures you could publish)."
            )
        near = led.private_looks(look_ids)
        if near:
            warns.append(
                f"{len(near)} PUBLIC picture(s) look like pictures recorded as PRIVATE (same "
                "perceptual hash; a resized or re-encoded copy?): "
                f"{_some([names[i] for i in near])}. If they are copies of private pictures, "
                "remove them: a public input must not hold private pictures."
            )
        return dataset_id, warns
    if any(d is not None for d in legacy_digests):
        # Same pictures, id under dpagg <= 0.2's decode: its recorded spend moves to this id.
        old = [lg or d for lg, d in zip(legacy_digests, digests, strict=True)]
        led.adopt_dataset(dataset_id_for(old, key=key), dataset_id)
    candidates: dict[str, list[str]] = {}
    if len(digests) > 2 and led.has_unregistered_sets():
        # A set recorded before per-picture accounting, now loaded with one picture more.
        for i in range(len(digests)):
            rest = [*digests[:i], *digests[i + 1 :]]
            candidates[dataset_id_for(rest, key=key)] = [*ids[:i], *ids[i + 1 :]]
    near = led.register_set(dataset_id, ids, look_ids, candidates=candidates)
    if near:
        warns.append(
            f"{len(near)} picture(s) are new to the privacy ledger but look like pictures already "
            f"released (same perceptual hash: a resized or re-encoded copy?): "
            f"{_some([names[i] for i in near])}. The ledger recognises only identical pixels, so "
            "a copy gets its own budget while the original's spend is not counted for it. If they "
            "are copies, remove them or release nothing more from them."
        )
    return dataset_id, warns
