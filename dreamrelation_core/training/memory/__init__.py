"""Training memory: an estimator of peak GPU memory, its validation by a meta-device trace of the
real training step, block swap, activation offload and the model preparation both share."""
