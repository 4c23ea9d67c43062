"""Methods whose weights are a function of the Gramian ``J J^T`` (and perhaps the losses)."""
