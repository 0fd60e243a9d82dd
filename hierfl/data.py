"""Ragged per-client data with validation.

Every client holds a different number of observations. :class:`ClientData` stores the
fields of all clients concatenated along the first axis (the *flat* layout, like a CSR
matrix) together with the client offsets, and produces the two views the engines need:

* :meth:`ClientData.padded` — arrays of shape ``[num_clients, max_size, ...]`` with a
  boolean mask, so that one ``jax.vmap`` runs every client;
* :meth:`ClientData.batch` — a :class:`ModelData` with flat fields and a per-observation
  client index, the layout a NumPyro model with one client plate consumes.

The data never leave a client in a federated run: the simulator only hands each client its
own rows. Validation happens once, at construction, and every error names the client and the
field at fault.

Examples
--------
>>> import numpy as np
>>> import hierfl as hf
>>> data = hf.ClientData.from_dict({
...     "a": {"y": np.array([1.0, 2.0, 3.0])},
...     "b": {"y": np.array([0.5])},
... })
>>> data.num_clients, data.sizes.tolist()
(2, [3, 1])
>>> padded, mask = data.padded()
>>> padded["y"].shape, mask.tolist()
((2, 3), [[True, True, True], [True, False, False]])
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = ["ClientData", "DataError", "ModelData"]


class DataError(ValueError):
    """Invalid client data; the message names the client and the field at fault."""


class ModelData(NamedTuple):
    """Flat view of client data for a NumPyro model with one client plate.

    Attributes
    ----------
    fields : dict of str to array
        Each field concatenated over clients, shape ``[num_obs, ...]``.
    client : array of int32, shape ``[num_obs]``
        Index (``0 .. num_clients - 1``) of the client that owns each observation.
    num_clients : int
        Size of the client plate.
    """

    fields: dict[str, Any]
    client: Any
    num_clients: int

    def __getitem__(self, name):  # type: ignore[override]
        if isinstance(name, str):
            return self.fields[name]
        return tuple.__getitem__(self, name)

    def get(self, name: str, default=None):
        """Field ``name``, or ``default`` when the field is absent (e.g. ``y`` at predict time)."""
        return self.fields.get(name, default)

    @property
    def num_obs(self) -> int:
        """Total number of observations over all clients."""
        return int(self.client.shape[0])


def _as_id(client_id: Any) -> Hashable:
    if isinstance(client_id, np.generic):
        client_id = client_id.item()
    if not isinstance(client_id, Hashable):
        raise DataError(f"client id {client_id!r} is not hashable")
    return client_id


def _check_field(client_id, name: str, value) -> np.ndarray:
    try:
        array = np.asarray(value)
    except Exception as error:  # noqa: BLE001 - re-raised with the client and field named
        raise DataError(
            f"client {client_id!r}, field {name!r}: cannot convert to an array ({error})"
        ) from error
    if array.dtype == bool:
        array = array.astype(np.int32)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise DataError(
            f"client {client_id!r}, field {name!r}: expected numbers, got dtype "
            f"{array.dtype} (convert categories to integer codes first)"
        )
    if array.ndim == 0:
        raise DataError(
            f"client {client_id!r}, field {name!r}: expected an array with one "
            "row per observation, got a scalar"
        )
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array)
        if bad.any():
            where = int(np.argwhere(bad.reshape(array.shape[0], -1).any(axis=1))[0, 0])
            kind = "NaN" if np.isnan(array).any() else "infinite value"
            raise DataError(
                f"client {client_id!r}, field {name!r}: {kind} at row {where} "
                "(drop or impute missing values explicitly before fitting)"
            )
    return array


def _check_flat(name: str, array: np.ndarray, ids, offsets) -> np.ndarray:
    """Vectorized dtype and finiteness check of a flat field; errors name the client."""
    if array.dtype == bool:
        array = array.astype(np.int32)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise DataError(
            f"field {name!r}: expected numbers, got dtype {array.dtype} (convert "
            "categories to integer codes first)"
        )
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            client = int(np.searchsorted(offsets, row, side="right") - 1)
            kind = "NaN" if np.isnan(array[row]).any() else "infinite value"
            raise DataError(
                f"client {ids[client]!r}, field {name!r}: {kind} at row "
                f"{row - offsets[client]} (drop or impute missing values explicitly "
                "before fitting)"
            )
    return array


#: :meth:`ClientData.size_groups` rounds sizes onto a grid of at most this many values
MAX_GROUPING_SIZES = 512
#: drivers group clients by size (:meth:`ClientData.size_groups`) only when that cuts the
#: padded rows at least this many times (each group is one more compiled program)
MIN_GROUPING_GAIN = 2.0


class ClientData:
    """Per-client data of different sizes, validated and stored flat.

    Build it with :meth:`from_dict` or :meth:`from_frame`; the constructor takes the already
    flat layout.

    Parameters
    ----------
    client_ids : sequence of hashable
        One id per client, in order; ids must be unique.
    fields : mapping of str to array
        Each field concatenated over clients, shape ``[num_obs, ...]``.
    sizes : sequence of int
        Number of observations of each client; every size must be at least 1.
    """

    def __init__(
        self, client_ids: Sequence[Hashable], fields: Mapping[str, Any], sizes: Sequence[int]
    ):
        ids = tuple(_as_id(c) for c in client_ids)
        sizes = np.asarray(sizes, dtype=np.int64)
        if len(ids) == 0:
            raise DataError("no clients: the data must hold at least one client")
        if len(set(ids)) != len(ids):
            seen, duplicates = set(), []
            for c in ids:
                if c in seen:
                    duplicates.append(c)
                seen.add(c)
            raise DataError(f"duplicate client ids: {duplicates[:5]!r}")
        if sizes.shape != (len(ids),):
            raise DataError(f"expected {len(ids)} client sizes, got shape {sizes.shape}")
        empty = np.flatnonzero(sizes < 1)
        if empty.size:
            raise DataError(f"client {ids[empty[0]]!r} has no observations (empty client)")
        if not fields:
            raise DataError("no fields: each client needs at least one field")
        total = int(sizes.sum())
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        checked = {}
        for name, value in fields.items():
            array = np.asarray(value)
            if array.ndim == 0 or array.shape[0] != total:
                raise DataError(
                    f"field {name!r}: expected {total} rows in total, got shape {array.shape}"
                )
            checked[name] = _check_flat(name, array, ids, offsets)
        self._ids = ids
        self._index = {c: i for i, c in enumerate(ids)}
        self._fields = checked
        self._sizes = sizes
        self._offsets = np.concatenate([[0], np.cumsum(sizes)])

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, clients: Mapping[Hashable, Mapping[str, Any]]) -> ClientData:
        """Build from ``{client_id: {field: array}}``.

        Every client must have the same fields, each with one row per observation.

        Examples
        --------
        >>> import hierfl as hf
        >>> hf.ClientData.from_dict({"x": {"y": [1.0]}, "z": {"y": [2.0, 3.0]}}).sizes.tolist()
        [1, 2]
        """
        if not isinstance(clients, Mapping) or len(clients) == 0:
            raise DataError("expected a non-empty dict {client_id: {field: array}}")
        ids = list(clients)
        names = None
        columns: dict[str, list[np.ndarray]] = {}
        sizes = []
        for client_id in ids:
            record = clients[client_id]
            if not isinstance(record, Mapping):
                raise DataError(
                    f"client {client_id!r}: expected a dict of fields, got {type(record).__name__}"
                )
            if names is None:
                names = list(record)
                if not names:
                    raise DataError(f"client {client_id!r} has no fields")
                columns = {n: [] for n in names}
            missing = [n for n in names if n not in record]
            extra = [n for n in record if n not in names]
            if missing:
                raise DataError(f"client {client_id!r}: missing field {missing[0]!r}")
            if extra:
                raise DataError(
                    f"client {client_id!r}: unexpected field {extra[0]!r} (other "
                    f"clients have {names})"
                )
            size = None
            for name in names:
                array = _check_field(client_id, name, record[name])
                if size is None:
                    size = array.shape[0]
                elif array.shape[0] != size:
                    raise DataError(
                        f"client {client_id!r}, field {name!r}: {array.shape[0]} rows "
                        f"but field {names[0]!r} has {size}"
                    )
                columns[name].append(array)
            if size == 0:
                raise DataError(f"client {client_id!r} has no observations (empty client)")
            sizes.append(size)
        fields = {}
        for name, parts in columns.items():
            trailing = {p.shape[1:] for p in parts}
            if len(trailing) > 1:
                for client_id, p in zip(ids, parts, strict=True):
                    if p.shape[1:] != parts[0].shape[1:]:
                        raise DataError(
                            f"client {client_id!r}, field {name!r}: row shape "
                            f"{p.shape[1:]} differs from {parts[0].shape[1:]} of "
                            f"client {ids[0]!r}"
                        )
            kinds = {np.issubdtype(p.dtype, np.floating) for p in parts}
            fields[name] = np.concatenate(parts).astype(
                np.float64 if True in kinds else np.result_type(*parts)
            )
        return cls(ids, fields, sizes)

    @classmethod
    def from_frame(
        cls, frame, *, client: str, fields: Iterable[str] | None = None, sort: bool = False
    ) -> ClientData:
        """Build from a pandas frame with one row per observation and a client column.

        Parameters
        ----------
        frame : pandas.DataFrame
        client : str
            Column holding the client id of each row.
        fields : iterable of str, optional
            Columns to keep (default: every column but ``client``).
        sort : bool
            Order clients by id (default: order of first appearance).

        Examples
        --------
        >>> import pandas as pd
        >>> import hierfl as hf
        >>> df = pd.DataFrame({"county": ["a", "b", "a"], "y": [1.0, 2.0, 3.0]})
        >>> data = hf.ClientData.from_frame(df, client="county")
        >>> data.client_ids, data["a"]["y"].tolist()
        (('a', 'b'), [1.0, 3.0])
        """
        if client not in frame.columns:
            raise DataError(
                f"client column {client!r} not in the frame (columns: {list(frame.columns)})"
            )
        if frame[client].isna().any():
            row = frame.index[frame[client].isna()][0]
            raise DataError(f"client column {client!r} is missing at row {row!r}")
        names = [c for c in frame.columns if c != client] if fields is None else list(fields)
        for name in names:
            if name not in frame.columns:
                raise DataError(f"field {name!r} not in the frame (columns: {list(frame.columns)})")
        groups = frame.groupby(client, sort=sort, observed=True)
        return cls.from_dict(
            {key: {n: group[n].to_numpy() for n in names} for key, group in groups}
        )

    # ------------------------------------------------------------------ access
    @property
    def client_ids(self) -> tuple:
        """Client ids in plate order."""
        return self._ids

    @property
    def num_clients(self) -> int:
        return len(self._ids)

    @property
    def sizes(self) -> np.ndarray:
        """Number of observations per client, shape ``[num_clients]``."""
        return self._sizes

    @property
    def num_obs(self) -> int:
        return int(self._offsets[-1])

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(self._fields)

    @property
    def fields(self) -> dict[str, np.ndarray]:
        """Flat fields, each of shape ``[num_obs, ...]``."""
        return dict(self._fields)

    @property
    def client_index(self) -> np.ndarray:
        """Plate index of the client of each observation, shape ``[num_obs]``."""
        return np.repeat(np.arange(self.num_clients, dtype=np.int32), self._sizes)

    def index_of(self, client_id: Hashable) -> int:
        """Plate index of ``client_id``; raises ``KeyError`` naming the id if unknown."""
        try:
            return self._index[_as_id(client_id)]
        except KeyError:
            raise KeyError(f"unknown client id {client_id!r}") from None

    def __contains__(self, client_id) -> bool:
        try:
            return _as_id(client_id) in self._index
        except DataError:
            return False

    def __getitem__(self, client_id: Hashable) -> dict[str, np.ndarray]:
        """The fields of one client."""
        i = self.index_of(client_id)
        lo, hi = self._offsets[i], self._offsets[i + 1]
        return {name: array[lo:hi] for name, array in self._fields.items()}

    def __len__(self) -> int:
        return self.num_clients

    def __repr__(self) -> str:
        return (
            f"ClientData({self.num_clients} clients, {self.num_obs} observations, "
            f"fields={list(self._fields)}, sizes {self._sizes.min()}..{self._sizes.max()})"
        )

    def require(self, *names: str, context: str = "this model") -> None:
        """Raise :class:`DataError` unless every field in ``names`` is present."""
        for name in names:
            if name not in self._fields:
                raise DataError(
                    f"{context} needs field {name!r}; the data have {list(self._fields)}"
                )

    def require_rows(self, name: str, valid, what: str, *, context: str = "this model") -> None:
        """Raise :class:`DataError` naming the first client, field and row where ``valid``
        (one boolean per row, e.g. ``data.fields["y"] >= 0``) is false.

        >>> data = ClientData.from_dict({"a": {"y": [1, 2]}, "b": {"y": [3, -1]}})
        >>> data.require_rows("y", data.fields["y"] >= 0, "must be >= 0")
        Traceback (most recent call last):
        ...
        hierfl.data.DataError: this model: client 'b', field 'y', row 1: must be >= 0 (got -1)
        """
        valid = np.asarray(valid, dtype=bool).reshape(self.num_obs, -1).all(axis=1)
        if valid.all():
            return
        row = int(np.flatnonzero(~valid)[0])
        position = int(self.client_index[row])
        value = self._fields[name][row]
        value = value.item() if np.ndim(value) == 0 else value
        raise DataError(
            f"{context}: client {self._ids[position]!r}, field {name!r}, row "
            f"{row - int(self._offsets[position])}: {what} (got {value!r})"
        )

    def subset(self, client_ids: Iterable[Hashable]) -> ClientData:
        """A new :class:`ClientData` holding only ``client_ids`` (in the order given)."""
        ids = list(client_ids)
        rows = np.concatenate(
            [np.arange(self._offsets[i], self._offsets[i + 1]) for i in map(self.index_of, ids)]
        )
        return ClientData(
            ids,
            {n: a[rows] for n, a in self._fields.items()},
            self._sizes[[self.index_of(c) for c in ids]],
        )

    # ------------------------------------------------------------------ views
    def padded(self, max_size: int | None = None, *, dtype=None, clients=None):
        """Stack clients on a leading axis, padding each to ``max_size`` rows.

        ``clients`` (positions in client order) stacks only those clients; ``max_size``
        defaults to the largest of them.

        Returns
        -------
        fields : dict of str to ndarray, each ``[num_clients, max_size, ...]``
            Padding rows repeat the client's first row, so every padded value is finite.
        mask : ndarray of bool, ``[num_clients, max_size]``
            True on real observations.
        """
        chosen = np.arange(self.num_clients) if clients is None else np.asarray(clients)
        sizes = self._sizes[chosen]
        width = int(sizes.max()) if max_size is None else int(max_size)
        if width < sizes.max():
            raise DataError(
                f"max_size={width} is smaller than the largest client ({sizes.max()} rows)"
            )
        position = np.arange(width)
        mask = position[None, :] < sizes[:, None]
        rows = self._offsets[chosen, None] + np.where(mask, position[None, :], 0)
        out = {}
        for name, array in self._fields.items():
            value = array[rows]
            if dtype is not None and np.issubdtype(value.dtype, np.floating):
                value = value.astype(dtype)
            out[name] = value
        return out, mask

    def size_groups(self, max_groups: int, *, min_gain: float = 1.0) -> list[np.ndarray]:
        """Split the clients into at most ``max_groups`` groups of similar size, choosing the
        group boundaries (in order of size) that minimize the total padded rows
        ``sum(len(group) * max size in group)`` (dynamic programming over the distinct
        sizes). Returns each group's client positions; empty groups are dropped.

        Grouping costs one compiled program per group, so with ``min_gain`` the clients stay
        in one group unless the groups cut the padded rows at least that many times (see
        :data:`MIN_GROUPING_GAIN`).

        >>> data = ClientData.from_dict({c: {"y": np.zeros(n)} for c, n in
        ...                              zip("abcd", [2, 30, 3, 31])})
        >>> [g.tolist() for g in data.size_groups(2)]
        [[0, 2], [1, 3]]
        >>> [g.tolist() for g in data.size_groups(2, min_gain=MIN_GROUPING_GAIN)]
        [[0, 1, 2, 3]]
        """
        groups = self._size_groups(max_groups)
        padded_rows = sum(len(g) * int(self._sizes[g].max()) for g in groups)
        if padded_rows * min_gain > self.num_clients * int(self._sizes.max()):
            return [np.arange(self.num_clients)]
        return groups

    def _size_groups(self, max_groups: int) -> list[np.ndarray]:
        sizes = self._sizes
        values, counts = np.unique(sizes, return_counts=True)
        if len(values) > MAX_GROUPING_SIZES:  # round up onto a geometric grid first
            grid = np.unique(np.ceil(np.geomspace(values[0], values[-1], MAX_GROUPING_SIZES)))
            values, counts = np.unique(grid[np.searchsorted(grid, sizes)], return_counts=True)
        cumulative = np.concatenate([[0], np.cumsum(counts)])
        unique = len(values)
        groups = max(1, min(int(max_groups), unique))
        cost = np.full((groups + 1, unique + 1), np.inf)
        cost[0, 0] = 0.0
        choice = np.zeros((groups + 1, unique + 1), dtype=int)
        for k in range(1, groups + 1):
            for j in range(1, unique + 1):
                options = cost[k - 1, :j] + (cumulative[j] - cumulative[:j]) * values[j - 1]
                choice[k, j] = int(np.argmin(options))
                cost[k, j] = options[choice[k, j]]
        bounds, j = [], unique
        for k in range(groups, 0, -1):
            bounds.append(values[j - 1])
            j = choice[k, j]
        edges = np.array(sorted(set(bounds)))
        # every size goes to the first group whose largest size covers it
        which = np.searchsorted(edges, np.minimum(sizes, edges[-1]))
        return [np.flatnonzero(which == g) for g in range(len(edges)) if np.any(which == g)]

    def batch(self) -> ModelData:
        """Flat :class:`ModelData` for a NumPyro model with one client plate."""
        return ModelData(dict(self._fields), self.client_index, self.num_clients)
