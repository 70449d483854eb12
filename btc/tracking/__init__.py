"""MLflow tracking and the model registry: every run tracked, every model versioned, promotion through gates.

* :mod:`btc.tracking.store`: which tracking store (embedded SQLite by default), reachability, experiments.
* :mod:`btc.tracking.run_logging`: :func:`log_training_run`, one training run with everything it needs to be audited.
* :mod:`btc.tracking.model_io`: the registry model (``torch.export`` graph, model card) and :func:`load_predictor`.
* :mod:`btc.tracking.gates`: the promotion gates (absolute thresholds, champion margin, behaviour, calibration).
* :mod:`btc.tracking.registry`: ``register``, ``promote``, ``rollback``, ``list_versions`` with aliases.

Importing this package touches no store and sets no tracking URI.
"""

from btc.tracking.store import TrackingError

__all__ = ["TrackingError"]
