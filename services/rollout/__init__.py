"""Rollout: samples groups of answers at one policy version and serves weight sync."""
