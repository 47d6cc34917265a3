"""Procedural chest radiograph phantoms with report text, and their classical measurement.

- :mod:`generator.phantoms.render`: :func:`render_phantom` draws one phantom from attributes and a seed.
- :mod:`generator.phantoms.measure`: :func:`measure` finds the findings in an image (text-control check).
- :mod:`generator.phantoms.folder`: phantom sets on disk (``radsynth phantoms``) and in memory.
"""

from generator.phantoms.folder import (
    PhantomSet,
    iter_phantoms,
    phantom_reference_set,
    phantom_seed,
    read_phantom_metadata,
    write_phantom_folder,
)
from generator.phantoms.measure import Measurement, matches_prompt, measure, text_control_summary
from generator.phantoms.render import (
    LOBES,
    PHANTOM_FINDINGS,
    PhantomImage,
    primary_label,
    render_phantom,
    sample_attributes,
)

__all__ = [
    "PhantomSet", "iter_phantoms", "phantom_reference_set", "phantom_seed", "read_phantom_metadata",
    "write_phantom_folder", "Measurement", "matches_prompt", "measure", "text_control_summary", "LOBES", "PHANTOM_FINDINGS",
    "PhantomImage", "primary_label", "render_phantom", "sample_attributes",
]
