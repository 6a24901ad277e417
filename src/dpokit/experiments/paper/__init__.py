"""Baselines and experiments of the DPO paper (Rafailov et al. 2023) on dpokit: PPO, reward models, best-of-N,
Preferred-FT and Unlikelihood, and the reward–KL frontier of §6.1 (Fig. 2, left) on the embedded review model
(``dpokit reproduce sentiment``)."""
