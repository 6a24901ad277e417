"""Judges (text -> score, or a pair -> a preference) and the win rates they count."""
