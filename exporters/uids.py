"""DICOM UIDs in the ``2.25`` (UUID-derived) form, deterministic when keyed.

DESIGN.md §5: UIDs are in the ``2.25.<int>`` form (a UUID as a decimal integer, PS3.5 B.2), which
needs no registered root. Without a key, :func:`pydicom.uid.generate_uid` with ``prefix=None`` gives a
random (version 4) UUID. With a key (derived from the image's seed, model hash, prompt and file name,
see :meth:`exporters.provenance.Provenance.identity_key`) and a role such as ``"DX/study"``, the UID
comes from a name-based version 5 UUID of both: pydicom's ``generate_uid`` ignores ``entropy_srcs``
when ``prefix`` is ``None``, so the deterministic case cannot go through it.
"""

from __future__ import annotations

import uuid

from pydicom.uid import UID, generate_uid

__all__ = ["derive_uid"]

#: Namespace of RadSynth's name-based UUIDs (uuid5 of the DNS name radsynth.invalid).
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "radsynth.invalid")


def derive_uid(key: str | None, role: str) -> UID:
    """A ``2.25.<int>`` UID for ``role`` (e.g. ``"study"``, ``"series"``, ``"sop/0"``).

    Args:
        key: Deterministic identity key (any string, typically a SHA-256 hex digest), or ``None``
            for a random UID.
        role: What the UID identifies, so one key yields distinct study/series/instance UIDs.

    Returns:
        A valid UID of at most 64 characters.

    Raises:
        ValueError: ``role`` is empty.
    """
    if not role:
        raise ValueError(f"role={role!r} must be a non-empty string")
    if key is None:
        return generate_uid(prefix=None)
    return UID(f"2.25.{uuid.uuid5(NAMESPACE, f'{key}/{role}').int}")
