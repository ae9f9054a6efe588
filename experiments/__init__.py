"""Experiment configs, the paper sweep and benchmark drivers."""
