# Sparse matrix kernels of the Mojo runtime.
#
# Every matrix W of the model is stored by columns, and only its nonempty columns are
# stored: W @ v visits the columns j that W reads and skips those where v[j] is 0. The
# residual of a tlc model is mostly zeros (bits, one-hot codes and scratch dimensions
# that only some experts write), so most columns are skipped. For products with the
# residual, a bit mask of the residual's nonzero components is ANDed with a bit mask of
# the matrix's stored columns, so the skipped columns cost nothing at all. The arrays
# live in the engine (see `Arrays`) and a `Matrix` holds the offsets of one matrix.
# Entry values are stored as Float32 when every value of the model converts to Float32
# exactly, which halves the bytes read per entry; all arithmetic is in Float64.

from std.bit import count_trailing_zeros, pop_count
from std.memory import bitcast, pack_bits, unsafe_memcpy

comptime FloatPtr = Pointer[Float64, MutUntrackedOrigin]
comptime IntPtr = Pointer[Int, MutUntrackedOrigin]
comptime IndexPtr = Pointer[Int32, MutUntrackedOrigin]
comptime BytePtr = Pointer[UInt8, MutUntrackedOrigin]
comptime MaskPtr = Pointer[UInt64, MutUntrackedOrigin]
comptime MASK_BITS = 64
comptime MASK_SHIFT = 6  # log2(MASK_BITS)


@always_inline
def mask_word(index: Int) -> Int:
    """Return the mask word that holds the bit of a non-negative index. A shift, where
    `index // MASK_BITS` on a signed Int also compiles the rounding of negatives."""
    return index >> MASK_SHIFT


@always_inline
def lane_bits(lanes: SIMD[DType.bool, 8]) -> UInt64:
    """Return the eight lanes as bits 0 to 7 of an integer, lane i in bit i."""
    return UInt64(pack_bits[DType.uint8](lanes))


@always_inline
def mask_bit(index: Int) -> UInt64:
    """Return the bit of a non-negative index within its mask word."""
    return UInt64(1) << UInt64(index & (MASK_BITS - 1))


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

    var pointers: IntPtr  # per matrix: stored + 1 entry pointers, column masks and ranks
    var indices: IndexPtr  # per matrix: stored column ids, then the row of every entry
    var values: Pointer[Scalar[Self.dtype], MutUntrackedOrigin]
    var floats: FloatPtr  # bias vectors
    # Per entry e, at 2 e and 2 e + 1: the bits of its row as a signed integer of the
    # values' width, then its value, so that a product reads both from one cache line.
    var entries: Pointer[Scalar[Self.dtype], MutUntrackedOrigin]


@always_inline
def read_entry[
    dtype: DType
](entries: Pointer[Scalar[dtype], MutUntrackedOrigin], entry: Int) -> Tuple[Int, Float64]:
    """Return the (row, value) of an entry of `Arrays.entries`."""
    var value = entries[unsafe_offset=2 * entry + 1].cast[DType.float64]()
    comptime if dtype == DType.float32:
        var rows = Pointer[Int32, MutUntrackedOrigin](unsafe_from_address=Int(entries))
        return (Int(rows[unsafe_offset=2 * entry]), value)
    else:
        var rows = Pointer[Int64, MutUntrackedOrigin](unsafe_from_address=Int(entries))
        return (Int(rows[unsafe_offset=2 * entry]), value)


@fieldwise_init
struct Matrix(ImplicitlyCopyable, Movable):
    """One sparse matrix by stored columns. Stored column k is column
    indices[column_ids + k] of the matrix and holds the entries e = p[k] .. p[k + 1] - 1,
    where p is pointers[entry_pointers :]; entry e sits in row indices[row_ids + e] and
    has the value values[entries + e]. The mask covers the 64-column words first_word
    .. first_word + mask_words - 1, which contain every stored column: bit c of mask
    word i, pointers[column_mask + i], is set when column 64 (first_word + i) + c is
    stored, and pointers[column_rank + i] counts the stored columns before that word."""

    var rows: Int
    var stored: Int  # number of stored columns
    var entry_pointers: Int
    var column_ids: Int
    var row_ids: Int
    var entries: Int
    var first_word: Int
    var mask_words: Int
    var column_mask: Int
    var column_rank: Int
    # Every stored column holds exactly one entry, so stored column k holds entry
    # p[0] + k (set by the engine when it reads the header).
    var single: Bool


@always_inline
def accumulate_masked[
    dtype: DType, mark_output: Bool = False
](
    matrix: Matrix,
    arrays: Arrays[dtype],
    input: FloatPtr,
    input_mask: MaskPtr,
    output: FloatPtr,
    output_mask: MaskPtr,
    written_mask: MaskPtr,
):
    """Add matrix @ input to output, visiting only the stored columns whose bit is set
    in `input_mask`, a superset of input's nonzero components. With `mark_output`, set
    the bit of every output component written in `output_mask` and in `written_mask`."""
    # NOTE: a column whose input is 0 is skipped here and in the unembedding, so an
    # infinite or NaN weight there adds nothing, while numpy's 0 * inf is a NaN. With
    # non-finite weights the engine can therefore pick another token than the oracle.
    var pointers = arrays.pointers.unsafe_offset(matrix.entry_pointers)
    var entries = arrays.entries.unsafe_offset(2 * matrix.entries)
    var column_mask = arrays.pointers.unsafe_offset(matrix.column_mask)
    var column_rank = arrays.pointers.unsafe_offset(matrix.column_rank)
    if matrix.single:
        var first = Int(pointers[unsafe_offset=0])
        for index in range(matrix.mask_words):
            var word = matrix.first_word + index
            var stored_bits = UInt64(column_mask[unsafe_offset=index])
            var bits = stored_bits & input_mask[unsafe_offset=word]
            var rank = first + Int(column_rank[unsafe_offset=index])
            while bits != 0:
                var bit = count_trailing_zeros(bits)
                bits &= bits - 1
                var coefficient = input[unsafe_offset=word * MASK_BITS + Int(bit)]
                if coefficient == 0.0:
                    continue
                var below = stored_bits & ((UInt64(1) << bit) - 1)
                var row, weight = read_entry(entries, rank + Int(pop_count(below)))
                output[unsafe_offset=row] += weight * coefficient
                comptime if mark_output:
                    var row_bit = mask_bit(row)
                    output_mask[unsafe_offset=mask_word(row)] |= row_bit
                    written_mask[unsafe_offset=mask_word(row)] |= row_bit
        return
    for index in range(matrix.mask_words):
        var word = matrix.first_word + index
        var stored_bits = UInt64(column_mask[unsafe_offset=index])
        var bits = stored_bits & input_mask[unsafe_offset=word]
        while bits != 0:
            var bit = count_trailing_zeros(bits)
            bits &= bits - 1
            var coefficient = input[unsafe_offset=word * MASK_BITS + Int(bit)]
            if coefficient == 0.0:
                continue
            var below = stored_bits & ((UInt64(1) << bit) - 1)
            var k = column_rank[unsafe_offset=index] + Int(pop_count(below))
            var entry = Int(pointers[unsafe_offset=k])
            var end = Int(pointers[unsafe_offset=k + 1])
            while entry < end:
                var row, weight = read_entry(entries, entry)
                output[unsafe_offset=row] += weight * coefficient
                comptime if mark_output:
                    var bit = mask_bit(row)
                    output_mask[unsafe_offset=mask_word(row)] |= bit
                    written_mask[unsafe_offset=mask_word(row)] |= bit
                entry += 1


def same_affine[
    dtype: DType
](
    first: Matrix,
    first_bias: Int,
    second: Matrix,
    second_bias: Int,
    arrays: Arrays[dtype],
) -> Bool:
    """Return True when the two affine maps have equal shapes, stored columns, entries
    and biases, so that they give equal outputs for every input."""
    if first.rows != second.rows or first.stored != second.stored:
        return False
    for i in range(first.rows):
        var a = arrays.floats[unsafe_offset=first_bias + i]
        var b = arrays.floats[unsafe_offset=second_bias + i]
        if a != b or (a == 0.0 and bitcast[DType.uint64](a) != bitcast[DType.uint64](b)):
            return False
    var first_pointers = arrays.pointers.unsafe_offset(first.entry_pointers)
    var second_pointers = arrays.pointers.unsafe_offset(second.entry_pointers)
    for k in range(first.stored):
        if (
            arrays.indices[unsafe_offset=first.column_ids + k]
            != arrays.indices[unsafe_offset=second.column_ids + k]
        ):
            return False
        var length = first_pointers[unsafe_offset=k + 1] - first_pointers[unsafe_offset=k]
        if length != second_pointers[unsafe_offset=k + 1] - second_pointers[unsafe_offset=k]:
            return False
        for i in range(length):
            var a = first_pointers[unsafe_offset=k] + i
            var b = second_pointers[unsafe_offset=k] + i
            if (
                arrays.indices[unsafe_offset=first.row_ids + a]
                != arrays.indices[unsafe_offset=second.row_ids + b]
            ):
                return False
            var wa = arrays.values[unsafe_offset=first.entries + a]
            var wb = arrays.values[unsafe_offset=second.entries + b]
            if wa != wb or (wa == 0.0 and bitcast[DType.uint64](
                wa.cast[DType.float64]()
            ) != bitcast[DType.uint64](wb.cast[DType.float64]())):
                return False
    return True


@always_inline
def reads_input[
    dtype: DType
](matrix: Matrix, arrays: Arrays[dtype], input_mask: MaskPtr) -> Bool:
    """Return True when `input_mask` has a bit set in a column that the matrix stores.
    When it returns False, matrix @ input adds nothing, because `input_mask` is a
    superset of input's nonzero components."""
    var column_mask = arrays.pointers.unsafe_offset(matrix.column_mask)
    for index in range(matrix.mask_words):
        var word = matrix.first_word + index
        if UInt64(column_mask[unsafe_offset=index]) & input_mask[unsafe_offset=word] != 0:
            return True
    return False


@always_inline
def accumulate_marking[
    dtype: DType
](
    matrix: Matrix,
    arrays: Arrays[dtype],
    input: FloatPtr,
    output: FloatPtr,
    output_mask: MaskPtr,
    written_mask: MaskPtr,
):
    """Add matrix @ input to output, skipping the columns where input is 0, and set the
    bit of every output component written in `output_mask`, so that it stays a superset
    of output's nonzero components, and in `written_mask`.

    The additions run column by column rather than row by row. That order changes
    nothing for the certified models of docs/model.md, where every partial sum is an
    integer that Float64 represents exactly; skipping adds exactly 0 * w.
    """
    var pointers = arrays.pointers.unsafe_offset(matrix.entry_pointers)
    var column_ids = arrays.indices.unsafe_offset(matrix.column_ids)
    var entries = arrays.entries.unsafe_offset(2 * matrix.entries)
    for k in range(matrix.stored):
        var coefficient = input[unsafe_offset=Int(column_ids[unsafe_offset=k])]
        if coefficient == 0.0:
            continue
        for entry in range(pointers[unsafe_offset=k], pointers[unsafe_offset=k + 1]):
            var row, weight = read_entry(entries, entry)
            output[unsafe_offset=row] += weight * coefficient
            var bit = mask_bit(row)
            output_mask[unsafe_offset=mask_word(row)] |= bit
            written_mask[unsafe_offset=mask_word(row)] |= bit


@always_inline
def affine_masked[
    dtype: DType
](
    matrix: Matrix,
    bias: Int,
    arrays: Arrays[dtype],
    input: FloatPtr,
    input_mask: MaskPtr,
    output: FloatPtr,
):
    """Set output = matrix @ input + floats[bias : bias + rows], visiting only the
    columns set in input_mask."""
    # NOTE: the sum starts from the bias, while the numpy oracle adds the bias last, and
    # every product and its addition here are one fused multiply-add, which numpy rounds
    # twice. So where a product or a sum is not exact (non-integer weights, or values
    # past 2^53), a router or a field can pick another value than the oracle does.
    copy_floats(output, arrays.floats.unsafe_offset(bias), matrix.rows)
    accumulate_masked(matrix, arrays, input, input_mask, output, input_mask, input_mask)


@always_inline
def copy_floats(dest: FloatPtr, src: FloatPtr, count: Int):
    """Copy count values from src to dest, eight or four at a time. When count is not a
    multiple of the chunk, the last chunk ends at count and so copies some values a
    second time, in place of a loop over the rest. The ranges must not overlap."""
    if count >= 8:
        var i = 0
        while i + 8 <= count:
            dest.unsafe_store(i, src.unsafe_load[width=8](i))
            i += 8
        if i < count:
            dest.unsafe_store(count - 8, src.unsafe_load[width=8](count - 8))
    elif count >= 4:
        dest.unsafe_store(0, src.unsafe_load[width=4](0))
        dest.unsafe_store(count - 4, src.unsafe_load[width=4](count - 4))
    else:
        for i in range(count):
            dest[unsafe_offset=i] = src[unsafe_offset=i]


@always_inline
def add_column[
    dtype: DType
](
    matrix: Matrix,
    column: Int,
    arrays: Arrays[dtype],
    output: FloatPtr,
    scale: Float64,
    output_mask: MaskPtr,
    mirror: FloatPtr,
):
    """Add scale times stored column `column` to output (an embedding lookup, for a
    matrix that stores all of its columns), copy every written component to `mirror`
    and set or clear its mask bit by whether it is nonzero now."""
    var pointers = arrays.pointers.unsafe_offset(matrix.entry_pointers)
    var entries = arrays.entries.unsafe_offset(2 * matrix.entries)
    for entry in range(pointers[unsafe_offset=column], pointers[unsafe_offset=column + 1]):
        var row, weight = read_entry(entries, entry)
        var updated = output[unsafe_offset=row] + weight * scale
        output[unsafe_offset=row] = updated
        mirror[unsafe_offset=row] = updated
        var bit = mask_bit(row)
        var word = output_mask[unsafe_offset=mask_word(row)]
        output_mask[unsafe_offset=mask_word(row)] = (word | bit) if updated != 0.0 else (
            word & ~bit
        )


@always_inline
def add_scaled_column[
    dtype: DType
](matrix: Matrix, column: Int, arrays: Arrays[dtype], output: FloatPtr, scale: Float64):
    """Add scale times stored column `column` to output, for a matrix that stores all of
    its columns."""
    var pointers = arrays.pointers.unsafe_offset(matrix.entry_pointers)
    var entries = arrays.entries.unsafe_offset(2 * matrix.entries)
    for entry in range(pointers[unsafe_offset=column], pointers[unsafe_offset=column + 1]):
        var row, weight = read_entry(entries, entry)
        output[unsafe_offset=row] += weight * scale


@always_inline
def nonzero_mask(values: FloatPtr, length: Int, mask: MaskPtr):
    """Set `mask` to the nonzero components of values[0 : length], eight at a time."""
    comptime LANES = 8
    var word = 0
    var start = 0
    while start < length:
        var end = min(start + MASK_BITS, length)
        var bits: UInt64 = 0
        var i = start
        while i + LANES <= end:
            var nonzero = values.unsafe_load[width=LANES](i).ne(0.0)
            bits |= lane_bits(nonzero) << UInt64(i - start)
            i += LANES
        while i < end:
            bits |= UInt64(Int(values[unsafe_offset=i] != 0.0)) << UInt64(i - start)
            i += 1
        mask[unsafe_offset=word] = bits
        word += 1
        start = end


@always_inline
def positive_mask(values: FloatPtr, length: Int, mask: MaskPtr, nan_possible: Bool):
    """Set `mask` to the positive components of values[0 : length], eight at a time.

    This is the ReLU of a block: the second product reads only the components whose
    bit is set, so the others need not be zeroed. A NaN is kept, as numpy and torch
    keep it, so its bit is set too, found from the bits only when `nan_possible`. The
    last group of eight may read past `length`, so `values` must be readable up to the
    next multiple of 8; the bits of those extra lanes are cleared."""
    comptime LANES = 8
    var word = 0
    var start = 0
    while start < length:
        var end = min(start + MASK_BITS, length)
        var bits: UInt64 = 0
        var i = start
        while i < end:
            var chunk = values.unsafe_load[width=LANES](i)
            var kept = chunk.gt(0.0)
            if nan_possible:
                var magnitude = bitcast[DType.int64, LANES](chunk) & 0x7FFFFFFFFFFFFFFF
                kept = kept | magnitude.gt(0x7FF0000000000000)
            bits |= lane_bits(kept) << UInt64(i - start)
            i += LANES
        var used = end - start
        if used < MASK_BITS:
            bits &= (UInt64(1) << UInt64(used)) - 1
        mask[unsafe_offset=word] = bits
        word += 1
        start = end


@always_inline
def is_nan(value: Float64) -> Bool:
    """Return True when value is a NaN. The test reads the bits, because `value != value`
    was False for a NaN in this engine (Mojo 1.2.0, probably because float comparisons
    are compiled on the assumption that no operand is a NaN). Without its sign bit a NaN
    is above the bits of infinity."""
    return (bitcast[DType.int64, 1](value) & 0x7FFFFFFFFFFFFFFF) > 0x7FF0000000000000


@always_inline
def first_argmax(values: FloatPtr, length: Int, nan_possible: Bool) -> Int:
    """Return the lowest index among the maximal entries of values[0 : length].

    A NaN counts as larger than every number, as in numpy.argmax and torch.argmax, so
    the first NaN wins. Only when `nan_possible` are the values searched for one: the
    comparisons below are compiled on the assumption that there is none."""
    if nan_possible:
        for i in range(length):
            if is_nan(values[unsafe_offset=i]):
                return i
    if length == 2:
        return 1 if values[unsafe_offset=1] > values[unsafe_offset=0] else 0
    if length == 3:
        var first = values[unsafe_offset=0]
        var second = values[unsafe_offset=1]
        var third = values[unsafe_offset=2]
        if third > first and third > second:
            return 2
        return 1 if second > first else 0
    comptime LANES = 8
    if length >= LANES:
        # The answer is the first entry equal to the maximum (-0.0 equals 0.0 there as
        # in the comparisons below), found eight entries at a time. When length is not
        # a multiple of eight, the last eight entries are read as one more chunk. The
        # search reaches that chunk only when the entries before it hold no maximum, so
        # its first match is still the first one.
        var top = values.unsafe_load[width=LANES](0)
        var i = LANES
        while i + LANES <= length:
            top = max(top, values.unsafe_load[width=LANES](i))
            i += LANES
        var last = length - LANES
        if i < length:
            top = max(top, values.unsafe_load[width=LANES](last))
        var maximum = top.reduce_max()
        var j = 0
        while j + LANES <= length:
            var bits = lane_bits(values.unsafe_load[width=LANES](j).eq(maximum))
            if bits != 0:
                return j + Int(count_trailing_zeros(bits))
            j += LANES
        if j < length:
            var bits = lane_bits(values.unsafe_load[width=LANES](last).eq(maximum))
            if bits != 0:
                return last + Int(count_trailing_zeros(bits))
    var best = 0
    for i in range(1, length):
        if values[unsafe_offset=i] > values[unsafe_offset=best]:
            best = i
    return best
