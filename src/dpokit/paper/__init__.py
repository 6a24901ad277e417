"""Baselines and experiments of the DPO paper (Rafailov et al. 2023) on dpokit: PPO, reward models, best-of-N."""
