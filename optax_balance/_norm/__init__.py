"""Methods whose weights are a function of gradient norms (whole-model, per leaf, per item)."""
