"""Prefect orchestration of the btc lifecycle: flows, their thin tasks, deployments and the demo.

* :mod:`flows.tasks`: one Prefect task per btc function (retries and caching policy here);
* :mod:`flows.training_pipeline`: validate -> split -> train -> evaluate -> MLflow -> registry
  gates -> service record -> monitoring reference;
* :mod:`flows.monitoring_flow`: drift over the prediction log, retraining through a deployment;
* :mod:`flows.service`: what "deploying" a promoted model means here (``serving.json``, Bento);
* :mod:`flows.reporting`: the Prefect artifacts (markdown tables, links);
* :mod:`flows.serve`: every deployment served by one process (no work pool), as ``prefect.yaml``
  defines them for a worker;
* :mod:`flows.demo`: the README's main job, ``python -m flows.demo``.

Importing this package imports no flow: Prefect takes seconds to import.
"""
