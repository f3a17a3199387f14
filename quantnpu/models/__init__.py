"""Real and tiny models, the evaluation corpus, and export to `.pt2`."""
