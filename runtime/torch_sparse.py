"""Sparse matrices for the PyTorch runtime: scipy matrices as torch CSR tensors."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch

DTYPE = torch.float64


def torch_csr(matrix: sp.spmatrix) -> torch.Tensor:
    """Return `matrix` as a float64 torch CSR tensor, its duplicates summed."""
    matrix = sp.csr_matrix(matrix)
    matrix.sum_duplicates()
    with warnings.catch_warnings():
        # torch warns that sparse CSR support is in beta; only sparse.mm uses it here.
        warnings.simplefilter("ignore", UserWarning)
        # int32 indices where they fit: with int64 indices a product on the CPU takes
        # about 1.7 microseconds longer (torch 2.13), a third of a small product's time
        # with int64 indices.
        index = np.int32 if matrix.nnz < 2**31 and max(matrix.shape) < 2**31 else np.int64
        return torch.sparse_csr_tensor(
            torch.from_numpy(matrix.indptr.astype(index)),
            torch.from_numpy(matrix.indices.astype(index)),
            torch.from_numpy(matrix.data.astype(np.float64)),
            size=matrix.shape,
            check_invariants=False,  # scipy built them; checking costs time on every load
        )
