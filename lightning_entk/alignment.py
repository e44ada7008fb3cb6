"""How eNTK eigenvectors line up with known features of the data.

Eigenvectors and features are both column sets in data space: ``(R, k)`` eigenvectors (R = N for
``mode="trace"``, C*N class-major for ``mode="flatten"``) and ``(R, F)`` feature values on the same
probe points. Every function accepts numpy arrays or torch tensors and computes in float64.

    :func:`subspace_overlap`    one number in [0, 1]: how much of one span lies in the other,
                                independent of the basis chosen inside either.
    :func:`feature_alignment`   the ``(k, F)`` |cosine| matrix, for heatmaps; ``pairs=True`` merges
                                cos/sin columns of one frequency so that the phase does not matter.
    :func:`symmetry_rotation`   a basis of a cliff subspace made of (near) eigenvectors of symmetry
                                operators, e.g. Fourier modes of one frequency each.

Lin, "Feature Identification via the Empirical NTK" (arXiv:2510.00468), compares the
eigenvectors above a cliff with the Fourier features of modular addition: a cliff's eigenvectors
span the features' space but each one mixes several frequencies, since eigenvectors of (nearly)
equal eigenvalues can be rotated freely among themselves. The overlap is blind to that rotation;
the per-frequency picture needs the rotation undone first, which the paper does by diagonalising
cyclic-shift Laplacians inside the cliff subspace (:func:`symmetry_rotation`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lightning_entk.checks import check_int

ArrayLike = np.ndarray | torch.Tensor


def _as_columns(name: str, value: ArrayLike) -> np.ndarray:
    """A finite float64 ``(R, n)`` numpy copy of ``value``, or a ValueError naming ``name``."""
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float64).numpy()
    array = np.array(value, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(
            f"`{name}` must be a 2-D array of columns (R, n), got shape {array.shape}; "
            "pass a single vector as `v[:, None]`."
        )
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}` must be finite, got NaN or inf entries.")
    return array


def _check_rows(a_name: str, a: np.ndarray, b_name: str, b: np.ndarray) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"`{a_name}` and `{b_name}` must have the same rows (the same probe points), "
            f"got {a.shape[0]} and {b.shape[0]}."
        )


def orthonormal_basis(columns: np.ndarray) -> np.ndarray:
    """Orthonormal basis ``(R, r)`` of the span of ``columns``, r its numerical rank.

    Singular values below ``max(R, n) * eps * s_max`` (numpy's ``matrix_rank`` rule) count as zero,
    so duplicated or all-zero columns do not add directions.
    """
    if columns.size == 0:
        return np.zeros((columns.shape[0], 0))
    u, s, _ = np.linalg.svd(columns, full_matrices=False)
    tolerance = max(columns.shape) * np.finfo(np.float64).eps * (s[0] if s.size else 0.0)
    return u[:, s > tolerance]


def subspace_overlap(vectors: ArrayLike, features: ArrayLike) -> float:
    """Overlap in [0, 1] of the spans of two column sets, independent of the bases chosen.

    With ``Q_v``, ``Q_f`` orthonormal bases of the two spans (ranks r_v, r_f)::

        overlap = || Q_v^T Q_f ||_F^2 / min(r_v, r_f)

    the mean squared cosine of the principal angles between the spans. It is 1 when one span
    contains the other and 0 when they are orthogonal; rotating either column set leaves it
    unchanged. Ranks are numerical (see :func:`orthonormal_basis`), so rank-deficient
    feature matrices are fine. An empty or all-zero span overlaps nothing: 0.

    Args:
        vectors: ``(R, k)`` columns, e.g. the eigenvectors of one cliff segment.
        features: ``(R, F)`` feature values on the same R rows.

    Raises:
        ValueError: if either is not 2-D or not finite, or their rows differ.

    Example:
        >>> import numpy as np
        >>> eye = np.eye(4)
        >>> subspace_overlap(eye[:, :2], eye[:, 1:3])  # one of two directions shared
        0.5
    """
    vectors = _as_columns("vectors", vectors)
    features = _as_columns("features", features)
    _check_rows("vectors", vectors, "features", features)
    return orthonormal_overlap(orthonormal_basis(vectors), orthonormal_basis(features))


def orthonormal_overlap(q_v: np.ndarray, q_f: np.ndarray) -> float:
    """:func:`subspace_overlap` of two spans given by orthonormal bases ``(R, r_v)`` and
    ``(R, r_f)`` (e.g. eigenvectors, or :func:`orthonormal_basis` of features computed once
    for many overlaps)."""
    rank = min(q_v.shape[1], q_f.shape[1])
    if rank == 0:
        return 0.0
    overlap = float(np.sum((q_v.T @ q_f) ** 2)) / rank
    return min(max(overlap, 0.0), 1.0)


def feature_alignment(
    eigenvectors: ArrayLike, features: ArrayLike, pairs: bool = False
) -> np.ndarray:
    """|cosine| between each eigenvector and each feature: a ``(k, F)`` matrix in [0, 1].

    Entry ``[i, j]`` is ``|<u_i, f_j>| / (|u_i| |f_j|)``; a zero column gives 0.

    With ``pairs=True`` feature columns ``(2j, 2j+1)`` are taken as the cos/sin pair of one
    frequency (e.g. ``cos(2 pi k a / p)``, ``sin(2 pi k a / p)``) and entry ``[i, j]`` is the norm
    of the unit eigenvector's projection onto the pair's span, orthonormalised first: 1 for any
    phase ``cos(2 pi k a / p + phi)``, where a single column would give ``|cos(phi)|``. The result
    is then ``(k, F / 2)``. A pair with one zero column (``sin(pi a)`` for ``k = p / 2``) counts
    as the 1-D span of the other.

    Args:
        eigenvectors: ``(R, k)`` columns in data space.
        features: ``(R, F)`` feature values on the same R rows.
        pairs: whether consecutive feature columns are cos/sin pairs of one frequency.

    Raises:
        ValueError: if either is not 2-D or not finite, their rows differ, or ``pairs=True`` with
            an odd F.

    Example:
        >>> import numpy as np
        >>> a = 2 * np.pi * np.arange(8) / 8
        >>> features = np.stack([np.cos(a), np.sin(a)], axis=1)
        >>> shifted = np.cos(a + np.pi / 3)[:, None]
        >>> feature_alignment(shifted, features).round(3)
        array([[0.5  , 0.866]])
        >>> feature_alignment(shifted, features, pairs=True).round(3)
        array([[1.]])
    """
    eigenvectors = _as_columns("eigenvectors", eigenvectors)
    features = _as_columns("features", features)
    _check_rows("eigenvectors", eigenvectors, "features", features)
    norms = np.linalg.norm(eigenvectors, axis=0)
    units = eigenvectors / np.where(norms > 0, norms, 1.0)
    if not pairs:
        feature_norms = np.linalg.norm(features, axis=0)
        feature_units = features / np.where(feature_norms > 0, feature_norms, 1.0)
        return np.clip(np.abs(units.T @ feature_units), 0.0, 1.0)
    if features.shape[1] % 2:
        raise ValueError(
            "`features` must have an even number of columns with `pairs=True` (cos/sin pairs "
            f"(2j, 2j+1)), got {features.shape[1]}."
        )
    result = np.empty((units.shape[1], features.shape[1] // 2))
    for j in range(result.shape[1]):
        basis = orthonormal_basis(features[:, 2 * j : 2 * j + 2])
        result[:, j] = np.linalg.norm(basis.T @ units, axis=0)
    return np.clip(result, 0.0, 1.0)


def cyclic_shift(p: int, axis: int) -> np.ndarray:
    """Index permutation of the ``p x p`` grid (row ``a * p + b``) shifting one coordinate by 1.

    ``values[cyclic_shift(p, 0)]`` is the function ``(a, b) -> values(a + 1 mod p, b)``;
    ``axis=1`` shifts ``b`` instead. Permutations compose by indexing: ``shift_a[shift_b]``
    shifts both (a shift along ``a + b``).

    Args:
        p: the modulus (grid side).
        axis: 0 to shift ``a``, 1 to shift ``b``.

    Raises:
        ValueError: if ``p`` is not a positive int or ``axis`` is not 0 or 1.

    Example:
        >>> cyclic_shift(2, 0)
        array([2, 3, 0, 1])
        >>> cyclic_shift(2, 1)
        array([1, 0, 3, 2])
    """
    check_int("p", p, words="a positive int")
    if axis not in (0, 1):
        raise ValueError(f"`axis` must be 0 (shift a) or 1 (shift b), got {axis!r}.")
    a, b = np.divmod(np.arange(p * p), p)
    if axis == 0:
        a = (a + 1) % p
    else:
        b = (b + 1) % p
    return a * p + b


def _apply(name: str, generator: ArrayLike, vectors: np.ndarray) -> np.ndarray:
    """``S V`` for an (R, R) operator or an index permutation ``S V = V[perm]``."""
    rows = vectors.shape[0]
    if isinstance(generator, torch.Tensor):
        generator = generator.detach().cpu().numpy()
    generator = np.asarray(generator)
    if generator.ndim == 1:
        if not np.issubdtype(generator.dtype, np.integer) or not np.array_equal(
            np.sort(generator), np.arange(rows)
        ):
            raise ValueError(
                f"`{name}` must be a permutation of range({rows}) when 1-D, got "
                f"{generator.dtype} of length {len(generator)} that is not one."
            )
        return vectors[generator]
    if generator.shape != (rows, rows):
        raise ValueError(
            f"`{name}` must be an ({rows}, {rows}) operator or an index permutation of length "
            f"{rows}, got shape {generator.shape}."
        )
    operator = _as_columns(name, generator)
    return operator @ vectors


def symmetry_rotation(
    vectors: ArrayLike,
    generators: ArrayLike | Sequence[ArrayLike],
    weights: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate a basis of a subspace onto eigenvectors of symmetry Laplacians inside it.

    For symmetry operators ``S_g`` acting on data space, the Laplacian

        L = sum_g  w_g (I - S_g)^T (I - S_g)

    is projected into the subspace, ``M = V^T L V`` (k x k, formed as
    ``sum_g w_g (V - S_g V)^T (V - S_g V)`` without any R x R matrix), and diagonalised,
    ``M = W diag(lambda) W^T``; the result is ``V W``, sorted by ascending ``lambda``. If the
    subspace is invariant under the ``S_g`` (as a cliff subspace is under the symmetries of the
    data), the columns are joint eigenvectors of the shifts: for a cyclic shift of period p, a
    Fourier mode of frequency k has ``lambda = 4 sin^2(pi k / p)``, shared by its cos and sin
    phases only. This undoes the arbitrary rotation among eigenvectors of near-equal eNTK
    eigenvalues, as arXiv:2510.00468 does to read cliffs frequency by frequency.

    With several generators the sum can join modes that differ per generator (frequency k of
    ``a`` and frequency k of ``b`` both give ``4 sin^2(pi k / p)``); distinct ``weights``, e.g.
    ``(1, 2 ** 0.5)``, separate them. Likewise the Laplacian does not tell ``a + b`` from
    ``a - b`` modes; use a shift along one of them (``shift_a[shift_b]``) as a generator.

    Args:
        vectors: ``(R, k)`` basis of the subspace, e.g. the eigenvectors of one cliff segment.
            Orthonormalised first (the span is what counts); must have full column rank.
        generators: one operator or a list of them, each an ``(R, R)`` matrix or a 1-D integer
            index permutation ``perm`` acting as ``S v = v[perm]`` (see :func:`cyclic_shift`).
        weights: one positive weight per generator; all 1 when ``None``.

    Returns:
        ``(rotated, eigenvalues)``: ``(R, k)`` float64 orthonormal columns spanning the same
        subspace, each with its largest-magnitude entry positive, and the ``(k,)`` ascending
        eigenvalues of ``M``.

    Raises:
        ValueError: if ``vectors`` is not a finite full-rank 2-D array, a generator is neither
            an ``(R, R)`` operator nor a permutation of ``range(R)``, or ``weights`` does not
            hold one positive number per generator.

    Example:
        >>> import numpy as np
        >>> a = 2 * np.pi * np.repeat(np.arange(5), 5) / 5   # grid rows a * 5 + b
        >>> modes = np.stack([np.cos(a), np.sin(a), np.cos(2 * a), np.sin(2 * a)], axis=1)
        >>> mixed = modes @ np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))[0]
        >>> _, eigenvalues = symmetry_rotation(mixed, cyclic_shift(5, axis=0))
        >>> eigenvalues.round(4)  # 4 sin^2(pi k / 5): frequency 1 twice, frequency 2 twice
        array([1.382, 1.382, 3.618, 3.618])
    """
    vectors = _as_columns("vectors", vectors)
    basis = orthonormal_basis(vectors)
    if basis.shape[1] < vectors.shape[1]:
        raise ValueError(
            f"`vectors` must have linearly independent columns, got rank {basis.shape[1]} for "
            f"{vectors.shape[1]} columns; drop the dependent ones."
        )
    if isinstance(generators, np.ndarray | torch.Tensor):
        generators = [generators]
    generators = list(generators)
    if not generators:
        raise ValueError("`generators` must hold at least one symmetry operator, got none.")
    if weights is None:
        weights = [1.0] * len(generators)
    weights = [float(w) for w in weights]
    if len(weights) != len(generators) or not all(w > 0 for w in weights):
        raise ValueError(
            f"`weights` must hold one positive number per generator ({len(generators)}), "
            f"got {weights}."
        )
    laplacian = np.zeros((basis.shape[1], basis.shape[1]))
    for g, (generator, weight) in enumerate(zip(generators, weights, strict=True)):
        difference = basis - _apply(f"generators[{g}]", generator, basis)
        laplacian += weight * (difference.T @ difference)
    eigenvalues, rotation = np.linalg.eigh((laplacian + laplacian.T) / 2)
    rotated = basis @ rotation
    pivots = np.abs(rotated).argmax(axis=0)
    rotated *= np.sign(rotated[pivots, np.arange(rotated.shape[1])])
    return rotated, eigenvalues
