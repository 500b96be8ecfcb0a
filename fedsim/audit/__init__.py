"""The attacker side of a round as one public component (:mod:`fedsim.audit.auditor`), and the three pieces that
audit a user's own Flower app with it (:mod:`fedsim.audit.app`): :func:`audited` for the ServerApp's strategy,
:func:`audit_mod` and :func:`record_batch` for the ClientApp."""

from .app import AuditError, AuditFile, audit_mod, audited, record_batch
from .auditor import AuditPlan, Auditor, PoolSettings

__all__ = ["AuditError", "AuditFile", "AuditPlan", "Auditor", "PoolSettings", "audit_mod", "audited",
           "record_batch"]
