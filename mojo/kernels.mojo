# Sparse matrix kernels of the Mojo runtime.
#
# Every matrix of the model lives in compressed-sparse-row form inside flat arrays that
# the engine owns (see `Arrays`); a `Csr` holds the offsets of one matrix inside them.
# Entry values are stored as Float32 when every value of the model converts to Float32
# exactly, which halves the bytes read per entry; all arithmetic is in Float64.

comptime FloatPtr = Pointer[Float64, MutUntrackedOrigin]
comptime IntPtr = Pointer[Int, MutUntrackedOrigin]
comptime ColumnPtr = Pointer[Int32, MutUntrackedOrigin]
comptime BytePtr = Pointer[UInt8, MutUntrackedOrigin]


def float_ptr(ref values: List[Float64]) -> FloatPtr:
    """Return an untracked pointer to the first element of `values`.

    The pointer is valid until the list grows or is destroyed.
    """
    return FloatPtr(unsafe_from_address=Int(values.unsafe_ptr()))


def int_ptr(ref values: List[Int]) -> IntPtr:
    """Return an untracked pointer to the first element of `values`."""
    return IntPtr(unsafe_from_address=Int(values.unsafe_ptr()))


@fieldwise_init
struct Arrays[dtype: DType](ImplicitlyCopyable, Movable):
    """Pointers to the weight arrays, with entry values of type `dtype`."""

    var row_pointers: IntPtr
    var columns: ColumnPtr
    var values: Pointer[Scalar[Self.dtype], MutUntrackedOrigin]
    var floats: FloatPtr  # bias vectors


@fieldwise_init
struct Csr(ImplicitlyCopyable, Movable):
    """One sparse matrix: row r holds the entries e = p[r] .. p[r + 1] - 1, where p is
    row_pointers[indptr :], entry e has column columns[indices + e] and value
    values[entries + e]."""

    var rows: Int
    var cols: Int
    var indptr: Int  # offset in `row_pointers` of the rows + 1 row pointers
    var indices: Int  # offset in `columns` of the column of entry 0
    var entries: Int  # offset in `values` of the value of entry 0


@always_inline
def gather[
    dtype: DType
](matrix: Csr, bias: Int, arrays: Arrays[dtype], x: FloatPtr, result: FloatPtr):
    """Set result = matrix @ x + floats[bias : bias + rows].

    Four partial sums break the dependency chain of one accumulator. The order of the
    additions differs from a plain loop, which changes nothing for the certified models
    of docs/model.md: every partial sum there is an integer that Float64 holds exactly.
    """
    var row_pointers = arrays.row_pointers.unsafe_offset(matrix.indptr)
    var columns = arrays.columns.unsafe_offset(matrix.indices)
    var values = arrays.values.unsafe_offset(matrix.entries)
    for row in range(matrix.rows):
        var start = row_pointers[unsafe_offset=row]
        var end = row_pointers[unsafe_offset=row + 1]
        var sum0: Float64 = 0.0
        var sum1: Float64 = 0.0
        var sum2: Float64 = 0.0
        var sum3: Float64 = 0.0
        var entry = start
        while entry + 4 <= end:
            sum0 += _term(values, columns, x, entry)
            sum1 += _term(values, columns, x, entry + 1)
            sum2 += _term(values, columns, x, entry + 2)
            sum3 += _term(values, columns, x, entry + 3)
            entry += 4
        while entry < end:
            sum0 += _term(values, columns, x, entry)
            entry += 1
        var total = (sum0 + sum1) + (sum2 + sum3)
        result[unsafe_offset=row] = total + arrays.floats[unsafe_offset=bias + row]


@always_inline
def _term[
    dtype: DType
](
    values: Pointer[Scalar[dtype], MutUntrackedOrigin],
    columns: ColumnPtr,
    x: FloatPtr,
    entry: Int,
) -> Float64:
    var column = Int(columns[unsafe_offset=entry])
    return values[unsafe_offset=entry].cast[DType.float64]() * x[unsafe_offset=column]


@always_inline
def add_row[dtype: DType](matrix: Csr, row: Int, arrays: Arrays[dtype], x: FloatPtr):
    """Add row `row` of the matrix to x (an embedding lookup)."""
    var row_pointers = arrays.row_pointers.unsafe_offset(matrix.indptr)
    var columns = arrays.columns.unsafe_offset(matrix.indices)
    var values = arrays.values.unsafe_offset(matrix.entries)
    for entry in range(row_pointers[unsafe_offset=row], row_pointers[unsafe_offset=row + 1]):
        var column = Int(columns[unsafe_offset=entry])
        x[unsafe_offset=column] += values[unsafe_offset=entry].cast[DType.float64]()


@always_inline
def scatter_add[
    dtype: DType
](transposed: Csr, coefficients: FloatPtr, arrays: Arrays[dtype], x: FloatPtr):
    """Add W @ coefficients to x, where `transposed` holds W^T.

    Row j of W^T is column j of W, so a zero coefficient (a ReLU that is off, most of
    the time) skips its whole column. Skipping adds exactly 0 * w, so it is exact.
    """
    var row_pointers = arrays.row_pointers.unsafe_offset(transposed.indptr)
    var columns = arrays.columns.unsafe_offset(transposed.indices)
    var values = arrays.values.unsafe_offset(transposed.entries)
    for j in range(transposed.rows):
        var coefficient = coefficients[unsafe_offset=j]
        if coefficient == 0.0:
            continue
        for entry in range(row_pointers[unsafe_offset=j], row_pointers[unsafe_offset=j + 1]):
            var row = Int(columns[unsafe_offset=entry])
            var weight = values[unsafe_offset=entry].cast[DType.float64]()
            x[unsafe_offset=row] += weight * coefficient


@always_inline
def relu(values: FloatPtr, length: Int):
    for i in range(length):
        if values[unsafe_offset=i] < 0.0:
            values[unsafe_offset=i] = 0.0


@always_inline
def first_argmax(values: FloatPtr, length: Int) -> Int:
    """Return the lowest index among the maximal entries of values[0 : length]."""
    var best = 0
    for i in range(1, length):
        if values[unsafe_offset=i] > values[unsafe_offset=best]:
            best = i
    return best
