"""The model registry: versions, the ``challenger`` and ``champion`` aliases, promotion and rollback.

Workflow: ``register(run_id)`` adds a version and points ``challenger`` at it;
``promote(name, cfg)`` evaluates the challenger and the current champion on the same frozen
set, checks every gate (:mod:`btc.tracking.gates`) and moves ``champion`` only if all pass;
``rollback(name)`` moves ``champion`` back to the previous champion. Aliases, not the
deprecated stages. Decisions and gate values are recorded as tags on the model version; the
order of champions is the registered-model tag ``champion_history`` (JSON list of versions).

The frozen evaluation set is the ``test`` split of the challenger's run (its logged
``data/split.parquet``) unless the caller passes rows (``btc registry promote --data``): pass a
fixed set that no candidate trained on when models come from different splits.

Concurrency. ``promote`` and ``rollback`` hold an exclusive lock for their whole
read-evaluate-write: ``flock`` on a file next to the SQLite database (or under ``$BTC_HOME``
for a remote store), so promotions on one machine are serialised and the second sees the
first's result (e.g. "already champion"). Inside the lock the aliases are read again before
writing, so a challenger that moved meanwhile (a ``register``, or a promotion on another
machine against a shared server) aborts the promotion with nothing changed. Each alias write is
one atomic update in MLflow's store, and the alias is read back after writing; so an alias
always names an existing version, and never half of two promotions.
"""

from __future__ import annotations

import contextlib

import fcntl
import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import LoggedModel
from mlflow.entities.model_registry import RegisteredModel
from mlflow.exceptions import MlflowException

from btc.config import Config
from btc.data.cache import decode_rows
from btc.evaluate import evaluate_predictor, rows_to_evaluate
from btc.paths import btc_home
from btc.tracking import store
from btc.tracking.gates import GateResult, behaviour, evaluate_gates, gates_table
from btc.tracking.model_io import load_predictor, logged_model_of_run, run_split

CHALLENGER, CHAMPION = "challenger", "champion"
HISTORY_TAG = "champion_history"
HISTORY_KEEP = 100
LOCK_TIMEOUT_S = 900.0
KEY_METRICS = ("test_macro_f1", "test_clean_macro_f1", "test_ece")


class RegistryError(ValueError):
    """A registry operation cannot be done as asked; nothing was changed."""


@dataclass
class PromotionResult:
    """What ``promote`` decided and why."""

    name: str
    challenger: str
    champion_before: str | None
    champion_after: str | None
    promoted: bool
    reason: str
    gates: list[GateResult] = field(default_factory=list)
    eval_set: str = ""
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        """The gate table followed by the decision."""
        head = [f"model {self.name!r}: challenger v{self.challenger}, champion "
                f"{'v' + self.champion_before if self.champion_before else 'none'}", f"evaluation set: {self.eval_set}"]
        body = [gates_table(self.gates)] if self.gates else []
        return "\n".join(head + body + [f"note: {n}" for n in self.notes] + [self.reason])


def lock_path(uri: str) -> Path:
    """The lock file serialising promotions against the registry at ``uri``."""
    db = store.sqlite_path(uri)
    if db is not None:
        return db.resolve().with_name(db.name + ".promotion.lock")
    return btc_home() / "locks" / f"registry-{hashlib.sha256(uri.encode()).hexdigest()[:16]}.lock"


@contextmanager
def registry_lock(uri: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[Path]:
    """Hold the exclusive promotion lock for ``uri`` (``flock``: released even if the process dies).

    Raises:
        RegistryError: another promotion held it for more than ``timeout`` seconds.
    """
    path = lock_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    with open(path, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RegistryError(f"another promotion or rollback on {uri} has held {str(path)!r} for over "
                                        f"{timeout:g}s; nothing changed, try again when it finishes") from None
                time.sleep(0.1)
        try:
            yield path
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def registered_model(mlflow_client: MlflowClient, name: str) -> RegisteredModel:
    """The registered model ``name``.

    Raises:
        RegistryError: no model of that name; the message lists the names there are.
    """
    try:
        return mlflow_client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    names = sorted(m.name for m in mlflow_client.search_registered_models(max_results=50))
    raise RegistryError(f"unknown model name {name!r}; registered models: {', '.join(names) or 'none'} "
                        f"(register a run first: btc registry register RUN_ID --name {name})") from None


def champion_history(model: RegisteredModel) -> list[str]:
    """Versions that have been champion, oldest first."""
    raw = model.tags.get(HISTORY_TAG)
    return [str(v) for v in json.loads(raw)] if raw else []


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _logged_model(mlflow_client: MlflowClient, run_id: str) -> LoggedModel:
    try:
        return logged_model_of_run(mlflow_client, run_id)
    except MlflowException:
        raise RegistryError(f"run {run_id!r} does not exist in {mlflow_client.tracking_uri}; "
                            "run ids are printed by `btc train` and shown in the MLflow UI") from None
    except ValueError as err:
        raise RegistryError(str(err)) from None


def versions_of(mlflow_client: MlflowClient, name: str) -> list:
    """Every version of ``name``: MLflow's search filter quotes the name, so a name with a ``'`` goes in ``"``."""
    quote = '"' if "'" in name else "'"
    return mlflow_client.search_model_versions(f"name = {quote}{check_model_name(name)}{quote}")


def check_model_name(name: str) -> str:
    """``name``, unless it holds both kinds of quote, which MLflow's search filter cannot express.

    Raises:
        RegistryError: it does.
    """
    if "'" in name and '"' in name:
        raise RegistryError(f"model name {name!r} holds both ' and \"; MLflow cannot search for it. Use at most one kind")
    if "@" in name:
        raise RegistryError(f"model name {name!r} holds '@', which model URIs use for aliases (models:/name@champion): "
                            "its versions could never be loaded. Choose a name without '@'")
    return name


def register(run_id: str, name: str, *, reuse_undecided: bool = False) -> str:
    """Add the run's model as a new version of ``name`` and point ``challenger`` at it.

    ``reuse_undecided``: a version of this run that no promotion has judged yet is pointed at
    instead of adding another (what a retried pipeline step wants: its first try may have added
    the version before the store failed). Without it, registering a run again asks for a new
    decision on a new version.

    Returns:
        The version number.

    Raises:
        TrackingError: the store is unreachable.
        RegistryError: the run does not exist or has no btc model.
    """
    check_model_name(name)
    mlflow_client = store.client(must_exist=True)
    logged = _logged_model(mlflow_client, run_id)
    try:
        mlflow_client.create_registered_model(name, description="Brain MRI slice classifier (btc). Decision support "
                                                                "for trained clinicians, not a diagnosis.")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    if reuse_undecided:
        undecided = [mv for mv in versions_of(mlflow_client, name)
                     if mv.run_id == run_id and "promotion.decision" not in mv.tags and "rolled_back_at" not in mv.tags]
        if undecided:
            version = max(undecided, key=lambda mv: int(mv.version))
            mlflow_client.set_registered_model_alias(name, CHALLENGER, version.version)
            return str(version.version)
    # The artifact location, not models:/<model_id>: MLflow's SQL registry resolves the latter
    # with the global tracking URI, which the embedded default store leaves unset.
    version = mlflow_client.create_model_version(name, source=logged.artifact_location, run_id=run_id,
                                                 model_id=logged.model_id, tags={"registered_at": _now()})
    mlflow_client.set_registered_model_alias(name, CHALLENGER, version.version)
    return str(version.version)


def frozen_eval_rows(mlflow_client: MlflowClient, run_id: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The test rows of a run's logged split, and the whole split.

    Raises:
        RegistryError: the run has no ``data/split.parquet`` or its test rows are unusable.
    """
    try:
        split = run_split(mlflow_client, run_id)
    except ValueError as err:
        raise RegistryError(str(err)) from None
    try:
        return rows_to_evaluate(split, "test"), split
    except ValueError as err:
        raise RegistryError(f"run {run_id!r}: {err}") from None


def _record(mlflow_client: MlflowClient, result: PromotionResult) -> None:
    tags = {"promotion.decision": "promoted" if result.promoted else "rejected", "promotion.reason": result.reason,
            "promotion.at": _now(), "promotion.champion_before": result.champion_before or "none",
            "promotion.eval_set": result.eval_set[:4000]}
    tags |= {f"gate.{g.name}": f"{g.value} ({g.threshold}): {'pass' if g.passed else 'fail'}" for g in result.gates}
    # Gates of an earlier decision that this one did not evaluate would contradict it: removed first.
    earlier = mlflow_client.get_model_version(result.name, result.challenger).tags
    for key in earlier:
        if key.startswith("gate.") and key not in tags:
            mlflow_client.delete_model_version_tag(result.name, result.challenger, key)
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(result.name, result.challenger, key, value)


def _mark_move_failed(mlflow_client: MlflowClient, name: str, version: str, err: Exception) -> None:
    """After an error while moving the alias: unless it did move, the record says the move failed."""
    with contextlib.suppress(MlflowException):  # the store itself is failing: the error being raised says why
        if str(mlflow_client.get_model_version_by_alias(name, CHAMPION).version) == version:
            return
    with contextlib.suppress(MlflowException):
        mlflow_client.set_model_version_tag(name, version, "promotion.decision",
                                            f"passed the gates, but moving {CHAMPION} failed ({type(err).__name__})")


def _seen_images(mlflow_client: MlflowClient, run_id: str, split: pd.DataFrame | None = None) -> set[str] | None:
    """sha256 of the train and validation images of a run's logged split (None: the run logged none).

    ``split``: that split, when the caller has already downloaded it.
    """
    if split is None:
        try:
            split = run_split(mlflow_client, run_id)
        except ValueError:
            return None
    return set(split.loc[split["split"].isin(["train", "val"]), "sha256"])


def _check_overlap(mlflow_client: MlflowClient, name: str, challenger: str, champion: str | None,
                   rows: pd.DataFrame, challenger_split: pd.DataFrame | None = None) -> list[str]:
    """Refuse evaluation images the challenger trained or chose on; note those the champion saw.

    ``challenger_split``: the challenger run's split, when already downloaded.

    Raises:
        RegistryError: some evaluation images are in the challenger's train/val split (nothing changed).
    """
    notes = []
    for role, version in (("challenger", challenger), ("champion", champion)):
        if version is None:
            continue
        run_id = mlflow_client.get_model_version(name, version).run_id
        seen = _seen_images(mlflow_client, run_id, challenger_split if role == "challenger" else None)
        if seen is None and role == "challenger":  # fail closed: an unchecked set may be its own training images
            raise RegistryError(
                f"cannot read the split the challenger's (v{version}) run {run_id} logged (data/split.parquet), so "
                "cannot tell whether the evaluation images include ones it trained on. Nothing changed; restore "
                "that artifact, or register a run that logged its split")
        if seen is None:
            notes.append(f"the champion's (v{version}) run logged no readable split: whether it trained on any "
                         "evaluation image is unknown")
        overlap = int(rows["sha256"].isin(seen).sum()) if seen else 0
        if overlap and role == "challenger":
            raise RegistryError(
                f"{overlap} of the {len(rows)} evaluation images were in the challenger's (v{version}) train/val "
                "split: judged on them it would look better than it is. Nothing changed; evaluate on images it "
                "did not train on (--data with another set, or the default: its run's test split)")
        if overlap:
            notes.append(f"{overlap} evaluation images were in the champion's train/val split; its score is flattered, "
                         "use --data with a set neither model trained on")
    return notes


def _judge(name: str, challenger: str, champion: str | None, cfg: Config,
           eval_rows: pd.DataFrame) -> list[GateResult]:
    """Evaluate challenger and champion on the same rows, in this process, and apply every gate."""
    candidate = load_predictor(f"models:/{name}/{challenger}")
    mine = evaluate_predictor(candidate, eval_rows, n_bins=cfg.eval.ece_bins)
    theirs = (evaluate_predictor(load_predictor(f"models:/{name}/{champion}"), eval_rows, n_bins=cfg.eval.ece_bins)
              if champion is not None else None)
    measured = behaviour(candidate, decode_rows(eval_rows, candidate.image_size, progress=False))
    return evaluate_gates(mine, theirs, measured, cfg.registry.gates)


def _check_aliases_unmoved(model: RegisteredModel, challenger: str, champion: str | None) -> None:
    now = {a: str(model.aliases[a]) if a in model.aliases else None for a in (CHALLENGER, CHAMPION)}
    moved = [f"{a} moved from {old or 'none'} to {now[a] or 'none'}"
             for a, old in ((CHALLENGER, challenger), (CHAMPION, champion)) if now[a] != old]
    if moved:
        raise RegistryError(f"model {model.name!r}: {'; '.join(moved)} during evaluation; nothing changed, "
                            "run promote again")


def _push_history(mlflow_client: MlflowClient, model: RegisteredModel, challenger: str, champion: str | None) -> None:
    """``champion_history`` ending ``..., champion, challenger`` (what rollback follows)."""
    history = [v for v in champion_history(model) if v != challenger][-HISTORY_KEEP:]
    if champion is not None and (not history or history[-1] != champion):
        history.append(champion)  # a champion set by hand, outside btc's history
    mlflow_client.set_registered_model_tag(model.name, HISTORY_TAG, json.dumps(history + [challenger]))


def _finish_earlier_promotion(mlflow_client: MlflowClient, name: str, version: str, expected: str | None):
    """The challenger is champion already. If an earlier try of this promotion moved the alias and then
    failed (the store, say), finish its record (the history) and, for the caller that registered it
    (``expected``), report it as the promotion it was; else None."""
    tags = mlflow_client.get_model_version(name, version).tags
    if tags.get("promotion.decision") != "promoted":
        return None
    model = registered_model(mlflow_client, name)
    before = tags.get("promotion.champion_before")
    before = None if before in (None, "none") else before
    if champion_history(model)[-1:] != [version]:
        _push_history(mlflow_client, model, version, before)
    if expected is None or str(expected) != version:
        return None
    was = f"v{before}" if before else "none"
    return PromotionResult(name, version, before, version, True,
                           f"PROMOTED: {CHAMPION} -> v{version} (was {was}), by an earlier try of this promotion; "
                           "its gates are recorded on the version (gate.* tags)", eval_set=tags.get("promotion.eval_set", ""))


def _move_champion(mlflow_client: MlflowClient, model: RegisteredModel, challenger: str, champion: str | None) -> None:
    name = model.name
    mlflow_client.set_registered_model_alias(name, CHAMPION, challenger)  # one atomic row update in the store
    _push_history(mlflow_client, model, challenger, champion)
    after = str(mlflow_client.get_model_version_by_alias(name, CHAMPION).version)
    if after != challenger:
        raise RegistryError(f"model {name!r}: {CHAMPION} reads v{after} right after being set to v{challenger}; "
                            "another writer bypassed the promotion lock")


def promote(name: str, cfg: Config, eval_rows: pd.DataFrame | None = None, *, eval_source: str | None = None,
            lock_timeout: float = LOCK_TIMEOUT_S, expected_challenger: str | None = None) -> PromotionResult:
    """Move ``champion`` to the challenger if every gate passes; record the decision either way.

    Args:
        name: registered model name.
        cfg: config whose ``registry.gates`` are the thresholds (and ``eval.ece_bins``).
        eval_rows: the frozen evaluation set (manifest or split rows); default the test split of
            the challenger's run.
        eval_source: how to describe ``eval_rows`` in the result and tags.
        lock_timeout: seconds to wait for a concurrent promotion to finish.
        expected_challenger: the version the caller registered; if ``challenger`` now points
            elsewhere (another run registered since), nothing is judged.

    Raises:
        TrackingError: the store is unreachable.
        RegistryError: unknown name, no challenger, a challenger other than ``expected_challenger``,
            or the aliases moved during evaluation (nothing changed in each case).
    """
    mlflow_client = store.client(must_exist=True)
    registered_model(mlflow_client, name)
    with registry_lock(store.registry_uri(mlflow_client.tracking_uri), lock_timeout):
        aliases = registered_model(mlflow_client, name).aliases  # read again now that the lock is held
        if CHALLENGER not in aliases:
            raise RegistryError(f"model {name!r} has no {CHALLENGER!r} alias; register a run first: "
                                f"btc registry register RUN_ID --name {name}")
        challenger = str(aliases[CHALLENGER])
        if expected_challenger is not None and challenger != str(expected_challenger):
            raise RegistryError(f"model {name!r}: {CHALLENGER} is v{challenger}, not v{expected_challenger}: another "
                                f"run was registered since; v{expected_challenger} was not judged and nothing changed")
        champion = str(aliases[CHAMPION]) if CHAMPION in aliases else None
        if challenger == champion:
            finished = _finish_earlier_promotion(mlflow_client, name, challenger, expected_challenger)
            if finished is not None:
                return finished
            return PromotionResult(name, challenger, champion, champion, False,
                                   f"version {challenger} is already {CHAMPION}; nothing to do")
        challenger_version = mlflow_client.get_model_version(name, challenger)
        rolled_back = challenger_version.tags.get("rolled_back_at")
        if rolled_back:
            raise RegistryError(f"model {name!r}: the {CHALLENGER} v{challenger} was rolled back as {CHAMPION} at "
                                f"{rolled_back}; register a new run to promote (btc registry register RUN_ID --name {name})")
        challenger_split = None
        if eval_rows is None:
            challenger_run = challenger_version.run_id
            eval_rows, challenger_split = frozen_eval_rows(mlflow_client, challenger_run)
            eval_source = f"test split of the challenger's run {challenger_run} (data/split.parquet)"
        notes = _check_overlap(mlflow_client, name, challenger, champion, eval_rows, challenger_split)
        eval_set = f"{eval_source or 'given rows'}: {len(eval_rows)} images"

        gates = _judge(name, challenger, champion, cfg, eval_rows)
        model = registered_model(mlflow_client, name)
        _check_aliases_unmoved(model, challenger, champion)  # a `register` or another machine may have moved one
        passed = all(g.passed for g in gates)
        was = f"v{champion}" if champion else "none"
        if passed:
            reason = f"PROMOTED: {CHAMPION} -> v{challenger} (was {was})"
        else:
            failed = ", ".join(g.name for g in gates if not g.passed)
            reason = f"REJECTED: gate(s) failed: {failed}; {CHAMPION} unchanged ({was})"
        result = PromotionResult(name, challenger, champion, challenger if passed else champion, passed, reason,
                                 gates, eval_set, notes)
        # The decision is written before the alias moves, so a champion never lacks its record; should the
        # move fail, the record says so and a retry judges again.
        _record(mlflow_client, result)
        if passed:
            try:
                _move_champion(mlflow_client, model, challenger, champion)
            except Exception as err:
                _mark_move_failed(mlflow_client, name, challenger, err)
                raise
        return result


def rollback(name: str, *, lock_timeout: float = LOCK_TIMEOUT_S) -> tuple[str, str]:
    """Move ``champion`` back to the previous champion; returns ``(from_version, to_version)``.

    Raises:
        RegistryError: unknown name, no champion, or no earlier champion to return to.
    """
    mlflow_client = store.client(must_exist=True)
    registered_model(mlflow_client, name)
    with registry_lock(store.registry_uri(mlflow_client.tracking_uri), lock_timeout):
        model = registered_model(mlflow_client, name)
        current = model.aliases.get(CHAMPION)
        if current is None:
            raise RegistryError(f"model {name!r} has no {CHAMPION}; nothing to roll back")
        current = str(current)
        history = champion_history(model)
        while history and history[-1] == current:
            history.pop()
        existing = {str(mv.version) for mv in versions_of(mlflow_client, name)}
        deleted = [v for v in history if v not in existing]
        history = [v for v in history if v in existing]  # a deleted version cannot come back
        if not history:
            gone = f" (earlier champions {', '.join('v' + v for v in deleted)} were deleted)" if deleted else ""
            raise RegistryError(f"model {name!r}: v{current} is the first {CHAMPION}{gone}; "
                                "there is no earlier one to roll back to")
        target = history[-1]
        mlflow_client.set_registered_model_alias(name, CHAMPION, target)
        mlflow_client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
        mlflow_client.set_model_version_tag(name, current, "rolled_back_at", _now())
        mlflow_client.set_model_version_tag(name, target, "restored_as_champion_at", _now())
        return current, target


def _decision(tags: dict[str, str]) -> str:
    """The last word on a version: its promotion decision, unless it was rolled back since."""
    rolled_back, decided = tags.get("rolled_back_at"), tags.get("promotion.at", "")
    if rolled_back and rolled_back >= decided:
        return f"rolled back {rolled_back}"
    return tags.get("promotion.decision", "")


def list_versions(name: str) -> list[dict]:
    """Every version of ``name``, newest first: aliases, run, status, key test metrics, last decision.

    Raises:
        RegistryError: unknown name.
    """
    mlflow_client = store.client(must_exist=True)
    model = registered_model(mlflow_client, name)
    by_version: dict[str, list[str]] = {}
    for alias, version in model.aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    rows = []
    for mv in versions_of(mlflow_client, name):
        try:
            metrics = mlflow_client.get_run(mv.run_id).data.metrics if mv.run_id else {}
        except MlflowException:  # the run was deleted and purged: the version is still listed, without metrics
            metrics = {}
        rows.append({"version": str(mv.version), "aliases": sorted(by_version.get(str(mv.version), [])),
                     "run_id": mv.run_id, "status": mv.status,
                     "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc)
                                        .isoformat(timespec="seconds"),
                     **{k: metrics.get(k) for k in KEY_METRICS},
                     "decision": _decision(mv.tags)})
    return sorted(rows, key=lambda r: int(r["version"]), reverse=True)
