"""RadSynth privacy package."""
