"""Acting on a drift verdict: alert, and start retraining through a trigger the caller supplies.

The decision lives here; *how* retraining starts does not. The Prefect ``monitoring`` flow
passes a trigger that runs the deployment ``training-pipeline/retrain``; tests pass one that
records the call; with no trigger the action is only logged (a dry run).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from monitoring.drift import DriftVerdict

log = logging.getLogger(__name__)
RETRAIN_DEPLOYMENT = "training-pipeline/retrain"


def act_on_drift(verdict: DriftVerdict, *, trigger: Callable[[DriftVerdict], object] | None = None,
                 deployment: str = RETRAIN_DEPLOYMENT) -> str:
    """Alert and trigger retraining when ``verdict.drifted``; do nothing otherwise.

    Args:
        verdict: the drift report's verdict.
        trigger: called with the verdict to start retraining (e.g. runs the Prefect deployment);
            None logs what would have been done.
        deployment: the deployment the trigger starts, named in the messages.

    Returns:
        What was done: ``"no drift: ..."``, ``"triggered deployment ...: <trigger result>"`` or
        ``"would trigger deployment ..."``.
    """
    if not verdict.drifted:
        return verdict.summary()  # begins "no drift: "
    log.warning("DRIFT ALERT: %s", verdict.summary())
    if trigger is None:
        message = f"would trigger deployment {deployment} (no trigger given)"
        log.warning("DRIFT ALERT: %s", message)
        return message
    result = trigger(verdict)
    message = f"triggered deployment {deployment}" + (f": {result}" if result is not None else "")
    log.warning("DRIFT ALERT: %s", message)
    return message
