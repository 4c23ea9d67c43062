"""Methods that read the stacked gradients themselves, or keep gradient-sized state."""
