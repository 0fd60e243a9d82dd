"""Client data: construction, views, and validation that names the client and the field."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import hierfl as hf
from hierfl.data import ClientData, DataError, ModelData


@pytest.fixture
def ragged():
    return {
        "a": {"y": np.array([1.0, 2.0, 3.0]), "x": np.array([0, 1, 0])},
        "b": {"y": np.array([4.0]), "x": np.array([1])},
        "c": {"y": np.array([5.0, 6.0]), "x": np.array([1, 1])},
    }


@pytest.fixture
def frame():
    return pd.DataFrame(
        {
            "county": ["b", "a", "b", "c", "a", "b"],
            "y": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            "x": [0, 1, 0, 1, 1, 0],
        }
    )


# ---------------------------------------------------------------------- construction
def test_from_dict_keeps_order_sizes_and_values(ragged):
    data = ClientData.from_dict(ragged)
    assert data.client_ids == ("a", "b", "c")
    assert data.num_clients == 3 == len(data)
    np.testing.assert_array_equal(data.sizes, [3, 1, 2])
    assert data.num_obs == 6
    assert set(data.field_names) == {"y", "x"}
    np.testing.assert_array_equal(data.fields["y"], [1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(data.client_index, [0, 0, 0, 1, 2, 2])
    for client, record in ragged.items():
        for name, value in record.items():
            np.testing.assert_array_equal(data[client][name], value)
    assert data.index_of("c") == 2
    assert "b" in data and "z" not in data


def test_from_dict_mixed_int_and_float_become_float():
    data = ClientData.from_dict({"a": {"y": np.array([1, 2])}, "b": {"y": np.array([0.5])}})
    assert data.fields["y"].dtype == np.float64
    np.testing.assert_array_equal(data.fields["y"], [1.0, 2.0, 0.5])


def test_boolean_field_becomes_integer():
    data = ClientData.from_dict({"a": {"y": [1.0, 2.0], "flag": [True, False]}})
    assert np.issubdtype(data.fields["flag"].dtype, np.integer)
    np.testing.assert_array_equal(data.fields["flag"], [1, 0])


def test_numpy_scalar_ids_are_plain_python():
    data = ClientData.from_dict({np.int64(3): {"y": [1.0]}, np.int64(7): {"y": [2.0]}})
    assert data.client_ids == (3, 7)
    assert all(type(c) is int for c in data.client_ids)
    assert data.index_of(np.int64(7)) == 1


def test_from_frame_groups_ragged_clients_in_order_of_appearance(frame):
    data = ClientData.from_frame(frame, client="county")
    assert data.client_ids == ("b", "a", "c")
    np.testing.assert_array_equal(data.sizes, [3, 2, 1])
    np.testing.assert_array_equal(data["b"]["y"], [1.0, 3.0, 6.0])
    np.testing.assert_array_equal(data["a"]["x"], [1, 1])
    assert set(data.field_names) == {"y", "x"}
    assert "county" not in data.field_names


def test_from_frame_sorted_and_field_selection(frame):
    data = ClientData.from_frame(frame, client="county", fields=["y"], sort=True)
    assert data.client_ids == ("a", "b", "c")
    assert data.field_names == ("y",)
    np.testing.assert_array_equal(data["c"]["y"], [4.0])


def test_from_frame_matches_from_dict(frame):
    by_frame = ClientData.from_frame(frame, client="county")
    by_dict = ClientData.from_dict(
        {
            c: {"y": g["y"].to_numpy(), "x": g["x"].to_numpy()}
            for c, g in frame.groupby("county", sort=False)
        }
    )
    assert by_frame.client_ids == by_dict.client_ids
    for name in ("y", "x"):
        np.testing.assert_array_equal(by_frame.fields[name], by_dict.fields[name])


def test_as_client_data_accepts_all_three_forms(ragged, frame):
    data = ClientData.from_dict(ragged)
    assert hf.as_client_data(data) is data
    assert hf.as_client_data(ragged).client_ids == data.client_ids
    assert hf.as_client_data(frame, client="county").num_clients == 3
    with pytest.raises(DataError, match="client="):
        hf.as_client_data(frame)
    with pytest.raises(DataError, match="list"):
        hf.as_client_data([1, 2, 3])


# ---------------------------------------------------------------------- views
def test_padded_view_shapes_mask_and_finite_padding(ragged):
    data = ClientData.from_dict(ragged)
    padded, mask = data.padded()
    assert padded["y"].shape == (3, 3) and padded["x"].shape == (3, 3)
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    np.testing.assert_array_equal(padded["y"][mask], data.fields["y"])
    assert np.all(np.isfinite(padded["y"]))
    wide, wide_mask = data.padded(5, dtype=np.float32)
    assert wide["y"].shape == (3, 5) and wide["y"].dtype == np.float32
    assert wide["x"].dtype == data.fields["x"].dtype  # integer fields keep their dtype
    np.testing.assert_array_equal(wide_mask.sum(axis=1), data.sizes)
    with pytest.raises(DataError, match="max_size=2"):
        data.padded(2)


def test_padded_view_of_multidimensional_field():
    data = ClientData.from_dict({"a": {"x": np.ones((2, 3))}, "b": {"x": 2 * np.ones((1, 3))}})
    padded, mask = data.padded()
    assert padded["x"].shape == (2, 2, 3)
    np.testing.assert_array_equal(padded["x"][mask], data.fields["x"])


def test_batch_view(ragged):
    data = ClientData.from_dict(ragged)
    batch = data.batch()
    assert isinstance(batch, ModelData)
    assert batch.num_clients == 3 and batch.num_obs == 6
    np.testing.assert_array_equal(batch["y"], data.fields["y"])
    np.testing.assert_array_equal(batch.client, [0, 0, 0, 1, 2, 2])
    assert batch.get("missing") is None
    assert batch.get("missing", 1) == 1


def test_subset_reorders_and_keeps_rows(ragged):
    data = ClientData.from_dict(ragged)
    sub = data.subset(["c", "a"])
    assert sub.client_ids == ("c", "a")
    np.testing.assert_array_equal(sub.sizes, [2, 3])
    np.testing.assert_array_equal(sub.fields["y"], [5, 6, 1, 2, 3])
    np.testing.assert_array_equal(sub["a"]["x"], ragged["a"]["x"])
    with pytest.raises(KeyError, match="'zz'"):
        data.subset(["a", "zz"])


def test_require_names_missing_field(ragged):
    data = ClientData.from_dict(ragged)
    data.require("y", "x")
    with pytest.raises(DataError, match="'sigma'"):
        data.require("y", "sigma", context="NormalNormal")


# ---------------------------------------------------------------------- validation
def _bad(**fields):
    good = {"y": np.array([1.0, 2.0]), "w": np.array([1.0, 1.0])}
    return {"good": good, "bad": dict(good, **fields)}


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"y": np.array([1.0, np.nan])}, ["NaN", "row 1"]),
        ({"y": np.array([np.inf, 1.0])}, ["infinite", "row 0"]),
        ({"y": np.array([1.0, -np.inf])}, ["infinite"]),
        ({"w": np.array([1.0, 2.0, 3.0])}, ["3 rows"]),
        ({"y": np.array(["1", "2"])}, ["dtype"]),
        ({"y": np.array([1.0, None], dtype=object)}, ["dtype"]),
        ({"y": np.array([1.0 + 1j, 2.0])}, ["dtype"]),
        ({"y": 3.0}, ["scalar"]),
    ],
    ids=["nan", "inf", "neg-inf", "mismatched-lengths", "string", "object", "complex", "scalar"],
)
def test_bad_values_name_client_and_field(fields, words):
    (name,) = fields
    with pytest.raises(DataError) as error:
        ClientData.from_dict(_bad(**fields))
    message = str(error.value)
    assert "'bad'" in message and repr(name) in message, message
    for word in words:
        assert word in message, message


def test_empty_client_is_named():
    with pytest.raises(DataError, match=r"'bad'.*empty"):
        ClientData.from_dict({"good": {"y": [1.0]}, "bad": {"y": np.array([])}})


def test_missing_field_names_client_and_field():
    with pytest.raises(DataError, match=r"client 'bad': missing field 'w'"):
        ClientData.from_dict({"good": {"y": [1.0], "w": [1.0]}, "bad": {"y": [1.0]}})


def test_unexpected_field_names_client_and_field():
    with pytest.raises(DataError, match=r"client 'bad': unexpected field 'z'"):
        ClientData.from_dict({"good": {"y": [1.0]}, "bad": {"y": [1.0], "z": [2.0]}})


def test_row_shape_mismatch_across_clients():
    with pytest.raises(DataError, match=r"client 'bad', field 'x'.*row shape"):
        ClientData.from_dict({"good": {"x": np.ones((1, 3))}, "bad": {"x": np.ones((1, 2))}})


def test_client_record_must_be_a_dict():
    with pytest.raises(DataError, match="client 'bad'"):
        ClientData.from_dict({"good": {"y": [1.0]}, "bad": [1.0, 2.0]})


def test_client_without_fields():
    with pytest.raises(DataError, match="client 'a' has no fields"):
        ClientData.from_dict({"a": {}})


def test_no_clients():
    with pytest.raises(DataError, match="non-empty"):
        ClientData.from_dict({})


def test_unhashable_client_id_rejected():
    with pytest.raises(DataError, match="not hashable"):
        ClientData([["a"]], {"y": np.array([1.0])}, [1])


def test_duplicate_client_ids_named():
    with pytest.raises(DataError, match=r"duplicate client ids: \['a'\]"):
        ClientData(["a", "b", "a"], {"y": np.arange(3.0)}, [1, 1, 1])


def test_flat_constructor_checks_sizes_and_lengths():
    with pytest.raises(DataError, match=r"client 'b' has no observations"):
        ClientData(["a", "b"], {"y": np.arange(2.0)}, [2, 0])
    with pytest.raises(DataError, match=r"field 'y': expected 3 rows"):
        ClientData(["a", "b"], {"y": np.arange(2.0)}, [2, 1])
    with pytest.raises(DataError, match="expected 2 client sizes"):
        ClientData(["a", "b"], {"y": np.arange(2.0)}, [2])
    with pytest.raises(DataError, match="no fields"):
        ClientData(["a"], {}, [1])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.array([1.0, 2.0, np.nan]), "client 'b', field 'y': NaN at row 1"),
        (np.array([np.inf, 1.0, 1.0]), "client 'a', field 'y': infinite value at row 0"),
        (np.array([[1.0, 1.0], [1.0, 1.0], [1.0, np.nan]]), "client 'b', field 'y': NaN at row 1"),
    ],
    ids=["nan", "inf", "nan-in-matrix-row"],
)
def test_flat_constructor_validates_values_naming_the_client(value, message):
    # client "a" owns row 0, client "b" rows 1..2
    with pytest.raises(DataError) as error:
        ClientData(["a", "b"], {"y": value}, [1, 2])
    assert message in str(error.value)


def test_flat_constructor_rejects_string_field():
    # a dtype applies to the whole flat column, so the field is named (no single client is)
    with pytest.raises(DataError, match=r"field 'y': expected numbers, got dtype"):
        ClientData(["a", "b"], {"y": np.array(["a", "b", "c"])}, [1, 2])


def test_unknown_client_id_named(ragged):
    data = ClientData.from_dict(ragged)
    with pytest.raises(KeyError, match="unknown client id 'zz'"):
        data["zz"]
    with pytest.raises(KeyError, match="'zz'"):
        data.index_of("zz")


def test_missing_client_column_named(frame):
    with pytest.raises(DataError, match=r"client column 'state' not in the frame"):
        ClientData.from_frame(frame, client="state")


def test_missing_client_value_named(frame):
    frame.loc[3, "county"] = None
    with pytest.raises(DataError, match=r"client column 'county' is missing at row 3"):
        ClientData.from_frame(frame, client="county")


def test_frame_missing_field_named(frame):
    with pytest.raises(DataError, match="field 'z' not in the frame"):
        ClientData.from_frame(frame, client="county", fields=["y", "z"])


def test_frame_nan_names_client_and_field(frame):
    frame.loc[3, "y"] = np.nan  # row 3 belongs to county "c"
    with pytest.raises(DataError, match=r"client 'c', field 'y': NaN"):
        ClientData.from_frame(frame, client="county")


def test_frame_string_column_names_client_and_field(frame):
    frame["label"] = ["u", "v", "u", "v", "u", "v"]
    with pytest.raises(DataError, match=r"client 'b', field 'label'.*dtype"):
        ClientData.from_frame(frame, client="county")


def test_frame_with_categorical_client_column(frame):
    frame["county"] = frame["county"].astype("category")
    data = ClientData.from_frame(frame, client="county", sort=True)
    assert data.client_ids == ("a", "b", "c")
    np.testing.assert_array_equal(data.sizes, [2, 3, 1])


def test_family_names_missing_field(ragged):
    data = ClientData.from_dict(ragged)
    with pytest.raises(DataError, match=r"NormalNormal needs field 'sigma'"):
        hf.fit(hf.NormalNormal(), data, num_warmup=10, num_samples=10, num_chains=1)
