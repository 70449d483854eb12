"""The prediction log: an append-only SQLite table the service writes and monitoring reads.

SQLite in WAL mode lets several service workers append at once (writers take a short lock,
readers never block) and survives restarts. Rows are never updated; they leave the log only by
:meth:`PredictionLog.rotate`, which copies them to an archive first. Images are stored only when
asked (``image`` column, off by default).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import pandas as pd

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts TEXT NOT NULL,                -- ISO-8601 UTC
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    predicted TEXT NOT NULL,
    confidence REAL NOT NULL,
    prob_entropy REAL NOT NULL,
    probabilities TEXT NOT NULL,     -- JSON {class: probability}
    stats TEXT NOT NULL,             -- JSON image statistics (btc.data.stats.image_statistics)
    embedding TEXT NOT NULL,         -- JSON list of floats: penultimate-layer embedding
    ood INTEGER NOT NULL DEFAULT 0,  -- 1 when the input did not look like a brain MRI
    image BLOB                       -- the upload, only when configured
);
CREATE INDEX IF NOT EXISTS predictions_ts ON predictions (ts);
"""


def utc(moment: datetime) -> datetime:
    """``moment`` in UTC; a naive datetime is taken to be UTC already (the log's and monitoring's rule)."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def utc_text(ts: datetime | str) -> str:
    """A time (datetime or ISO-8601 text) as the log stores it: ISO-8601 in UTC.

    Raises:
        ValueError: ``ts`` is not a datetime or ISO-8601 text.
    """
    if isinstance(ts, str):
        try:
            ts = datetime.fromisoformat(ts)
        except ValueError:
            raise ValueError(f"ts={ts!r} is not an ISO-8601 time, e.g. 2025-03-02T11:30:00+00:00") from None
    if not isinstance(ts, datetime):
        raise ValueError(f"ts={ts!r} ({type(ts).__name__}) is not a time; expected a datetime or ISO-8601 text")
    return utc(ts).isoformat()


def _not_a_log(err: Exception) -> bool:
    """Whether ``err`` says the file is no prediction log (not SQLite, damaged, other tables), not that it is locked."""
    if isinstance(err, pd.errors.DatabaseError):  # pandas wraps the sqlite3 error
        err = err.__cause__
    return type(err) is sqlite3.DatabaseError or (
        isinstance(err, sqlite3.OperationalError) and str(err).startswith(("no such table", "no such column")))


class PredictionLog:
    """Append and read prediction records.

    Args:
        path: the SQLite file (created with its folder on first use).

    Every method raises ValueError, naming the file, when ``path`` is a file but not a
    prediction log (not SQLite, or SQLite without this table's columns).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._ready_for: tuple[int, int] | None = None  # the file (device, inode) whose table is known to exist

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _connect(self) -> sqlite3.Connection:
        # Checked again whenever the file is not the one last set up: a log moved away (rotated,
        # archived) or deleted is started afresh instead of failing every append with "no such table".
        ready = self._ready_for is not None and self._file_identity() == self._ready_for
        if not ready:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.path, timeout=30)
        if not ready:
            try:
                tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if tables - {"sqlite_sequence"} and "predictions" not in tables:  # another program's database
                    con.close()
                    raise ValueError(f"{str(self.path)!r} is not a prediction log: a SQLite database of other tables "
                                     f"({', '.join(sorted(tables)[:5])}); it is left as it was")
                con.execute("PRAGMA journal_mode=WAL")
                con.executescript(SCHEMA)
            except sqlite3.DatabaseError as err:
                con.close()
                if _not_a_log(err):
                    raise self._error(err) from None
                raise
            self._ready_for = self._file_identity()
        return con

    def _error(self, err: Exception) -> ValueError:
        cause = err.__cause__ if isinstance(err, pd.errors.DatabaseError) else err
        return ValueError(f"{str(self.path)!r} is not a prediction log (SQLite): {cause}")

    @contextlib.contextmanager
    def _opened(self) -> Iterator[sqlite3.Connection]:
        """A connection, closed afterwards; an error saying the file is no prediction log becomes a ValueError."""
        con = self._connect()
        try:
            yield con
        except (sqlite3.DatabaseError, pd.errors.DatabaseError) as err:
            if _not_a_log(err):
                raise self._error(err) from None
            raise
        finally:
            con.close()

    def append(self, records: list[dict]) -> None:
        """Append records (keys as in :data:`SCHEMA`; ``ts`` defaults to now).

        ``ts`` may be a datetime or an ISO-8601 string (naive means UTC); it is stored as ISO-8601 UTC,
        the one form :meth:`read`'s time window compares.

        Raises:
            ValueError: a ``ts`` that is not a time.
        """
        now = datetime.now(timezone.utc).isoformat()
        rows = [(utc_text(r["ts"]) if r.get("ts") is not None else now, r["model_name"], str(r["model_version"]),
                 r["predicted"], float(r["confidence"]), float(r["prob_entropy"]), json.dumps(r["probabilities"]),
                 json.dumps(r["stats"]), json.dumps([round(float(v), 5) for v in r["embedding"]]), int(bool(r.get("ood", False))),
                 r.get("image")) for r in records]
        con = self._connect()
        try:
            with con:
                con.executemany(
                    "INSERT INTO predictions (ts, model_name, model_version, predicted, confidence, prob_entropy, "
                    "probabilities, stats, embedding, ood, image) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        finally:
            con.close()

    def rotate(self, archive: str | Path) -> int:
        """Move every row into the prediction log ``archive`` (created, or appended to); returns how many
        left this log.

        Safe while the service appends: the rows up to the last id are copied to the archive, keeping
        their ids, in one transaction, then deleted from this log in another, so a row appended
        meanwhile stays here, and a crash or a lock timeout between the two leaves rows in both
        files, never in neither. Running it again then finishes the job without copying a row twice
        (a row whose id the archive holds is not copied again). (Moving the file away instead is not
        safe under load: SQLite finds the write-ahead log by the file's name, so a worker that still
        has the old file open can commit into the new one's, and rows are lost.)

        Raises:
            ValueError: the log does not exist; ``archive`` is this log; either is not a prediction log;
                the archive holds a different row under an id of this log's (rows of another log, or
                of this one before it was started afresh): archive into a new file.
            sqlite3.OperationalError: a file SQLite cannot open, or a lock held longer than 30 s.
        """
        archive = Path(archive)
        if not self.path.is_file():
            raise ValueError(f"prediction log {str(self.path)!r} does not exist; nothing to rotate")
        if archive.exists() and archive.resolve() == self.path.resolve():
            raise ValueError(f"the archive {str(archive)!r} is the prediction log itself; name another file")
        with self._opened() as con:  # this log is checked before the archive is made
            last = con.execute("SELECT MAX(id) FROM predictions").fetchone()[0]
            if last is None:
                PredictionLog(archive).count()  # nothing to move, but an archive that is no log is still named
                return 0
            PredictionLog(archive)._connect().close()  # the archive is a prediction log, or becomes one
            con.execute("ATTACH DATABASE ? AS archive", (str(archive),))
            try:
                clash = con.execute(
                    "SELECT p.id FROM main.predictions p JOIN archive.predictions a ON a.id = p.id WHERE p.id <= ? "
                    "AND (a.ts IS NOT p.ts OR a.model_version IS NOT p.model_version OR a.embedding IS NOT p.embedding) "
                    "LIMIT 1", (last,)).fetchone()
                if clash:
                    raise ValueError(f"the archive {str(archive)!r} already holds another prediction with id {clash[0]} "
                                     "(rows of another log, or of this one before it was started afresh); rotate "
                                     "into a new archive file")
                columns = "id, ts, model_name, model_version, predicted, confidence, prob_entropy, probabilities, " \
                          "stats, embedding, ood, image"
                with con:  # one transaction writing the archive only; rows an interrupted run copied are there
                    con.execute(f"INSERT INTO archive.predictions ({columns}) SELECT {columns} FROM main.predictions p "
                                "WHERE p.id <= ? AND NOT EXISTS (SELECT 1 FROM archive.predictions a WHERE a.id = p.id) "
                                "ORDER BY p.id", (last,))
                with con:  # then one deleting from this log only
                    return con.execute("DELETE FROM main.predictions WHERE id <= ?", (last,)).rowcount
            finally:
                con.execute("DETACH DATABASE archive")

    def read(self, since: datetime | None = None, until: datetime | None = None) -> pd.DataFrame:
        """Records in ``[since, until)`` (naive bounds mean UTC), with probabilities and stats expanded into columns.

        Columns: ``id, ts, model_name, model_version, predicted, confidence, prob_entropy, ood``,
        ``p_<class>`` per class, one column per image statistic, and ``embedding`` (list).
        An absent log reads as an empty frame.
        """
        if not self.path.is_file():
            return pd.DataFrame()
        query, args = "SELECT id, ts, model_name, model_version, predicted, confidence, prob_entropy, probabilities, " \
                      "stats, embedding, ood FROM predictions WHERE 1=1", []
        if since is not None:
            query, args = query + " AND ts >= ?", args + [utc(since).isoformat()]
        if until is not None:
            query, args = query + " AND ts < ?", args + [utc(until).isoformat()]
        with self._opened() as con:
            df = pd.read_sql_query(query + " ORDER BY id", con, params=args)
        if df.empty:
            return df
        probs = pd.DataFrame([json.loads(p) for p in df.pop("probabilities")]).add_prefix("p_")
        stats = pd.DataFrame([json.loads(s) for s in df.pop("stats")])
        df["embedding"] = [json.loads(e) for e in df["embedding"]]
        df["ts"] = pd.to_datetime(df["ts"], utc=True, format="ISO8601")
        df["ood"] = df["ood"].astype(bool)
        return pd.concat([df, probs, stats], axis=1)

    def count(self) -> int:
        if not self.path.is_file():
            return 0
        with self._opened() as con:
            return int(con.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])
