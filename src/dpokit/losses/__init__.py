"""Preference losses as pure functions of log-probs, their configuration and the training objectives."""
