"""Cluster role: pool publisher, scaler and composer (leader only)."""
