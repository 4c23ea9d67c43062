"""Small dense solvers in weight space (T x T), in pure JAX with fixed shapes."""
