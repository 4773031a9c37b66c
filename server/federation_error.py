"""The one error that stops a run: a round that cannot go on.

Its own module because both the round loop (server/federation.py) and the secure aggregation it
drives (server/secure_aggregation.py) raise it, and the loop imports the latter.
"""


class FederationError(RuntimeError):
    """A round that cannot go on: too few clients replied with a usable result."""
