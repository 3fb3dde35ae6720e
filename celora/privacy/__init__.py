"""Privacy: differential privacy (dp.py), gradient-inversion attacks (inversion.py, attacks/), metrics."""
