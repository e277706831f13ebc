"""backend.py: the one place where NumPy and CuPy differ (scatter-add, out-of-range
indices, random streams, device moves). CuPy cases run through the ``backend``
fixture, so they are skipped without a GPU."""
from __future__ import annotations

import numpy as np
import pytest

from minipeft import backend as B
from minipeft.errors import InputError


def test_get_array_module_is_numpy_for_host_data():
    assert B.get_array_module(np.ones(3)) is np
    assert B.get_array_module(np.ones(3), np.zeros(2)) is np
    assert B.get_array_module() is np
    assert B.device_of(np.ones(2)) == "cpu"


def test_get_array_module_follows_the_backend(backend):
    a = backend(np.ones(3))
    xp = B.get_array_module(a)
    assert isinstance(a, xp.ndarray)
    assert B.device_of(a) == backend.device
    assert B.get_array_module(np.ones(2), a) is xp  # any device array decides


@pytest.mark.parametrize("spelling, expected", [
    ("cpu", "cpu"), ("CPU", "cpu"), ("cuda", "cuda"), ("CUDA", "cuda"),
    ("cuda:0", "cuda"), ("cuda:1", "cuda"), ("gpu", "cuda"), ("GPU", "cuda"),
])
def test_normalize_device_spellings(spelling, expected):
    assert B.normalize_device(spelling) == expected


@pytest.mark.parametrize("bad", ["tpu", "", "mps", "cud"])
def test_normalize_device_rejects_unknown_devices(bad):
    with pytest.raises(ValueError, match="unknown device"):
        B.normalize_device(bad)


def test_to_device_rejects_a_bad_device():
    with pytest.raises(ValueError, match="unknown device"):
        B.to_device(np.ones(2), "tpu")


def test_to_numpy_round_trip(backend):
    a = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    on_device = backend(a)
    back = B.to_numpy(on_device)
    assert isinstance(back, np.ndarray)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, a)


def test_to_device_cpu_does_not_copy_host_arrays():
    a = np.ones(3)
    assert B.to_device(a, "cpu") is a
    assert B.to_numpy(a) is a
    np.testing.assert_array_equal(B.to_numpy([1, 2]), np.array([1, 2]))


def test_gpu_available_is_a_bool():
    assert isinstance(B.gpu_available(), bool)


# ----- scatter-add -------------------------------------------------------------------
def test_plain_fancy_add_loses_repeated_indices():
    """The reason scatter_add exists: ``t[idx] += v`` keeps one write per index."""
    idx, values = np.array([0, 2, 2, 2]), np.array([1.0, 1.0, 2.0, 3.0])
    naive = np.zeros(3)
    naive[idx] += values
    assert naive[2] == 3.0  # not 6
    target = np.zeros(3)
    B.scatter_add(target, idx, values)
    np.testing.assert_array_equal(target, [1.0, 0.0, 6.0])


def test_scatter_add_matches_np_add_at_on_rows(backend):
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 5, size=20)  # repeats guaranteed: 20 draws from 5
    values = rng.standard_normal((20, 3))
    expected = rng.standard_normal((5, 3))
    target = backend(expected.copy())
    np.add.at(expected, idx, values)
    B.scatter_add(target, backend(idx), backend(values))
    np.testing.assert_allclose(B.to_numpy(target), expected, rtol=1e-12, atol=1e-12)


def test_scatter_add_with_a_tuple_index(backend):
    rows, cols = np.array([0, 1, 0, 0]), np.array([2, 2, 2, 1])
    values = np.array([1.0, 2.0, 3.0, 4.0])
    expected = np.zeros((2, 3))
    np.add.at(expected, (rows, cols), values)
    target = backend(np.zeros((2, 3)))
    B.scatter_add(target, (backend(rows), backend(cols)), backend(values))
    np.testing.assert_array_equal(B.to_numpy(target), expected)


# ----- index range -------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-1, -7, 10, 11, 1000])
def test_check_index_range_names_what_and_the_bad_id(bad, backend):
    ids = backend(np.array([[0, 3], [bad, 9]]))
    with pytest.raises(InputError, match=rf"^token ids: id {bad} is out of range.*< 10"):
        B.check_index_range(ids, 10, "token ids")


def test_check_index_range_is_a_value_error_too():
    with pytest.raises(ValueError):
        B.check_index_range(np.array([5]), 5, "labels")


def test_check_index_range_passes_valid_and_empty_ids(backend):
    B.check_index_range(backend(np.array([0, 9, 4])), 10, "ids")
    B.check_index_range(backend(np.zeros((0,), dtype=np.int64)), 10, "ids")
    B.check_index_range(backend(np.zeros((2, 0), dtype=np.int64)), 0, "ids")


def test_out_of_range_ids_differ_between_backends_without_the_check(backend):
    """NumPy raises on a too-large id and wraps a negative one; CuPy wraps both. The
    check is what makes the two agree: a bad id is an InputError everywhere."""
    table = backend(np.arange(4.0))
    if backend.name == "numpy":
        with pytest.raises(IndexError):
            table[np.array([4])]
    else:  # CuPy silently wraps 4 -> 0
        assert float(B.to_numpy(table[backend(np.array([4]))])[0]) == 0.0
    assert float(B.to_numpy(table[backend(np.array([-1]))])[0]) == 3.0  # wraps on both
    for bad in (4, -1):
        with pytest.raises(InputError):
            B.check_index_range(backend(np.array([bad])), 4, "ids")


# ----- random numbers ------------------------------------------------------------------
def test_random_generator_accepts_seeds_and_generators():
    g = np.random.default_rng(3)
    assert B.random_generator(g) is g
    a = B.random_generator(5).standard_normal(4)
    np.testing.assert_array_equal(a, np.random.default_rng(5).standard_normal(4))
    assert isinstance(B.random_generator(None), np.random.Generator)


def test_device_random_is_identical_for_the_same_seed(backend):
    def draw(rng):
        return rng.standard_normal((3, 5)).astype(np.float32)

    a = B.device_random(np.random.default_rng(42), draw, backend.device)
    b = B.device_random(np.random.default_rng(42), draw, backend.device)
    assert B.device_of(a) == backend.device
    np.testing.assert_array_equal(B.to_numpy(a), B.to_numpy(b))
    # The host stream decides, so every backend sees the NumPy numbers.
    np.testing.assert_array_equal(B.to_numpy(a), draw(np.random.default_rng(42)))
    c = B.device_random(np.random.default_rng(43), draw, backend.device)
    assert not np.array_equal(B.to_numpy(a), B.to_numpy(c))


def test_device_random_advances_the_generator():
    rng = np.random.default_rng(0)
    first = B.device_random(rng, lambda r: r.random(3), "cpu")
    second = B.device_random(rng, lambda r: r.random(3), "cpu")
    assert not np.array_equal(first, second)
