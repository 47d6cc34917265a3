"""The proof of issue 11 on exact counterfactuals (procedural phantoms): a shortcut classifier is flagged
by its flip rate under the nuisance change, a classifier blind to the left hemithorax by the
left-vs-right sensitivity gap, both with CIs that exclude no effect; a fair one is not flagged."""

from __future__ import annotations

import pytest

from generator.stress import PhantomSource, StressSpec, UserClassifier, run_stress_test

FAIR = "generator.stress.reference_models:fair_effusion"
LEFT_BLIND = "generator.stress.reference_models:left_blind_effusion"


@pytest.fixture(scope="module")
def reports(tmp_path_factory, shortcut_torchscript, spec_data):
    spec = StressSpec.from_mapping({**spec_data("effusion"), "seeds": 16})
    out = tmp_path_factory.mktemp("planted")
    source = PhantomSource(64)
    result = {}
    for name, ref in (("shortcut", str(shortcut_torchscript)), ("left_blind", LEFT_BLIND), ("fair", FAIR)):
        clf = UserClassifier.load(ref, probe_size=64)
        run = run_stress_test(spec, source, clf, out, n_boot=1000, progress=False)
        result[name] = (run.report, run.made)
    return result


def _pair(report, attribute, a, b):
    return next(p for p in report["pairs"] if p["attribute"] == attribute and p["from"] == a and p["to"] == b)


def _gap(report, attribute, a, b, metric):
    return next(g for g in report["gaps"] if (g["attribute"], g["a"], g["b"], g["metric"]) == (attribute, a, b, metric))


def test_shortcut_flagged_by_flip_rate_under_nuisance_change(reports):
    report, _ = reports["shortcut"]
    sex = _pair(report, "sex", "woman", "man")
    assert sex["kind"] == "same_label" and sex["flagged"]
    assert sex["flip_rate"]["ci_low"] > report["spec"]["tolerance"]
    assert sex["score_shift"]["ci_low"] > 0  # men score higher: the brightness shortcut
    assert any(f["kind"] == "flip_rate" and f["what"] == "sex: woman -> man" for f in report["summary"]["flags"])


def test_left_blind_flagged_by_left_right_sensitivity_gap(reports):
    report, _ = reports["left_blind"]
    gap = _gap(report, "finding", "moderate left pleural effusion", "moderate right pleural effusion", "sensitivity")
    assert gap["flagged"] and gap["gap"]["ci_low"] > report["spec"]["tolerance"]
    assert not _pair(report, "sex", "woman", "man")["flagged"]
    worst = report["summary"]["worst_subgroup"]
    assert (worst["attribute"], worst["value"]) == ("finding", "moderate left pleural effusion")


def test_fair_classifier_not_flagged(reports):
    report, made = reports["fair"]
    assert report["summary"]["flags"] == [] and not report["summary"]["flagged"]
    assert not any(p["flagged"] for p in report["pairs"]) and not any(g["flagged"] for g in report["gaps"])
    assert made.written == 0 and made.skipped_done == 16 * 6  # the same images, tested again


def test_report_form(reports):
    report, _ = reports["left_blind"]
    assert {"cells", "pairs", "summary"} <= set(report)
    assert len(report["cells"]) == 6 and len(report["pairs"]) == 4
    for cell in report["cells"]:
        assert cell["n"] == 16 and set(cell["attributes"]) == {"finding", "sex", "age"}
    metrics = [m for c in report["cells"] + report["subgroups"] for m in c["metrics"].values()]
    metrics += [p[k] for p in report["pairs"] for k in ("flip_rate", "score_shift", "ssim", "mean_abs_diff")]
    metrics += list(report["summary"]["overall"].values())
    for m in metrics:
        assert set(m) == {"value", "ci_low", "ci_high"}
        assert m["ci_low"] is None or m["ci_low"] <= m["value"] + 1e-9 <= m["ci_high"] + 2e-9
