"""Methods whose weights are a function of the losses alone: one backward pass."""
