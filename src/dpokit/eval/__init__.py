"""Scoring preference data with a trained model, and sampling from it."""
