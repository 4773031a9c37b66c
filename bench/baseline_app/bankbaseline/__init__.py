"""Quickstart-style Flower app on Confide's bank task (benchmark baseline)."""
