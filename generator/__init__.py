"""RadSynth generator package."""
