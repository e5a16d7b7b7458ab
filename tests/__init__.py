"""rpg-kernels tests: a regular package, so that an installed top-level `tests` package
(verl 0.9.1 ships one) cannot shadow this one in spawned worker processes."""
