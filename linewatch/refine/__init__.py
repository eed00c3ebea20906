"""AnoRefiner's progressive group-wise test-time training (PGT) and the refiner that runs it.

- ``pseudo``: which frames of a closed lot count as normal (lowest zero-shot image scores);
- ``synth``: training samples: pseudo-normal frames with synthetic anomalies pasted in, their
  features and coarse scores computed exactly as at test time;
- ``train``: the ARD training loop (crops, focal + dice loss, a step and time budget);
- ``worker``: ``Refiner``, which refines a lot with the current ARD and trains the next ARD on that
  lot in a background thread.
"""
