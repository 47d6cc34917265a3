"""The stress-test report: ``report.json``, ``report.html`` and ``--fail-under`` rules.

``report.json`` (issue 11)::

    {"cells": [{"id", "attributes", "varied", "prompt", "expected_label", "n", "metrics": {...}}],
     "subgroups": [{"attribute", "value", "n", "metrics": {...}}],
     "pairs": [{"attribute", "from", "to", "kind", "n", "flip_rate", "score_shift", "ssim", "mean_abs_diff",
                "ssim_outside", "mean_abs_diff_outside", "flagged"}],
     "gaps": [{"attribute", "a", "b", "metric", "gap", "flagged"}],
     "edits": [...],            # --images runs: original -> edit per cell
     "summary": {"overall": {...}, "worst_subgroup", "worst_cell", "flags", "flagged", "fail_under", "passed", ...},
     "spec", "generator", "classifier", "settings"}

Every metric is ``{"value", "ci_low", "ci_high"}`` (bootstrap 95% CI over sets; ``null`` when not
estimable). ``report.html`` shows the same tables and a gallery of the most failed pairs.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Sequence

from generator._utils import did_you_mean
from generator.manifest import atomic_write_text
from generator.stress.spec import PairKind, StressSpec

__all__ = ["FailMetric", "FailRule", "parse_fail_under", "build_report", "write_report", "render_html",
           "REPORT_JSON", "REPORT_HTML", "GALLERY_PAIRS"]

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
#: Pairs shown in the HTML gallery of failures.
GALLERY_PAIRS = 24
_BOUNDS = ("value", "ci_low", "ci_high")


class FailMetric(str, Enum):
    """Summary metrics a ``--fail-under METRIC=VALUE`` rule can test (higher is better for all)."""

    AUROC = "auroc"
    ACCURACY = "accuracy"
    SENSITIVITY = "sensitivity"
    SPECIFICITY = "specificity"
    BALANCED_ACCURACY = "balanced_accuracy"
    WORST_SUBGROUP_ACCURACY = "worst_subgroup_accuracy"
    WORST_CELL_ACCURACY = "worst_cell_accuracy"
    #: 1 - the largest flip rate among changes that keep the expected class.
    CONSISTENCY = "consistency"


@dataclass(frozen=True)
class FailRule:
    """``METRIC[.BOUND]=VALUE``: exit non-zero when the metric's ``BOUND`` (default its value) is below ``VALUE``."""

    metric: FailMetric
    bound: str
    threshold: float

    @property
    def text(self) -> str:
        """The rule as the user writes it."""
        bound = "" if self.bound == "value" else f".{self.bound}"
        return f"{self.metric.value}{bound}={self.threshold:g}"

    def requires(self, spec: StressSpec) -> None:
        """Raise ``ValueError`` when the spec cannot produce this metric (before any image is made)."""
        labels = {c.label for c in spec.cells}
        needs = {FailMetric.AUROC: {0, 1}, FailMetric.BALANCED_ACCURACY: {0, 1}, FailMetric.SENSITIVITY: {1},
                 FailMetric.SPECIFICITY: {0}}.get(self.metric, set())
        if not needs <= labels:
            raise ValueError(
                f"--fail-under {self.text}: the spec's cells are all expected class {sorted(labels)}, so "
                f"{self.metric.value} cannot be computed"
            )
        if self.metric == FailMetric.CONSISTENCY and not any(pt.kind == PairKind.SAME_LABEL for pt in spec.pair_types):
            raise ValueError(f"--fail-under {self.text}: the spec has no change that keeps the expected class")


def parse_fail_under(items: Sequence[str]) -> list[FailRule]:
    """Parse ``--fail-under`` arguments (``auroc=0.8``, ``sensitivity.ci_low=0.7``).

    Raises:
        ValueError: malformed rule, unknown metric or bound (with "did you mean"), or a value that is not a number.
    """
    rules = []
    names = [m.value for m in FailMetric]
    for item in items:
        name, sep, value = str(item).partition("=")
        if not sep:
            raise ValueError(f"--fail-under expects METRIC=VALUE (e.g. auroc=0.8), got {item!r}")
        metric, _, bound = name.strip().partition(".")
        bound = bound or "value"
        if metric not in names:
            raise ValueError(f"--fail-under metric must be one of {names}, got {metric!r}{did_you_mean(metric, names)}")
        if bound not in _BOUNDS:
            raise ValueError(f"--fail-under bound must be one of {list(_BOUNDS)}, got {bound!r} in {item!r}")
        try:
            threshold = float(value)
        except ValueError:
            raise ValueError(f"--fail-under value must be a number, got {value!r} in {item!r}") from None
        rules.append(FailRule(FailMetric(metric), bound, threshold))
    return rules


def _rule_value(rule: FailRule, summary: dict[str, Any], pairs: list[dict[str, Any]]) -> float | None:
    m = rule.metric
    if m.value in summary["overall"]:
        return summary["overall"][m.value].get(rule.bound)
    if m in (FailMetric.WORST_SUBGROUP_ACCURACY, FailMetric.WORST_CELL_ACCURACY):
        row = summary["worst_subgroup" if m == FailMetric.WORST_SUBGROUP_ACCURACY else "worst_cell"]
        return None if row is None else row["metrics"]["accuracy"].get(rule.bound)
    if m == FailMetric.CONSISTENCY:
        same = [p for p in pairs if p["kind"] == "same_label" and p["flip_rate"]["value"] is not None]
        if not same:
            return None
        worst = max(same, key=lambda p: p["flip_rate"]["value"])
        flip = worst["flip_rate"]
        other = {"value": "value", "ci_low": "ci_high", "ci_high": "ci_low"}[rule.bound]
        return None if flip[other] is None else 1.0 - flip[other]
    return None


def build_report(spec: StressSpec, analysis: dict[str, Any], *, generator: dict[str, Any],
                 classifier: dict[str, Any], settings: dict[str, Any], rules: Sequence[FailRule] = (),
                 n_images: int = 0, n_rejected: int = 0) -> dict[str, Any]:
    """Assemble ``report.json`` from :func:`generator.stress.statistics.analyse` output.

    Args:
        spec: The spec.
        analysis: The statistics.
        generator: The image source's manifest fields (model hash, sampler, ...).
        classifier: :meth:`UserClassifier.describe`.
        settings: Run settings (bootstrap, source kind, ...).
        rules: ``--fail-under`` rules.
        n_images: Images scored.
        n_rejected: Images the privacy gate rejected.
    """
    summary: dict[str, Any] = {
        "overall": analysis["overall"],
        "worst_subgroup": analysis["worst"]["subgroup"],
        "worst_cell": analysis["worst"]["cell"],
        "flags": analysis["flags"],
        "flagged": bool(analysis["flags"]),
        "n_sets": len(spec.seeds) if settings.get("source") != "images" else settings.get("n_images_in"),
        "seeds_per_cell": len(spec.seeds),
        "n_images": n_images,
        "n_rejected_by_privacy": n_rejected,
        "threshold": spec.threshold,
        "tolerance": spec.tolerance,
    }
    results = []
    for rule in rules:
        value = _rule_value(rule, summary, analysis["pairs"])
        results.append({"rule": rule.text, "metric": rule.metric.value, "bound": rule.bound,
                        "threshold": rule.threshold, "value": value,
                        "passed": value is not None and value >= rule.threshold})
    summary["fail_under"] = results
    summary["passed"] = all(r["passed"] for r in results)
    report = {
        "radsynth_stress_test": 1,
        "cells": analysis["cells"], "subgroups": analysis["subgroups"], "pairs": analysis["pairs"],
        "gaps": analysis["gaps"], "summary": summary,
        "spec": spec.to_dict(), "generator": generator, "classifier": classifier, "settings": settings,
        "failed_pairs": analysis["pair_examples"][:200],
    }
    if analysis["edits"]:
        report["edits"] = analysis["edits"]
    return report


def _fmt(m: dict[str, Any] | None) -> str:
    if not m or m.get("value") is None:
        return "–"
    if m.get("ci_low") is None:
        return f"{m['value']:.3f}"
    return f"{m['value']:.3f} <small>[{m['ci_low']:.3f}, {m['ci_high']:.3f}]</small>"


def render_html(report: dict[str, Any], images_dir: str = "images") -> str:
    """``report.html``: summary, flags, tables and a gallery of the most failed pairs.

    Args:
        report: From :func:`build_report`.
        images_dir: Folder of the images relative to the page.
    """
    e = html.escape
    s = report["summary"]
    metric_names = ["accuracy", "sensitivity", "specificity", "auroc", "mean_score"]
    parts = [f"""<!doctype html><html><head><meta charset="utf-8"><title>RadSynth stress test</title>
<style>body{{font-family:sans-serif;margin:1em;max-width:1200px}} table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:right}} td:first-child,th:first-child{{text-align:left}}
.flag{{color:#b00;font-weight:bold}} .ok{{color:#070}}
figure{{display:inline-block;margin:6px;font-size:12px;width:300px;vertical-align:top}}
img{{image-rendering:pixelated}} small{{color:#666}}</style></head><body>
<h1>Stress test of {e(str(report['classifier'].get('model')))}</h1>
<p>Generator: {e(str(report['generator'].get('model')))} ({e(str(report['generator'].get('sampler')))},
{e(str(report['generator'].get('steps')))} steps) · prompt <code>{e(report['spec']['prompt'])}</code> ·
{s['seeds_per_cell']} seeds per cell · {s['n_images']} images scored · threshold {s['threshold']} ·
95% bootstrap CIs over seeds.</p>"""]
    verdict = "<span class='flag'>flagged</span>" if s["flagged"] else "<span class='ok'>nothing flagged</span>"
    parts.append(f"<h2>Summary: {verdict}</h2><table><tr><th>metric</th><th>value [95% CI]</th></tr>")
    for k, v in s["overall"].items():
        parts.append(f"<tr><td>{e(k)}</td><td>{_fmt(v)}</td></tr>")
    parts.append("</table>")
    if s["worst_subgroup"]:
        w = s["worst_subgroup"]
        parts.append(f"<p>Worst subgroup: <b>{e(w['attribute'])} = {e(str(w['value']))}</b>, accuracy "
                     f"{_fmt(w['metrics']['accuracy'])}.</p>")
    if s["flags"]:
        parts.append("<ul>" + "".join(f"<li class='flag'>{e(f['what'])}: {e(f['reason'])}</li>" for f in s["flags"]) + "</ul>")
    for r in s["fail_under"]:
        cls = "ok" if r["passed"] else "flag"
        parts.append(f"<p class='{cls}'>--fail-under {e(r['rule'])}: {r['value']} → {'pass' if r['passed'] else 'FAIL'}</p>")
    parts.append("<h2>Pairs (one attribute changed, same seed)</h2><table><tr><th>change</th><th>kind</th><th>n</th>"
                 "<th>flip rate</th><th>score shift</th><th>SSIM</th><th>mean |diff|</th><th>SSIM outside</th>"
                 "<th>mean |diff| outside</th></tr>")
    for p in report["pairs"]:
        cls = " class='flag'" if p["flagged"] else ""
        parts.append(f"<tr{cls}><td>{e(p['attribute'])}: {e(str(p['from']))} → {e(str(p['to']))}</td><td>{e(p['kind'])}</td>"
                     f"<td>{p['n']}</td><td>{_fmt(p['flip_rate'])}</td><td>{_fmt(p['score_shift'])}</td>"
                     f"<td>{_fmt(p.get('ssim'))}</td><td>{_fmt(p.get('mean_abs_diff'))}</td>"
                     f"<td>{_fmt(p.get('ssim_outside'))}</td><td>{_fmt(p.get('mean_abs_diff_outside'))}</td></tr>")
    parts.append("</table><h2>Gaps between values (paired on seeds)</h2><table><tr><th>attribute</th><th>a</th>"
                 "<th>b</th><th>metric</th><th>b − a</th></tr>")
    for g in report["gaps"]:
        cls = " class='flag'" if g["flagged"] else ""
        parts.append(f"<tr{cls}><td>{e(g['attribute'])}</td><td>{e(str(g['a']))}</td><td>{e(str(g['b']))}</td>"
                     f"<td>{e(g['metric'])}</td><td>{_fmt(g['gap'])}</td></tr>")
    header = "".join(f"<th>{m}</th>" for m in metric_names)
    parts.append(f"</table><h2>Subgroups</h2><table><tr><th>attribute = value</th><th>n</th>{header}</tr>")
    for g in report["subgroups"]:
        cells = "".join(f"<td>{_fmt(g['metrics'].get(m))}</td>" for m in metric_names)
        parts.append(f"<tr><td>{e(g['attribute'])} = {e(str(g['value']))}</td><td>{g['n']}</td>{cells}</tr>")
    parts.append(f"</table><h2>Cells</h2><table><tr><th>cell</th><th>expected</th><th>n</th>{header}</tr>")
    for c in report["cells"]:
        cells = "".join(f"<td>{_fmt(c['metrics'].get(m))}</td>" for m in metric_names)
        name = ", ".join(f"{k}={v}" for k, v in c["varied"].items())
        parts.append(f"<tr><td>{e(name)}</td><td>{c['expected_label']}</td><td>{c['n']}</td>{cells}</tr>")
    parts.append("</table>")
    if report.get("edits"):
        parts.append("<h2>Real-image edits (original → edit)</h2><table><tr><th>edit</th><th>n</th><th>flip rate</th>"
                     "<th>score shift</th><th>SSIM</th><th>mean |diff|</th></tr>")
        for r in report["edits"]:
            parts.append(f"<tr><td>{e(r['prompt'])}</td><td>{r['n']}</td><td>{_fmt(r.get('flip_rate'))}</td>"
                         f"<td>{_fmt(r['score_shift'])}</td><td>{_fmt(r.get('ssim'))}</td>"
                         f"<td>{_fmt(r['mean_abs_diff'])}</td></tr>")
        parts.append("</table>")
    fails = report.get("failed_pairs", [])[:GALLERY_PAIRS]
    parts.append(f"<h2>Most failed pairs ({len(fails)} of {len(report.get('failed_pairs', []))} shown)</h2>")
    if not fails:
        parts.append("<p>No pair failed.</p>")
    for f in fails:
        a, b = f"{images_dir}/{f['from_file']}", f"{images_dir}/{f['to_file']}"
        parts.append(
            f"<figure><img src='{e(a)}' width='144' height='144'> <img src='{e(b)}' width='144' height='144'>"
            f"<figcaption><b>{e(f['pair'])}</b> ({e(f['set_id'])})<br>score {f['from_score']:.3f} → {f['to_score']:.3f}; "
            f"expected {f['expected'][0]} → {f['expected'][1]}<br><small>{e(f['from_prompt'])} → {e(f['to_prompt'])}</small>"
            "</figcaption></figure>")
    parts.append("<p><small>Every image is synthetic (RadSynth). Report format: docs/stress_test.md.</small></p></body></html>\n")
    return "\n".join(parts)


def write_report(output: str | Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` into ``output`` atomically.

    Returns:
        The two paths.
    """
    output = Path(output)
    j = atomic_write_text(output / REPORT_JSON, json.dumps(report, indent=1, sort_keys=False, default=str) + "\n")
    h = atomic_write_text(output / REPORT_HTML, render_html(report))
    return j, h
