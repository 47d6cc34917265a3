"""Audit reports: JSON and a self-contained HTML review page (DESIGN.md §4).

The HTML page shows the summary, then each flagged image (``reject`` first, then ``review``) beside
its nearest training images with their similarities; images are embedded as base64 PNG so the page
is a single file. The page contains training images: keep it with the reference index.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from privacy._files import current_umask
from privacy.audit import VERDICTS, AuditResult, ImageVerdict, Verdict
from privacy.index import ReferenceIndex




def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    The file ends with mode ``0o666 & ~umask``, as a plain ``open(path, "w")`` would give
    (``mkstemp`` alone would leave it ``0o600``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(result: AuditResult, path: str | Path) -> Path:
    """Write ``{"images": [...], "summary": {...}}`` to ``path`` (atomically)."""
    return atomic_write_text(path, json.dumps(result.to_dict(), indent=1))


def png_data_uri(image: np.ndarray, display: int = 128) -> str:
    """``data:image/png;base64,...`` of a ``(H, W)`` image in ``[0, 1]``, enlarged (nearest) to
    about ``display`` pixels wide."""
    arr = (np.clip(np.asarray(image, dtype=np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
    img = Image.fromarray(arr, mode="L")
    if img.width < display:
        f = max(1, display // img.width)
        img = img.resize((img.width * f, img.height * f), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
.row{display:flex;gap:12px;align-items:flex-start;margin:1em 0;padding:1em;border:1px solid #ddd}
.reject{border-left:6px solid #c0392b}.review{border-left:6px solid #e67e22}
figure{margin:0;text-align:center;font-size:12px}img{image-rendering:pixelated}
.warn{background:#fff3cd;padding:.5em 1em;border:1px solid #e0c060}
"""


def view_table(verdict: ImageVerdict) -> str:
    """HTML table: each view's nearest training similarity beside its own threshold (same units),
    at the verdict's alpha and review alpha; the deciding view in bold, views above threshold marked."""
    e = html.escape
    rows = [
        "<table class='views'><tr><th>view</th><th>similarity</th>"
        f"<th>threshold (alpha {verdict.alpha:g})</th><th>review threshold (alpha {verdict.review_alpha:g})</th></tr>"
    ]
    for view, thr in verdict.view_thresholds.items():
        sim = verdict.similarity[view]
        above = " &gt;" if sim > thr else ""
        name = f"<b>{e(view)}</b>" if view == verdict.deciding_view else e(view)
        rows.append(
            f"<tr><td>{name}</td><td>{sim:.4f}{above}</td><td>{thr:.4f}</td>"
            f"<td>{verdict.review_thresholds[view]:.4f}</td></tr>"
        )
    rows.append("</table>")
    return "".join(rows)


def render_html(
    result: AuditResult,
    index: ReferenceIndex,
    images: np.ndarray | Sequence[np.ndarray],
    max_flagged: int = 200,
    n_neighbours: int = 3,
    *,
    title: str = "RadSynth memorization audit",
) -> str:
    """The review page as a string.

    Args:
        result: The audit (2D or volumes: :class:`AuditResult` either way).
        index: The index audited against; only its ``ids`` and ``images[i]`` (an ``(H, W)`` picture in
            ``[0, 1]`` of training item ``i``, read for the neighbours shown) are used, so any object with
            those two serves (e.g. mid-slice pictures of a volume index's volumes).
        images: What to show for each audited item, in the order of ``result.images``: ``(Q, R, R)``
            images, or any ``(H, W)`` pictures in ``[0, 1]`` (e.g. a volume's three mid-slices).
        max_flagged: Most flagged images shown.
        n_neighbours: Training neighbours shown per flagged image (pixel view, then embedding).
        title: Page title.
    """
    s = result.summary
    e = html.escape
    id_to_idx = {rid: i for i, rid in enumerate(index.ids)}
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
        f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1>",
        "<p class='warn'>This page shows training images: keep it with the reference index, "
        "not with the synthetic data.</p>",
        "<table>",
    ]
    rows: list[tuple[str, Any]] = [
        ("images audited", s.get("n_images")),
        ("keep / review / reject", " / ".join(str(s["counts"][k.value]) for k in VERDICTS)),
        ("copy rate (reject)", s.get("copy_rate")),
        ("expected chance flags (alpha x n)", s.get("expected_chance_flags")),
        ("alpha (reject) / (review)", f"{s.get('alpha')} / {s.get('review_alpha')}"),
        ("training images copied", f"{s.get('training_images_copied')} ({s.get('share_training_images_copied')})"),
        ("authenticity share", s.get("authenticity_share")),
        ("held-out set", s.get("holdout", {}).get("source")),
    ]
    if "training_patients_copied" in s:
        rows.append(("training patients copied", f"{s['training_patients_copied']} ({s['share_training_patients_copied']})"))
    if "self_test" in s:
        rows.append(("planted-copy self-test (share rejected)", s["self_test"]))
    parts += [f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in rows]
    parts.append("</table><h2>Similarity quantiles: synthetic→train vs held-out→train</h2><table>")
    parts.append("<tr><th>view</th><th>set</th>" + "".join(f"<th>{q}</th>" for q in next(iter(s["similarity_quantiles"].values()))["synthetic"]) + "</tr>")
    for view, d in s["similarity_quantiles"].items():
        for which in ("synthetic", "heldout"):
            parts.append(f"<tr><td>{e(view)}</td><td>{which}</td>" + "".join(f"<td>{v}</td>" for v in d[which].values()) + "</tr>")
    parts.append(f"</table><p>{e(s.get('statement', ''))}</p>")
    flagged = [i for i, v in enumerate(result.images) if v.verdict is Verdict.REJECT]
    flagged += [i for i, v in enumerate(result.images) if v.verdict is Verdict.REVIEW]
    parts.append(f"<h2>Flagged images ({len(flagged)})</h2>")
    if not flagged:
        parts.append("<p>No image was flagged.</p>")
    for i in flagged[:max_flagged]:
        v = result.images[i]
        parts.append(f"<div class='row {v.verdict.value}'>")
        parts.append(
            f"<figure><img src='{png_data_uri(images[i])}' alt='synthetic'><figcaption><b>{e(v.file_name)}</b><br>"
            f"{v.verdict.value} · deciding view {e(v.deciding_view)}<br>p = {v.p_value:.4f}</figcaption></figure>"
        )
        parts.append(view_table(v))
        shown: list[str] = []
        for view in ("ncc", "embedding"):
            for nb in v.neighbours.get(view, []):
                if len(shown) >= n_neighbours:
                    break
                if nb["id"] in shown or nb["id"] not in id_to_idx:
                    continue
                shown.append(nb["id"])
                img = index.images[id_to_idx[nb["id"]]]
                parts.append(
                    f"<figure><img src='{png_data_uri(img)}' alt='training'><figcaption>train {e(nb['id'])}<br>"
                    f"{view} {nb['similarity']:.4f}</figcaption></figure>"
                )
        parts.append("<div><ul>" + "".join(f"<li>{e(r)}</li>" for r in v.reasons) + "</ul></div></div>")
    if len(flagged) > max_flagged:
        parts.append(f"<p>{len(flagged) - max_flagged} more flagged images are in the JSON report.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(
    result: AuditResult, index: ReferenceIndex, images: np.ndarray | Sequence[np.ndarray], path: str | Path,
    max_flagged: int = 200, **kwargs: Any,
) -> Path:
    """Write the review page (see :func:`render_html`, which takes ``kwargs``) to ``path`` atomically."""
    return atomic_write_text(path, render_html(result, index, images, max_flagged=max_flagged, **kwargs))
