# Sparse matrix kernels of the Mojo runtime.
#
# Every matrix of the model lives in compressed-sparse-row form inside two flat arrays
# that the engine owns: `ints` (row pointers and column indices) and `floats` (values
# and bias vectors). A `Csr` holds the offsets of one matrix inside those arrays.

comptime FloatPtr = Pointer[Float64, MutUntrackedOrigin]
comptime IntPtr = Pointer[Int, MutUntrackedOrigin]
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
struct Csr(ImplicitlyCopyable, Movable):
    """One sparse matrix: row r holds the entries indptr[r] .. indptr[r + 1] - 1, where
    entry e has column ints[indices + e] and value floats[values + e]."""

    var rows: Int
    var cols: Int
    var indptr: Int  # offset in `ints` of the rows + 1 row pointers
    var indices: Int  # offset in `ints` of the column of entry 0
    var values: Int  # offset in `floats` of the value of entry 0


@always_inline
def gather(
    matrix: Csr, bias: Int, ints: IntPtr, floats: FloatPtr, x: FloatPtr, result: FloatPtr
):
    """Set result = matrix @ x + floats[bias : bias + rows]."""
    for row in range(matrix.rows):
        var start = ints[unsafe_offset=matrix.indptr + row]
        var end = ints[unsafe_offset=matrix.indptr + row + 1]
        var total: Float64 = 0.0
        for entry in range(start, end):
            var column = ints[unsafe_offset=matrix.indices + entry]
            total += floats[unsafe_offset=matrix.values + entry] * x[unsafe_offset=column]
        result[unsafe_offset=row] = total + floats[unsafe_offset=bias + row]


@always_inline
def scatter_add(
    transposed: Csr, coefficients: FloatPtr, ints: IntPtr, floats: FloatPtr, x: FloatPtr
):
    """Add W @ coefficients to x, where `transposed` holds W^T.

    Row j of W^T is column j of W, so a zero coefficient (a ReLU that is off, most of
    the time) skips its whole column. Skipping adds exactly 0 * w, so it is exact.
    """
    for j in range(transposed.rows):
        var coefficient = coefficients[unsafe_offset=j]
        if coefficient == 0.0:
            continue
        var start = ints[unsafe_offset=transposed.indptr + j]
        var end = ints[unsafe_offset=transposed.indptr + j + 1]
        for entry in range(start, end):
            var row = ints[unsafe_offset=transposed.indices + entry]
            x[unsafe_offset=row] += floats[unsafe_offset=transposed.values + entry] * coefficient


@always_inline
def add_vector(offset: Int, length: Int, floats: FloatPtr, x: FloatPtr):
    """Add floats[offset : offset + length] to x."""
    for i in range(length):
        x[unsafe_offset=i] += floats[unsafe_offset=offset + i]


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
