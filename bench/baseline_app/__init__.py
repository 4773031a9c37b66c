"""The bare Flower baseline of bench/scale.py (app in ./bankbaseline, runner in run.py)."""
