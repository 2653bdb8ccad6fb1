from .scheduling_masked_token import MaskedTokenScheduler, MaskedTokenSchedulerOutput


__all__ = ["MaskedTokenScheduler", "MaskedTokenSchedulerOutput"]
