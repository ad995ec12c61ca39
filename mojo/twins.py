"""Twin rows: hidden units of one block whose first-layer rows are equal.

Many units of a tlc block read the same linear form of y and differ only in their bias.
Examples are the two ReLUs of a step `ReLU(s - t + 1) - ReLU(s - t)` and the thresholds
of an adder's bit, whose row is a prefix sum of the operands' bits. The engine computes
such a row once. Its first unit (the representative) keeps the row, and each other unit
(a twin) stores no entries and takes

    hidden[twin] = hidden[representative] + (b1[twin] - b1[representative])

after the first product. That equals b1[twin] + row . y exactly when every value
involved is an integer and every partial sum stays below 2^53. The packer checks that
with `input_bounds`, an interval pass over the whole model, and finds no twins otherwise.
The same pass shows, in `cannot_produce_nan`, whether a logit can be a NaN.
"""

from __future__ import annotations

import numpy as np

from tlc.mojo.weights import FeedForward, ModelWeights, SparseMatrix

# Bounds must stay below this. Float64 represents every integer up to 2^53, and the
# margin covers the rounding of the bound arithmetic itself.
LIMIT = 2.0**52
# Bounds below this leave room for the rounding of the bound arithmetic before a sum
# could reach the largest Float64, about 1.8e308.
NAN_FREE_LIMIT = 1e300


def _integral(values) -> bool:
    values = np.asarray(values, dtype=np.float64)
    return bool(np.all(np.floor(values) == values) and np.all(np.abs(values) < LIMIT))


def _abs_product(matrix: SparseMatrix, bound: np.ndarray) -> np.ndarray:
    """Return |matrix| @ bound (rows of the matrix)."""
    result = np.zeros(matrix.shape[0], dtype=np.float64)
    np.add.at(result, matrix.rows, np.abs(matrix.values) * bound[matrix.cols])
    return result


def _block_growth(block: FeedForward, y: np.ndarray,
                  interval: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:  # fmt: skip
    """Return a bound of what the block adds to x, and of every partial sum of it in any
    order, given a bound of its input's magnitude and, when known, its interval."""
    if interval is None:
        hidden = _abs_product(block.w1, y) + np.abs(block.b1)
    else:
        # A hidden unit is ReLU(pre-activation), so it lies in [0, max(0, top)].
        hidden = np.maximum(_signed_product(block.w1, *interval)[1] + block.b1, 0.0)
    return _abs_product(block.w2, hidden) + np.abs(block.b2)


def _signed_product(matrix: SparseMatrix, low: np.ndarray,
                    high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Return the interval of matrix @ y over the box low <= y <= high."""
    positive = np.maximum(matrix.values, 0.0)
    negative = np.minimum(matrix.values, 0.0)
    result_low = np.zeros(matrix.shape[0], dtype=np.float64)
    result_high = np.zeros(matrix.shape[0], dtype=np.float64)
    np.add.at(result_low, matrix.rows,
              positive * low[matrix.cols] + negative * high[matrix.cols])  # fmt: skip
    np.add.at(result_high, matrix.rows,
              positive * high[matrix.cols] + negative * low[matrix.cols])  # fmt: skip
    return result_low, result_high


def _block_interval(block: FeedForward, low: np.ndarray,
                    high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Return the interval of W2 ReLU(W1 y + b1) + b2 over the box low <= y <= high.

    Units with equal W1 rows (twins) see the same s = W1 y and differ in their bias, so
    their joint contribution sum_n W2[d, n] ReLU(s + b_n) is piecewise linear in the one
    scalar s, and its extremes lie at the ends of s's interval or at the breakpoints
    -b_n inside it. That keeps a step ReLU(s + 1) - ReLU(s) within [0, 1], where
    bounding each unit apart would give [-M, M + 1]. The builder's certificate
    (tlc.model.certificate) bounds the model the same way.
    """
    b1 = np.asarray(block.b1, dtype=np.float64)
    pre_low, pre_high = _signed_product(block.w1, low, high)
    out_low = np.asarray(block.b2, dtype=np.float64).copy()
    out_high = out_low.copy()
    hidden = len(b1)
    if hidden == 0:
        return out_low, out_high
    pointers, columns, values = block.w1.csr()
    pairs = _equal_rows(pointers, columns, values)
    group = np.arange(hidden)
    group[pairs[:, 0]] = pairs[:, 1]
    sizes = np.bincount(group, minlength=hidden)
    single = sizes[group] == 1
    # A unit alone in its group: ReLU is monotone, so its interval is the ReLU of its
    # pre-activation's.
    entries = single[block.w2.cols]
    alone = SparseMatrix(block.w2.shape, block.w2.rows[entries], block.w2.cols[entries],
                         block.w2.values[entries])  # fmt: skip
    alone_low, alone_high = _signed_product(alone, np.maximum(pre_low + b1, 0.0),
                                            np.maximum(pre_high + b1, 0.0))  # fmt: skip
    out_low += alone_low
    out_high += alone_high
    # The W2 entries of the units in groups of two or more, by unit.
    shared = np.flatnonzero(~entries)
    shared = shared[np.argsort(block.w2.cols[shared], kind="stable")]
    starts = np.searchsorted(block.w2.cols[shared], np.arange(hidden + 1))
    for representative in np.flatnonzero(sizes > 1):
        members = np.flatnonzero(group == representative)
        biases = b1[members]
        s_low, s_high = pre_low[representative], pre_high[representative]
        inside = [-bias for bias in biases if s_low < -bias < s_high]
        points = np.array([s_low, s_high, *inside], dtype=np.float64)
        activations = np.maximum(points[None, :] + biases[:, None], 0.0)
        chosen = np.concatenate([shared[starts[m]:starts[m + 1]] for m in members])
        if len(chosen) == 0:
            continue
        local = np.searchsorted(members, block.w2.cols[chosen])
        dims, inverse = np.unique(block.w2.rows[chosen], return_inverse=True)
        sums = np.zeros((len(dims), len(points)), dtype=np.float64)
        np.add.at(sums, inverse, block.w2.values[chosen][:, None] * activations[local])
        out_low[dims] += sums.min(axis=1)
        out_high[dims] += sums.max(axis=1)
    return out_low, out_high


def input_bounds(weights: ModelWeights) -> list[np.ndarray] | None:
    """Return, per layer, a bound of |y| component by component, where y is the input of
    the layer's feed-forward blocks, at any position and for any token.

    Returns None when some embedding value, head weight or block weight is not an
    integer, because then y need not be an integer and twins are not exact.
    """
    intervals = input_intervals(weights)
    return None if intervals is None else [magnitude(interval) for interval in intervals]


def input_intervals(weights: ModelWeights) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Return, per layer, the interval (low, high) of y component by component, or None
    as `input_bounds` does. The router only picks an expert, so each layer adds the
    union of its experts' intervals."""
    tensors = [matrix.values for matrix in weights.embed]
    for layer in weights.layers:
        for head in layer.heads:
            tensors += [head.wv.values, head.bv, head.wo.values]
        for block in layer.blocks:
            tensors += [block.w1.values, block.b1, block.w2.values, block.b2]
    if not all(_integral(values) for values in tensors):
        return None
    try:
        return _intervals(weights)[0]
    except (IndexError, ValueError):
        return None  # wrong shapes, which the packer reports with their names


def cannot_produce_nan(weights: ModelWeights) -> bool:
    """Return True when no logit of the unembedding or of a router can be a NaN.

    That holds when every tensor is finite and the interval pass bounds every value the
    model computes, and so every partial sum, far below the largest Float64. Then no sum
    overflows to an infinity, and only infinities or NaN inputs make a NaN. The scores
    of brute-force heads are not covered, only the logits whose argmax picks a token or
    an expert.
    """
    tensors = [matrix.values for matrix in (*weights.embed, *weights.unembed)]
    tensors += list(weights.unembed_bias)
    for layer in weights.layers:
        for head in layer.heads:
            tensors += [head.wq.values, head.bq, head.wk.values, head.bk, head.wv.values,
                        head.bv, head.wo.values]  # fmt: skip
        for block in layer.blocks:
            tensors += [block.w1.values, block.b1, block.w2.values, block.b2]
        if layer.experts:
            tensors += [layer.router_w.values, layer.router_b]
    if not all(np.all(np.isfinite(np.asarray(values, dtype=np.float64))) for values in tensors):
        return False
    try:
        # A bound that overflows to an infinity fails the check below, as it should.
        with np.errstate(over="ignore", invalid="ignore"):
            inputs, final, logits = _nan_free_bounds(weights)
    except (IndexError, ValueError):
        return False
    return all(np.all(bound < NAN_FREE_LIMIT) for bound in [final, *inputs, *logits])


def _nan_free_bounds(weights: ModelWeights):
    """Return the bounds that `cannot_produce_nan` checks: of y per layer, of x after the
    last layer, and of the logits, the routers' logits and every block's hidden units."""
    inputs, final = _bounds(weights)
    logits = [_abs_product(matrix, final) + np.abs(bias)
              for matrix, bias in zip(weights.unembed, weights.unembed_bias, strict=True)]
    for layer, y in zip(weights.layers, inputs, strict=True):
        if layer.experts:
            logits.append(_abs_product(layer.router_w, y) + np.abs(layer.router_b))
        logits += [_abs_product(block.w1, y) + np.abs(block.b1) for block in layer.blocks]
    return inputs, final, logits


def _bounds(weights: ModelWeights) -> tuple[list[np.ndarray], np.ndarray]:
    """Return per layer a bound of |y| (the feed-forward input) and a bound of |x| after
    the last layer."""
    intervals, (low, high) = _intervals(weights)
    return [magnitude(interval) for interval in intervals], magnitude((low, high))


def magnitude(interval: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Return the largest magnitude in an interval (low, high), component by component."""
    return np.maximum(-interval[0], interval[1])


def _intervals(weights: ModelWeights):
    """Return per layer the interval (low, high) of y, the feed-forward input, at any
    position and for any token, and the interval of x after the last layer."""
    low = np.zeros(weights.width, dtype=np.float64)
    high = np.zeros(weights.width, dtype=np.float64)
    for table in weights.embed:
        # Each field adds one row of its table, and a value without an entry adds 0.
        dense = np.zeros(table.shape, dtype=np.float64)
        np.add.at(dense, (table.rows, table.cols), table.values)
        low = low + dense.min(axis=0, initial=0.0)
        high = high + dense.max(axis=0, initial=0.0)
    intervals = []
    for layer in weights.layers:
        y_low, y_high = low.copy(), high.copy()
        for head in layer.heads:
            # The winning value was computed at some position from x in [low, high].
            value_low, value_high = _signed_product(head.wv, low, high)
            output_low, output_high = _signed_product(head.wo, value_low + head.bv,
                                                      value_high + head.bv)  # fmt: skip
            y_low, y_high = y_low + output_low, y_high + output_high
        intervals.append((y_low, y_high))
        low, high = y_low.copy(), y_high.copy()
        if layer.shared is not None:
            shared_low, shared_high = _block_interval(layer.shared, y_low, y_high)
            low, high = low + shared_low, high + shared_high
        if layer.experts:
            # One expert runs, so x gains the union of their intervals.
            ranges = [_block_interval(expert, y_low, y_high) for expert in layer.experts]
            low = low + np.min([each[0] for each in ranges], axis=0)
            high = high + np.max([each[1] for each in ranges], axis=0)
    return intervals, (low, high)


def layer_sums_exact(shared: FeedForward | None, experts: list[FeedForward],
                     bound: np.ndarray | None,
                     interval: tuple[np.ndarray, np.ndarray] | None = None) -> bool:  # fmt: skip
    """Return True when every sum that a layer's feed-forward blocks compute is an integer
    below LIMIT in any order of its terms.

    That covers the hidden units, each block's output W2 ReLU(h) + b2 summed from zero,
    and x plus the shared block's and the expert's outputs. `bound` bounds |y| (from
    `input_bounds`, None when some weight is not an integer), and `interval`, y's
    interval from `input_intervals`, bounds the hidden units tighter. The engine then may
    remember a block's output for its input and add it later in one sum per row
    (engine.mojo, the block memo).
    """
    if bound is None:
        return False
    blocks = ([] if shared is None else [shared]) + list(experts)
    for block in blocks:
        units = _abs_product(block.w1, bound) + np.abs(block.b1)
        if not np.all(units < LIMIT):
            return False
    total = bound.copy()
    if shared is not None:
        total = total + _block_growth(shared, bound, interval)
    if experts:
        growth = [_block_growth(expert, bound, interval) for expert in experts]
        total = total + np.max(growth, axis=0)
    return bool(np.all(total < LIMIT))


def find_twins(block: FeedForward, bound: np.ndarray | None):
    """Return (block, twins): the block with the W1 entries of every twin row removed,
    and an int64 array of (twin, representative) pairs with a float64 array of their
    bias differences. No twins when `bound` is None or a bound reaches LIMIT.

    `bound` bounds |y| component by component (from `input_bounds`).
    """
    hidden = len(block.b1)
    none = (np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float64))
    if bound is None or hidden < 2:
        return block, none
    pointers, columns, values = block.w1.csr()
    nonzero = values != 0.0
    if not nonzero.all():
        # Cancelled duplicates are not entries: equal forms must compare equal.
        row_of = np.repeat(np.arange(hidden), np.diff(pointers))[nonzero]
        columns, values = columns[nonzero], values[nonzero]
        pointers = np.searchsorted(row_of, np.arange(hidden + 1))
    pairs = _equal_rows(pointers, columns, values)
    if len(pairs) == 0:
        return block, none
    twins, representatives = pairs[:, 0], pairs[:, 1]
    b1 = np.asarray(block.b1, dtype=np.float64)
    deltas = b1[twins] - b1[representatives]
    # Over the stored entries, so that it bounds every partial sum in any order.
    units_bound = _abs_product(block.w1, bound) + np.abs(b1)
    checked = np.concatenate([units_bound[twins], units_bound[representatives],
                              np.abs(deltas)])  # fmt: skip
    if not np.all(checked < LIMIT):
        return block, none
    keep = ~np.isin(block.w1.rows, twins)
    w1 = SparseMatrix(block.w1.shape, block.w1.rows[keep], block.w1.cols[keep],
                      block.w1.values[keep])  # fmt: skip
    return FeedForward(w1, block.b1, block.w2, block.b2), (pairs, deltas)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Return the concatenation of arange(start, start + length) over the pairs of
    `starts` and `lengths`."""
    offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
    return offsets + np.arange(int(lengths.sum()))


def _equal_rows(pointers: np.ndarray, columns: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Return (row, first equal row) pairs of a CSR matrix with each row's entries in
    column order, for every nonempty row equal to an earlier one, row ascending."""
    lengths = np.diff(pointers)
    # A hash of each row: the wrapped sum of a mix of each entry's column and value.
    bits = values.astype(np.float64).view(np.uint64)
    mixed = (columns.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    mixed ^= (bits ^ (bits >> np.uint64(29))) * np.uint64(0xBF58476D1CE4E5B9)
    mixed ^= mixed >> np.uint64(31)
    sums = np.concatenate([np.zeros(1, np.uint64), np.cumsum(mixed, dtype=np.uint64)])
    hashes = sums[pointers[1:]] - sums[pointers[:-1]]
    units = np.flatnonzero(lengths > 0)
    order = units[np.lexsort((units, hashes[units], lengths[units]))]
    same = (hashes[order[1:]] == hashes[order[:-1]]) & (lengths[order[1:]] == lengths[order[:-1]])
    # The first unit of each run of equal hashes is the candidate representative.
    first = np.maximum.accumulate(np.where(np.concatenate([[False], same]), 0,
                                           np.arange(len(order))))  # fmt: skip
    candidates = np.flatnonzero(np.concatenate([[False], same]))
    twins, representatives = order[candidates], order[first[candidates]]
    if len(twins) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    # Check the candidates entry by entry, so that a hash collision never pairs rows.
    count = lengths[twins]
    left = _ranges(pointers[twins], count)
    right = _ranges(pointers[representatives], count)
    equal = (columns[left] == columns[right]) & (values[left] == values[right])
    starts = np.cumsum(count) - count
    verified = np.logical_and.reduceat(equal, starts)
    pairs = np.stack([twins[verified], representatives[verified]], axis=1).astype(np.int64)
    return pairs[np.argsort(pairs[:, 0], kind="stable")]


def twins_last(block: FeedForward, bound: np.ndarray | None):
    """Return (block, representatives, deltas) for the packer.

    The block loses the W1 entries of the twins of `find_twins`, and its hidden units
    are renumbered so that the twins are the last units, in their order.
    `representatives` gives each twin's representative by its new number and `deltas`
    the differences of their biases. Without twins, or when the renumbering could change
    a result, returns the block unchanged and empty arrays.

    The engine then fills the twins eight at a time. Renumbering the units changes the
    order in which W2 adds them into x. That is exact when every partial sum of that
    product stays below LIMIT, which `bound` (the block's input bound) shows.
    """
    none = (block, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))
    reduced, (pairs, deltas) = find_twins(block, bound)
    if len(pairs) == 0:
        return none
    # The growth of the whole block bounds the twins' units too.
    if not np.all(bound + _block_growth(block, bound) < LIMIT):
        return none
    hidden = len(block.b1)
    twins = pairs[:, 0]
    is_twin = np.zeros(hidden, dtype=bool)
    is_twin[twins] = True
    order = np.concatenate([np.flatnonzero(~is_twin), twins])
    renumber = np.empty(hidden, dtype=np.int64)
    renumber[order] = np.arange(hidden)
    w1 = SparseMatrix(reduced.w1.shape, renumber[reduced.w1.rows], reduced.w1.cols,
                      reduced.w1.values)  # fmt: skip
    w2 = SparseMatrix(block.w2.shape, block.w2.rows, renumber[block.w2.cols],
                      block.w2.values)  # fmt: skip
    b1 = np.asarray(block.b1, dtype=np.float64)[order]
    return FeedForward(w1, b1, w2, block.b2), renumber[pairs[:, 1]], deltas


def _select_units(block: FeedForward, units: np.ndarray, b2: np.ndarray) -> FeedForward:
    """Return the block of the hidden units in `units` (ascending), renumbered from 0,
    with output bias b2."""
    renumber = np.full(len(block.b1), -1, dtype=np.int64)
    renumber[units] = np.arange(len(units))
    first = renumber[block.w1.rows] >= 0
    second = renumber[block.w2.cols] >= 0
    w1 = SparseMatrix((len(units), block.w1.shape[1]), renumber[block.w1.rows[first]],
                      block.w1.cols[first], block.w1.values[first])  # fmt: skip
    w2 = SparseMatrix((block.w2.shape[0], len(units)), block.w2.rows[second],
                      renumber[block.w2.cols[second]], block.w2.values[second])  # fmt: skip
    return FeedForward(w1, np.asarray(block.b1, dtype=np.float64)[units], w2, b2)


def _compose(w2: SparseMatrix, w1: SparseMatrix) -> SparseMatrix:
    """Return the product w2 @ w1 without its zero entries."""
    # By unit: the columns of y that each unit reads, with their weights.
    pointers, columns, values = w1.csr()
    counts = pointers[w2.cols + 1] - pointers[w2.cols]
    entries = _ranges(pointers[w2.cols], counts)
    rows = np.repeat(w2.rows, counts)
    columns = columns[entries]
    width = w1.shape[1]
    keys, inverse = np.unique(rows * width + columns, return_inverse=True)
    sums = np.zeros(len(keys), dtype=np.float64)
    np.add.at(sums, inverse, np.repeat(w2.values, counts) * values[entries])
    nonzero = sums != 0.0
    return SparseMatrix((w2.shape[0], width), keys[nonzero] // width, keys[nonzero] % width,
                        sums[nonzero])  # fmt: skip


def split_linear_units(block: FeedForward, interval: tuple[np.ndarray, np.ndarray],
                       written: np.ndarray, elsewhere: np.ndarray):  # fmt: skip
    """Return (remembered, linear): the block as a smaller block plus a linear map of
    its input y. The block must be exact (`layer_sums_exact`) for inputs in `interval`.
    `linear` is None when no unit is folded, and then `remembered` keeps every unit
    that can fire.

    A unit whose pre-activation is never negative over the interval is linear: its ReLU
    passes everything, so the unit adds W2[:, u] (W1[u] y + b1[u]). Most such units
    copy a bit from one field to another, and a copy puts its input into the block's
    memo key, so that the whole block misses whenever the copied value is new. The
    linear units fold into one matrix L = W2_lin W1_lin, which the engine applies at
    every step, and W2_lin b1_lin joins b2; the memo keys `remembered` by the columns
    that its units read. The fold is made only when L reads a column that the other
    units do not, and when L has no more entries than the units it replaces. No block of
    the layer may write a column L reads (`written`: the rows the layer's blocks write),
    so that the engine may apply L after the other blocks added their outputs.

    A unit whose pre-activation is never positive adds nothing and is left out;
    layer_sums_exact bounds its output by 0 from the same interval. Adding L y apart
    is another order of the same integer terms, exact while every partial sum stays
    below LIMIT: the bound of |y| (`magnitude(interval)`), what the rest of the layer
    adds (`elsewhere`), the block's growth and |L| |y| must sum below it.
    """
    b1 = np.asarray(block.b1, dtype=np.float64)
    b2 = np.asarray(block.b2, dtype=np.float64)
    low, high = _signed_product(block.w1, *interval)
    low, high = low + b1, high + b1
    live = high > 0
    linear = live & (low >= 0)
    others = live & ~linear
    whole = _select_units(block, np.flatnonzero(live), b2), None
    linear_columns = np.unique(block.w1.cols[linear[block.w1.rows]])
    other_columns = np.unique(block.w1.cols[others[block.w1.rows]])
    if np.isin(linear_columns, other_columns).all() or written[linear_columns].any():
        return whole
    part = _select_units(block, np.flatnonzero(linear), np.zeros_like(b2))
    folded = _compose(part.w2, part.w1)
    if len(folded.values) > len(part.w1.values) + len(part.w2.values):
        return whole
    constant = np.zeros_like(b2)
    np.add.at(constant, part.w2.rows, part.w2.values * part.b1[part.w2.cols])
    bound = magnitude(interval)
    total = (bound + elsewhere + _block_growth(block, bound, interval)
             + _abs_product(folded, bound) + np.abs(constant))  # fmt: skip
    if not (_integral(folded.values) and _integral(constant) and np.all(total < LIMIT)):
        return whole
    return _select_units(block, np.flatnonzero(others), b2 + constant), folded


def growth(block: FeedForward, interval: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Return a bound of what the block adds to x, and of every partial sum of it, for
    an input in `interval`."""
    return _block_growth(block, magnitude(interval), interval)
