"""Tasks (what a pair is) and the input pipeline (how pairs become batches)."""
