"""Methods built from other methods (an EMA of another weighting's weights, ...)."""
