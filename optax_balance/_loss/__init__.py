"""Methods whose weights are a function of the losses alone: one backward pass.

Each is a weighting with ``needs == ("losses",)``: its ``update`` takes stacked per-task
gradients like every method, or the ordinary gradient of ``ob.weighted_loss`` (which it
passes through while advancing the state), so one backward pass trains with it.
"""
