"""fedsq: FedSQ (federated averaging with fixed gating) and its baselines."""

__version__ = "0.1.0"
