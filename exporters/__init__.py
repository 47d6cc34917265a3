"""RadSynth exporters package."""
