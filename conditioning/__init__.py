"""RadSynth conditioning package."""
