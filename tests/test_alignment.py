import numpy as np
import pytest
import torch

from lightning_entk.alignment import (
    cyclic_shift,
    feature_alignment,
    subspace_overlap,
    symmetry_rotation,
)

TOL = 1e-10


def random_rotation(k, seed=0):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(k, k)))
    return q * np.sign(np.diag(r))


def fourier_family(p, frequencies, coordinate):
    """cos/sin columns of one coordinate over the p x p grid (row a * p + b), pair by pair."""
    a, b = np.divmod(np.arange(p * p), p)
    x = 2 * np.pi * (a if coordinate == "a" else b) / p
    return np.stack(
        [f(k * x) for k in frequencies for f in (np.cos, np.sin)],
        axis=1,
    )


def test_subspace_overlap_identical_is_one():
    v = np.random.default_rng(0).normal(size=(30, 4))
    assert subspace_overlap(v, v) == pytest.approx(1.0, abs=TOL)


def test_subspace_overlap_orthogonal_is_zero():
    eye = np.eye(10)
    assert subspace_overlap(eye[:, :3], eye[:, 3:7]) == pytest.approx(0.0, abs=TOL)


def test_subspace_overlap_is_rotation_invariant():
    v = np.random.default_rng(1).normal(size=(30, 5))
    rotated = v @ random_rotation(5, seed=2)
    assert subspace_overlap(v, rotated) == pytest.approx(1.0, abs=TOL)
    other = np.random.default_rng(3).normal(size=(30, 3))
    assert subspace_overlap(rotated, other) == pytest.approx(subspace_overlap(v, other), abs=TOL)


def test_subspace_overlap_partial_equals_shared_fraction():
    eye = np.eye(6)
    # e1 shared, e2 orthogonal to span(e1, e3): one of two directions -> 1/2.
    assert subspace_overlap(eye[:, [0, 1]], eye[:, [0, 2]]) == pytest.approx(0.5, abs=TOL)
    # A vector at 60 degrees to a plane: cos^2 = 1/4.
    tilted = (0.5 * eye[:, 0] + np.sqrt(3) / 2 * eye[:, 4])[:, None]
    assert subspace_overlap(tilted, eye[:, [0, 1]]) == pytest.approx(0.25, abs=TOL)


def test_subspace_overlap_contained_subspace_is_one():
    eye = np.eye(8)
    assert subspace_overlap(eye[:, :2], eye[:, :5]) == pytest.approx(1.0, abs=TOL)
    assert subspace_overlap(eye[:, :5], eye[:, :2]) == pytest.approx(1.0, abs=TOL)


def test_subspace_overlap_rank_deficient_features():
    eye = np.eye(8)
    # Three columns spanning only e1, e2 (one is their sum), plus a zero column: rank 2.
    features = np.stack([eye[:, 0], eye[:, 1], eye[:, 0] + eye[:, 1], np.zeros(8)], axis=1)
    assert subspace_overlap(eye[:, :2], features) == pytest.approx(1.0, abs=TOL)
    assert subspace_overlap(eye[:, [0, 2]], features) == pytest.approx(0.5, abs=TOL)
    assert subspace_overlap(eye[:, :2], np.zeros((8, 3))) == 0.0


def test_subspace_overlap_accepts_torch_tensors():
    v = torch.eye(5, dtype=torch.float32)[:, :2]
    assert subspace_overlap(v, torch.eye(5, dtype=torch.float64)[:, 1:3]) == pytest.approx(
        0.5, abs=TOL
    )


def test_subspace_overlap_invalid_inputs():
    with pytest.raises(ValueError, match="`vectors` and `features` must have the same rows"):
        subspace_overlap(np.eye(4), np.eye(5))
    with pytest.raises(ValueError, match="`vectors` must be a 2-D array"):
        subspace_overlap(np.ones(4), np.eye(4))
    with pytest.raises(ValueError, match="`features` must be finite"):
        subspace_overlap(np.eye(4), np.full((4, 2), np.nan))


def test_feature_alignment_vector_equal_to_feature_is_one():
    features = np.random.default_rng(4).normal(size=(20, 6))
    vectors = features[:, [2, 5]] * np.array([3.0, -0.5])  # any scale or sign
    matrix = feature_alignment(vectors, features)
    assert matrix.shape == (2, 6)
    assert matrix[0, 2] == pytest.approx(1.0, abs=TOL)
    assert matrix[1, 5] == pytest.approx(1.0, abs=TOL)
    assert np.all((matrix >= 0) & (matrix <= 1))


def test_feature_alignment_matches_cosine_reference():
    rng = np.random.default_rng(5)
    vectors, features = rng.normal(size=(15, 3)), rng.normal(size=(15, 4))
    expected = np.array(
        [
            [abs(u @ f) / (np.linalg.norm(u) * np.linalg.norm(f)) for f in features.T]
            for u in vectors.T
        ]
    )
    np.testing.assert_allclose(feature_alignment(vectors, features), expected, atol=TOL, rtol=0)


def test_feature_alignment_pairs_is_phase_insensitive():
    p = 11
    features = fourier_family(p, [1, 2, 3], "a")
    a = np.repeat(np.arange(p), p)
    shifted = np.cos(2 * np.pi * 2 * a / p + 0.7)[:, None]
    single = feature_alignment(shifted, features)
    assert single.max() < 1 - 1e-3
    assert single[0, 2] == pytest.approx(abs(np.cos(0.7)), abs=TOL)
    paired = feature_alignment(shifted, features, pairs=True)
    assert paired.shape == (1, 3)
    np.testing.assert_allclose(paired, [[0.0, 1.0, 0.0]], atol=TOL, rtol=0)


def test_feature_alignment_pairs_with_zero_sine_column():
    # For even p, sin(2 pi (p/2) a / p) = sin(pi a) vanishes: the pair is the cosine alone.
    p = 8
    features = fourier_family(p, [p // 2], "a")
    assert np.allclose(features[:, 1], 0.0)
    vector = features[:, :1]
    np.testing.assert_allclose(feature_alignment(vector, features, pairs=True), [[1.0]], atol=TOL)


def test_feature_alignment_invalid_inputs():
    with pytest.raises(ValueError, match="`eigenvectors` and `features` must have the same rows"):
        feature_alignment(np.eye(4), np.eye(3))
    with pytest.raises(ValueError, match="`features` must have an even number of columns"):
        feature_alignment(np.eye(4), np.eye(4)[:, :3], pairs=True)
    with pytest.raises(ValueError, match="`eigenvectors` must be a 2-D array"):
        feature_alignment(np.ones((2, 2, 2)), np.eye(2))


def test_cyclic_shift_moves_one_coordinate():
    p = 7
    a, b = np.divmod(np.arange(p * p), p)
    values = 10 * a + b
    np.testing.assert_array_equal(values[cyclic_shift(p, 0)], 10 * ((a + 1) % p) + b)
    np.testing.assert_array_equal(values[cyclic_shift(p, 1)], 10 * a + (b + 1) % p)


def test_cyclic_shift_invalid_inputs():
    with pytest.raises(ValueError, match="`p` must be a positive int"):
        cyclic_shift(0, 0)
    with pytest.raises(ValueError, match="`axis` must be 0"):
        cyclic_shift(5, 2)


def test_symmetry_rotation_separates_frequencies():
    p = 7
    features = fourier_family(p, [1, 2, 3], "a")
    basis = np.linalg.qr(features)[0] @ random_rotation(6, seed=6)
    assert feature_alignment(basis, features, pairs=True).max(axis=1).min() < 0.99

    rotated, eigenvalues = symmetry_rotation(basis, cyclic_shift(p, 0))

    np.testing.assert_allclose(rotated.T @ rotated, np.eye(6), atol=TOL, rtol=0)
    assert subspace_overlap(rotated, features) == pytest.approx(1.0, abs=TOL)
    expected = 4 * np.sin(np.pi * np.repeat([1, 2, 3], 2) / p) ** 2
    np.testing.assert_allclose(eigenvalues, expected, atol=TOL, rtol=0)
    alignment = feature_alignment(rotated, features, pairs=True)
    one_hot = np.repeat(np.eye(3), 2, axis=0)  # vectors 2j, 2j+1 hold frequency j + 1
    np.testing.assert_allclose(alignment, one_hot, atol=TOL, rtol=0)


def test_symmetry_rotation_weights_split_two_coordinates():
    p = 7
    a_family, b_family = fourier_family(p, [1, 2, 3], "a"), fourier_family(p, [1, 2, 3], "b")
    features = np.concatenate([a_family, b_family], axis=1)
    basis = np.linalg.qr(features)[0] @ random_rotation(12, seed=7)
    generators = [cyclic_shift(p, 0), cyclic_shift(p, 1)]

    rotated, _ = symmetry_rotation(basis, generators, weights=[1.0, np.sqrt(2)])

    alignment = feature_alignment(rotated, features, pairs=True)
    np.testing.assert_allclose(np.sort(alignment, axis=1)[:, -1], 1.0, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.sort(alignment, axis=1)[:, :-1], 0.0, atol=TOL, rtol=0)
    # Each of the six frequency/coordinate pairs is hit by exactly two rotated vectors.
    np.testing.assert_array_equal(np.bincount(alignment.argmax(axis=1), minlength=6), 2)


def test_symmetry_rotation_matrix_generator_matches_permutation():
    p = 5
    features = fourier_family(p, [1, 2], "b")
    basis = np.linalg.qr(features)[0] @ random_rotation(4, seed=8)
    perm = cyclic_shift(p, 1)
    matrix = torch.eye(p * p, dtype=torch.float64)[torch.from_numpy(perm)]
    from_perm = symmetry_rotation(basis, perm)
    from_matrix = symmetry_rotation(torch.from_numpy(basis), [matrix])
    np.testing.assert_allclose(from_matrix[1], from_perm[1], atol=TOL, rtol=0)
    # Inside a degenerate pair the basis is arbitrary: compare the projectors per pair.
    for pair in (slice(0, 2), slice(2, 4)):
        projector = [r[0][:, pair] @ r[0][:, pair].T for r in (from_perm, from_matrix)]
        np.testing.assert_allclose(projector[0], projector[1], atol=TOL, rtol=0)


def test_symmetry_rotation_invalid_inputs():
    basis = np.eye(9)[:, :2]
    with pytest.raises(ValueError, match=r"`generators\[0\]` must be a permutation of range\(9\)"):
        symmetry_rotation(basis, np.zeros(9, dtype=int))
    with pytest.raises(ValueError, match=r"`generators\[1\]` must be an \(9, 9\) operator"):
        symmetry_rotation(basis, [cyclic_shift(3, 0), np.eye(4)])
    with pytest.raises(ValueError, match="`generators` must hold at least one"):
        symmetry_rotation(basis, [])
    with pytest.raises(ValueError, match="`weights` must hold one positive number per generator"):
        symmetry_rotation(basis, [cyclic_shift(3, 0)], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="`vectors` must have linearly independent columns"):
        symmetry_rotation(np.ones((9, 2)), cyclic_shift(3, 0))
