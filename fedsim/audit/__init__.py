"""The attacker side of a round as one public component (see :mod:`fedsim.audit.auditor`)."""

from .auditor import AuditPlan, Auditor, PoolSettings

__all__ = ["AuditPlan", "Auditor", "PoolSettings"]
