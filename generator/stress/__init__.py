"""Stress-testing a user's classifier on synthetic counterfactuals (``radsynth stress-test``, issue 11).

- :mod:`~generator.stress.spec`: :class:`StressSpec` (YAML/JSON spec, cells, pairs, labels).
- :mod:`~generator.stress.classifier`: :class:`UserClassifier` (TorchScript, ONNX or a Python callable).
- :mod:`~generator.stress.sources`: :class:`DiffusionSource` (from noise, SDEdit edits, vocabulary check).
- :mod:`~generator.stress.phantom_source`: :class:`PhantomSource` (ground-truth phantom counterfactuals).
- :mod:`~generator.stress.regions`: where a change should act (zones, mask files, phantoms).
- :mod:`~generator.stress.counterfactuals`: the resumable imagefolder of a run.
- :mod:`~generator.stress.statistics`: metrics with bootstrap CIs over seeds, flip rates, gaps, flags.
- :mod:`~generator.stress.report`: ``report.json``, ``report.html``, ``--fail-under``.
- :mod:`~generator.stress.runner`: :func:`run_stress_test`, the whole run.

Nothing else in RadSynth imports this package; it uses ``generator`` and ``conditioning`` only (the
command line adds the privacy gate).
"""

from generator.stress.classifier import ClassifierKind, UserClassifier
from generator.stress.phantom_source import PhantomSource, prompt_attributes
from generator.stress.report import FailMetric, FailRule, parse_fail_under
from generator.stress.runner import StressResult, run_stress_test
from generator.stress.spec import Cell, PairKind, PairType, StressSpec, example_spec_text, load_spec, write_example_spec
from generator.stress.statistics import Estimate, SetBootstrap, ci_half_width, seeds_for_half_width

__all__ = [
    "ClassifierKind", "UserClassifier", "PhantomSource", "prompt_attributes", "FailMetric", "FailRule",
    "parse_fail_under", "StressResult", "run_stress_test", "Cell", "PairKind", "PairType", "StressSpec",
    "example_spec_text", "load_spec", "write_example_spec", "Estimate", "SetBootstrap", "ci_half_width",
    "seeds_for_half_width",
]
