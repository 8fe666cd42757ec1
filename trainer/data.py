"""Interaction-log readers.

Every reader returns an :class:`Interactions`: one chronologically ordered item sequence per user, item ids as
strings (the ids the daemon speaks), model tokens ``1..N`` (``0`` is padding), optional event types and optional
item attributes used by the daemon's category filter.

Supported shapes
----------------
* **Sequence files** (S3-Rec / FMLP-Rec ``Beauty.txt``): one user per line, ``user item_1 item_2 ... item_n`` in
  chronological order. A sibling ``<stem>_item2attributes.json`` (``{"item": [attr, ...]}``) is read when present.
* **Pair files** (BERT4Rec ``beauty.txt``): ``user item`` per line, lines in chronological order per user.
* **Tables** (CSV / TSV / ``;``-separated, with or without a header) of ``user, item, timestamp[, event_type]``:
  the separator is sniffed; header names are matched against common aliases (``user_id``, ``visitorid``,
  ``session_id``, ``product_id``, ``event_time``, ``behavior_type``, ``category_id`` ...); headerless files have
  their columns inferred from content (a column of event words is the event type, a column of unix times is the
  timestamp), or named explicitly with ``columns``.

Event types are normalised to ``view`` / ``cart`` / ``purchase`` (``pv``/``click`` -> view, ``fav``/``addtocart``
-> cart, ``buy``/``transaction`` -> purchase); ``remove_from_cart`` and unknown events are dropped and counted.
Consecutive repeats of the same item by the same user are collapsed into one interaction (keeping the strongest
event), as is usual for sequential recommenders.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

EVENT_TYPES = ("view", "cart", "purchase")
EVENT_CODES = {name: code for code, name in enumerate(EVENT_TYPES)}
_EVENT_ALIASES = {
    "view": "view", "pv": "view", "click": "view", "clicks": "view", "page_view": "view", "detail": "view",
    "cart": "cart", "addtocart": "cart", "add_to_cart": "cart", "fav": "cart", "favorite": "cart",
    "wishlist": "cart",
    "purchase": "purchase", "buy": "purchase", "transaction": "purchase", "order": "purchase",
}
_DROPPED_EVENTS = {"remove_from_cart", "removefromcart"}

_USER_ALIASES = ("user_id", "userid", "user", "visitorid", "visitor_id", "customer_id", "reviewerid",
                 "session_id", "sessionid", "session", "user_session")
_ITEM_ALIASES = ("item_id", "itemid", "item", "product_id", "productid", "product", "sku", "asin")
_TIME_ALIASES = ("timestamp", "ts", "time", "event_time", "datetime", "unixreviewtime", "eventdate", "date",
                 "timeframe")
_EVENT_ALIASES_COL = ("event_type", "event", "behavior_type", "behavior", "behaviour", "action", "type")
_CATEGORY_ALIASES = ("category_id", "categoryid", "category", "category_code")
ROLES = ("user", "item", "time", "event", "category", "-")

EMBEDDED_DIR = Path(__file__).resolve().parent / "datasets" / "amazon_beauty_s3rec"
EMBEDDED_DATA = EMBEDDED_DIR / "Beauty.txt"


class DataError(ValueError):
    """The interaction log cannot be read; the message names the file, the line or column, and the fix."""


@dataclasses.dataclass
class Interactions:
    """Users' chronological item sequences.

    Attributes:
        item_ids: external item id (str) of model token ``t`` is ``item_ids[t - 1]``; length N.
        user_ids: external user id (str) per sequence.
        sequences: per user an int64 array of model tokens in ``1..N``, oldest first.
        events: per user an int8 array of event codes (``EVENT_CODES``) aligned with ``sequences``, or None
            when the log has no event types (every interaction then counts as a view).
        item_attributes: per item (by row ``t - 1``) a list of attribute strings (category / brand ids), or None.
        source: where the data came from (paths, format, sha256 fingerprint, counters).
    """

    item_ids: list[str]
    user_ids: list[str]
    sequences: list[np.ndarray]
    events: list[np.ndarray] | None
    item_attributes: list[list[str]] | None
    source: dict

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def popularity(self) -> np.ndarray:
        """Interaction count per item row, float64 array of shape [N] (training part only: the last two items of
        every evaluable user are left out so the popularity list never sees a test target)."""
        counts = np.zeros(self.num_items, dtype=np.float64)
        for seq in self.sequences:
            train = seq[:-2] if len(seq) >= 3 else seq
            np.add.at(counts, train - 1, 1.0)
        return counts

    def summary(self) -> dict:
        lengths = np.array([len(s) for s in self.sequences]) if self.sequences else np.zeros(1)
        return {"users": self.num_users, "items": self.num_items, "interactions": self.num_interactions,
                "avg_seq_len": round(float(lengths.mean()), 3), "max_seq_len": int(lengths.max()),
                "has_events": self.events is not None, "has_attributes": self.item_attributes is not None}


def fingerprint(paths: Iterable[Path]) -> str:
    """sha256 over the bytes of ``paths`` (in the given order), hex string prefixed ``sha256:``."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


def load(path: str | os.PathLike | None = None, *, columns: Sequence[str] | str | None = None,
         attributes: str | os.PathLike | None = None) -> Interactions:
    """Read an interaction log in any supported shape (see the module docstring).

    Args:
        path: file to read; None reads the embedded Amazon Beauty (S3-Rec) copy.
        columns: table column roles, e.g. ``"user,item,category,event,time"`` (headerless: one role per column, in
            order; ``-`` skips a column) or ``"user=session_id,item=item_id,time=eventdate"`` (by header name).
        attributes: optional item-attribute JSON ``{"item": [attr, ...]}``.

    Raises:
        DataError: unreadable file, unknown shape, missing columns, fewer than 2 items or 1 user.
    """
    path = Path(path) if path is not None else EMBEDDED_DATA
    if not path.is_file():
        raise DataError(f"{path}: no such file (pass --data PATH to an interaction log)")
    kind = "table" if columns else _sniff_kind(path)
    if kind == "sequence":
        data = _read_sequences(path)
    elif kind == "pairs":
        data = _read_pairs(path)
    else:
        data = _read_table(path, columns)
    attr_path = Path(attributes) if attributes else _sibling_attributes(path)
    paths = [path]
    if attr_path is not None:
        data.item_attributes = _read_attributes(attr_path, data.item_ids)
        paths.append(attr_path)
        data.source["attributes_path"] = str(attr_path)
    data.source.update(path=str(path), format=kind, fingerprint=fingerprint(paths))
    if data.num_items < 2 or data.num_users < 1:
        raise DataError(f"{path}: found {data.num_users} users and {data.num_items} items; need at least 1 and 2")
    return data


def _sibling_attributes(path: Path) -> Path | None:
    cand = path.with_name(path.stem + "_item2attributes.json")
    return cand if cand.is_file() else None


def _sniff_kind(path: Path) -> str:
    """'sequence' (user + >= 1 items per line, whitespace), 'pairs' (exactly 2 ints per line) or 'table'."""
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        lines = [ln.strip() for _, ln in zip(range(200), f) if ln.strip()]
    if not lines:
        raise DataError(f"{path}: file is empty")
    if all(not any(c in ln for c in ",;\t") for ln in lines):
        widths = {len(ln.split()) for ln in lines}
        if widths == {2}:
            return "pairs"
        if min(widths) >= 2:
            return "sequence"
    return "table"


class _Builder:
    """Accumulates (user, item, event) in chronological order and builds an Interactions."""

    def __init__(self):
        self.item_index: dict[str, int] = {}
        self.user_index: dict[str, int] = {}
        self.seqs: list[list[int]] = []
        self.evs: list[list[int]] = []
        self.collapsed = 0

    def add(self, user: str, item: str, event: int = 0) -> None:
        u = self.user_index.get(user)
        if u is None:
            u = self.user_index[user] = len(self.seqs)
            self.seqs.append([])
            self.evs.append([])
        t = self.item_index.get(item)
        if t is None:
            t = self.item_index[item] = len(self.item_index) + 1
        seq, ev = self.seqs[u], self.evs[u]
        if seq and seq[-1] == t:
            ev[-1] = max(ev[-1], event)
            self.collapsed += 1
            return
        seq.append(t)
        ev.append(event)

    def build(self, with_events: bool, source: dict) -> Interactions:
        source = dict(source, collapsed_repeats=self.collapsed)
        return Interactions(
            item_ids=list(self.item_index), user_ids=list(self.user_index),
            sequences=[np.asarray(s, dtype=np.int64) for s in self.seqs],
            events=[np.asarray(e, dtype=np.int8) for e in self.evs] if with_events else None,
            item_attributes=None, source=source)


def _read_sequences(path: Path) -> Interactions:
    b = _Builder()
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise DataError(f"{path}:{lineno}: expected 'user item_1 ... item_n', got {line.strip()!r}")
            user = parts[0]
            for item in parts[1:]:
                b.add(user, item)
    return b.build(False, {})


def _read_pairs(path: Path) -> Interactions:
    b = _Builder()
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise DataError(f"{path}:{lineno}: expected 'user item', got {line.strip()!r}")
            b.add(parts[0], parts[1])
    return b.build(False, {})


def _parse_columns(spec: Sequence[str] | str | None) -> tuple[list[str] | None, dict[str, list[str]] | None]:
    """``"user,item,time"`` -> positional roles; ``"user=a,time=b+c"`` -> {role: [header names]}."""
    if spec is None:
        return None, None
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    if all("=" in p for p in parts):
        named: dict[str, list[str]] = {}
        for p in parts:
            role, _, names = p.partition("=")
            role = role.strip().lower()
            if role not in ROLES[:-1]:
                raise DataError(f"columns: unknown role {role!r}; roles are {', '.join(ROLES[:-1])}")
            named[role] = [n.strip() for n in names.split("+") if n.strip()]
        return None, named
    if any("=" in p for p in parts):
        raise DataError("columns: use either 'user,item,time' (by position) or 'user=NAME,...' (by header name)")
    roles = [p.lower() for p in parts]
    for r in roles:
        if r not in ROLES:
            raise DataError(f"columns: unknown role {r!r}; roles are {', '.join(ROLES)} ('-' skips a column)")
    return roles, None


def _sniff_dialect(path: Path) -> tuple[str, bool]:
    with open(path, "r", encoding="utf-8", errors="replace", newline="") as f:
        sample = f.read(64 * 1024)
    first = sample.splitlines()[0] if sample else ""
    try:
        sep = csv.Sniffer().sniff(sample.rsplit("\n", 1)[0] if "\n" in sample else sample,
                                  delimiters=",;\t|").delimiter
    except csv.Error:
        sep = "," if "," in first else ("\t" if "\t" in first else (";" if ";" in first else None))
        if sep is None:
            raise DataError(f"{path}: cannot tell the column separator (expected ',', ';', tab or '|')")
    head = [_norm_header(h) for h in first.split(sep)]
    known = set(_USER_ALIASES + _ITEM_ALIASES + _TIME_ALIASES + _EVENT_ALIASES_COL + _CATEGORY_ALIASES)
    has_header = any(h in known for h in head)
    return sep, has_header


def _read_table(path: Path, columns) -> Interactions:
    import pandas as pd

    positional, named = _parse_columns(columns)
    sep, has_header = _sniff_dialect(path)
    if named:
        has_header = True  # columns named by header: the first row is the header, whatever its names
    try:
        df = pd.read_csv(path, sep=sep, header=0 if has_header else None, dtype=str, keep_default_na=False,
                         skipinitialspace=True, on_bad_lines="error", engine="c")
    except Exception as exc:  # pandas raises several parser error types
        raise DataError(f"{path}: cannot parse as a '{sep}'-separated table: {exc}") from exc
    df.columns = [_norm_header(c) if has_header else str(c) for c in df.columns]
    if has_header:
        roles = _roles_from_header(path, df, named, positional)
    else:
        if named:
            raise DataError(f"{path}: has no header row, so columns must be given by position, "
                            f"e.g. --columns user,item,time,event")
        roles = _roles_from_content(path, df, positional)
    return _build_from_frame(path, df, roles, has_header)


def _norm_header(name) -> str:
    """Lower-case, unquoted, without RecBole's ``:token`` / ``:float`` type suffix."""
    return str(name).strip().strip('"').split(":", 1)[0].strip().lower()


def _missing_ratio(col) -> float:
    return float(((col == "") | (col.str.upper() == "NA") | (col.str.lower() == "nan")).mean())


def _roles_from_header(path, df, named, positional) -> dict[str, list[str]]:
    cols = list(df.columns)
    if positional:
        if len(positional) != len(cols):
            raise DataError(f"{path}: --columns names {len(positional)} roles but the file has {len(cols)} columns")
        roles: dict[str, list[str]] = {}
        for r, c in zip(positional, cols):
            if r != "-":
                roles.setdefault(r, []).append(c)
        return roles
    if named:
        for r, names in named.items():
            for n in names:
                if n.lower() not in cols:
                    raise DataError(f"{path}: column {n!r} (for {r}) not in the header {cols}")
        return {r: [n.lower() for n in names] for r, names in named.items()}
    roles = {}
    for c in _USER_ALIASES:
        if c in cols and _missing_ratio(df[c]) < 0.5:
            roles["user"] = [c]
            break
    for role, aliases in (("item", _ITEM_ALIASES), ("event", _EVENT_ALIASES_COL), ("category", _CATEGORY_ALIASES)):
        for c in aliases:
            if c in cols:
                roles[role] = [c]
                break
    times = [c for c in _TIME_ALIASES if c in cols]
    if times:
        roles["time"] = times
    for need in ("user", "item"):
        if need not in roles:
            raise DataError(f"{path}: no {need} column found in the header {cols}; "
                            f"name it with --columns {need}=COLUMN")
    return roles


def _roles_from_content(path, df, positional) -> dict[str, list[str]]:
    cols = list(df.columns)
    if positional:
        if len(positional) != len(cols):
            raise DataError(f"{path}: --columns names {len(positional)} roles but the file has {len(cols)} columns")
        roles: dict[str, list[str]] = {}
        for r, c in zip(positional, cols):
            if r != "-":
                roles.setdefault(r, []).append(c)
        return roles
    sample = df.head(2000)
    vocab = set(_EVENT_ALIASES) | _DROPPED_EVENTS
    roles = {"user": [cols[0]], "item": [cols[1]]} if len(cols) >= 2 else {}
    if len(cols) < 2:
        raise DataError(f"{path}: needs at least 2 columns (user, item)")
    rest = cols[2:]
    event_cols = [c for c in rest if sample[c].str.lower().isin(vocab).mean() > 0.9]
    if event_cols:
        roles["event"] = [event_cols[0]]
    numeric = [c for c in rest if c not in event_cols and _numeric_ratio(sample[c]) > 0.99]
    time_cols = [c for c in numeric if _to_float(sample[c]).min() > 1e8]
    if time_cols:
        roles["time"] = [time_cols[-1]]
    elif len(rest) >= 1 and rest[0] not in event_cols:
        roles["time"] = [rest[0]]
    left = [c for c in rest if c not in event_cols and c not in roles.get("time", [])]
    if len(left) == 1:
        roles["category"] = left
    elif len(left) > 1:
        raise DataError(f"{path}: cannot tell what columns {left} hold; name every column with --columns, "
                        f"e.g. --columns user,item,category,event,time")
    return roles


def _numeric_ratio(col) -> float:
    import pandas as pd
    return float(pd.to_numeric(col, errors="coerce").notna().mean())


def _to_float(col):
    import pandas as pd
    return pd.to_numeric(col, errors="coerce")


def _time_key(path, col):
    import pandas as pd
    num = pd.to_numeric(col, errors="coerce")
    if num.notna().mean() > 0.99:
        return num.to_numpy(dtype=np.float64)
    dt = pd.to_datetime(col.str.replace(" UTC", "", regex=False), errors="coerce", utc=True, format="mixed")
    if dt.notna().mean() < 0.99:
        bad = col[dt.isna()].iloc[0]
        raise DataError(f"{path}: time column {col.name!r} holds {bad!r}, neither a number nor a date")
    # Rows whose time cannot be read come back as NaN and are dropped (and counted) by the caller.
    return (dt - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy(dtype=np.float64, na_value=np.nan)


def _build_from_frame(path, df, roles, has_header) -> Interactions:
    n0 = len(df)
    user = df[roles["user"][0]]
    item = df[roles["item"][0]]
    keep = ~((user == "") | (item == "") | (user.str.upper() == "NA") | (item.str.upper() == "NA"))
    dropped_events = 0
    if "event" in roles:
        ev_raw = df[roles["event"][0]].str.strip().str.lower()
        mapped = ev_raw.map(_EVENT_ALIASES)
        unknown = mapped.isna()
        dropped_events = int(unknown.sum())
        if dropped_events:
            log.warning("%s: dropped %d rows with events outside view/cart/purchase (%s)", path, dropped_events,
                        ", ".join(sorted(set(ev_raw[unknown].head(1000)))[:5]))
        keep &= ~unknown
        codes = mapped.map(EVENT_CODES)
    order_keys = []
    no_time = 0
    if "time" in roles:
        for c in roles["time"]:
            key = _time_key(path, df[c])
            missing = np.isnan(key) & keep.to_numpy()
            no_time += int(missing.sum())
            keep &= ~missing
            order_keys.append(key)
        if no_time:
            log.warning("%s: dropped %d rows without a readable time (e.g. a truncated last line)", path, no_time)
    keep_np = keep.to_numpy()
    idx = np.flatnonzero(keep_np)
    user_np = user.to_numpy()[idx]
    item_np = item.to_numpy()[idx]
    # First-appearance order of users, then time keys (primary first), then file order: a stable sort.
    _, first = np.unique(user_np, return_inverse=True)
    first_seen = np.full(first.max() + 1 if len(first) else 0, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first_seen, first, np.arange(len(first)))
    sort_cols = [np.arange(len(idx))] + [k[idx] for k in reversed(order_keys)] + [first_seen[first]]
    order = np.lexsort(sort_cols)
    ev_np = codes.to_numpy()[idx].astype(np.int64) if "event" in roles else None
    b = _Builder()
    for j in order:
        b.add(str(user_np[j]).strip(), str(item_np[j]).strip(), int(ev_np[j]) if ev_np is not None else 0)
    data = b.build("event" in roles, {"rows": n0, "rows_dropped": int(n0 - len(idx)),
                                       "dropped_events": dropped_events, "dropped_no_time": no_time,
                                       "columns": {r: c for r, c in roles.items()}, "header": has_header})
    if "category" in roles:
        cat = df[roles["category"][0]].to_numpy()[idx]
        attrs: list[list[str]] = [[] for _ in range(data.num_items)]
        index = {it: t - 1 for t, it in enumerate(data.item_ids, 1)}
        for it, c in zip(item_np, cat):
            c = str(c).strip()
            r = index[str(it).strip()]
            if c and c not in attrs[r]:
                attrs[r].append(c)
        data.item_attributes = attrs
    return data


def _read_attributes(path: Path, item_ids: list[str]) -> list[list[str]]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read item attributes: {exc}") from exc
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object {{item: [attribute, ...]}}")
    out = []
    for it in item_ids:
        vals = raw.get(it, [])
        if not isinstance(vals, list):
            vals = [vals]
        out.append([str(v) for v in vals])
    return out
