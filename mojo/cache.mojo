# The KV cache of one hard-max attention head, with exact eviction and the exact-match
# index of docs/model.md section 1.
#
# Each distinct key owns one slot. Appending a key that is already cached overwrites
# that slot's value and stamp (the position that wrote it): the older entry has the same
# score as the newer one for every query and loses every tie, so it can never win an
# argmax again. A hash table from the key's components to its slot finds equal keys.
#
# For an exact-match head the same table answers a query (t_1 .. t_n, 1) directly: the
# winner is the slot of key (t_1 .. t_n, n), or the sentinel (0 .. 0, 2n - 1) when that
# key is absent. The cache uses the table for a query only while every key appended so
# far has one of the forms the contract allows and the query has its form too; otherwise
# it takes the brute-force argmax, which is exact for any keys.
#
# Most keys of a tlc model are ternary: every component but the last is -1, 0 or +1.
# Such a key (with at most 64 of those components) is encoded without loss as a `Code`,
# the bit masks of its nonzero and of its negative components plus the bit pattern of
# its last component, and found in a second hash table by that code, which costs one
# mix and three integer compares instead of hashing and comparing the Float64s. Whether
# a key is ternary depends only on the key, so equal keys always meet in the same table.

from std.memory import bitcast

from kernels import (
    MASK_BITS,
    FloatPtr,
    MaskPtr,
    copy_floats,
    float_ptr,
    int_ptr,
    lane_bits,
    nonzero_mask,
)

comptime EMPTY = -1
comptime SLOT_BITS = 40  # the low bits of a code_table place, which contain slot + 1
comptime SLOT_MASK: UInt64 = (UInt64(1) << SLOT_BITS) - 1
comptime LANES = 8  # SIMD width for hashing and comparing keys
comptime INITIAL_TABLE_SIZE = 16
comptime GOLDEN: UInt64 = 0x9E3779B97F4A7C15
comptime MIX1: UInt64 = 0xBF58476D1CE4E5B9
comptime MIX2: UInt64 = 0x94D049BB133111EB


@always_inline
def mix(value: UInt64) -> UInt64:
    """Return the splitmix64 finalizer of `value`: every input bit affects every
    output bit, the high bits included."""
    var mixed = (value ^ (value >> 30)) * MIX1
    mixed = (mixed ^ (mixed >> 27)) * MIX2
    return mixed ^ (mixed >> 31)


@always_inline
def hash_key(key: FloatPtr, width: Int, multipliers: Pointer[UInt64, MutUntrackedOrigin]) -> UInt64:
    """Hash the bit patterns of the key's components.

    Keys are often made of +-1.0, whose bit patterns differ only in bit 63. Each word is
    folded (w ^ w >> 32) so that bit also reaches bit 31 and multiplied by an
    independent random odd multiplier of its position; the products are summed, which
    needs no chain of dependent multiplications, and the sum is mixed. Multipliers that
    share a factor (such as c * (2i + 1)) would make the sum depend on little more than
    which positions are negative, so they come from `mix`. Adding 0.0 maps -0.0 to +0.0,
    so keys that compare equal hash equally.
    """
    var lanes = SIMD[DType.uint64, LANES](0)
    var i = 0
    while i + LANES <= width:
        var words = bitcast[DType.uint64, LANES](key.unsafe_load[width=LANES](i) + 0.0)
        lanes += (words ^ (words >> 32)) * multipliers.unsafe_load[width=LANES](i)
        i += LANES
    var total = lanes.reduce_add()
    while i < width:
        var word = bitcast[DType.uint64](key[unsafe_offset=i] + 0.0)
        total += (word ^ (word >> 32)) * multipliers[unsafe_offset=i]
        i += 1
    return mix(total)


comptime CODE_BITS = 64  # ternary components a Code can hold
comptime CODE_NONZERO: UInt64 = 0xD6E8FEB86659FD93  # odd multipliers of the code words
comptime CODE_NEGATIVE: UInt64 = 0xA0761D6478BD642F
comptime CODE_LAST: UInt64 = 0xE7037ED1A0B428DB


@fieldwise_init
struct Code(Equatable, ImplicitlyCopyable, Movable):
    """A ternary key: bit i of `nonzero` and `negative` describe component i, and `last`
    is the bit pattern of the last component (never of -0.0 or a NaN)."""

    var nonzero: UInt64
    var negative: UInt64
    var last: UInt64

    def __eq__(self, other: Self) -> Bool:
        return (
            self.nonzero == other.nonzero
            and self.negative == other.negative
            and self.last == other.last
        )

    def hash(self) -> UInt64:
        return mix(
            self.nonzero * CODE_NONZERO + self.negative * CODE_NEGATIVE + self.last * CODE_LAST
        )


@always_inline
def encode_ternary(key: FloatPtr, width: Int, mut code: Code) -> Bool:
    """Set `code` to the key's code and return True when the key is ternary: width - 1
    <= CODE_BITS components in {-1, 0, +1} and a last component that is not a NaN."""
    var n = width - 1
    if n > CODE_BITS or n < 0:
        return False
    var last = key[unsafe_offset=n] + 0.0  # -0.0 becomes +0.0
    if last != last:
        return False
    var nonzero: UInt64 = 0
    var negative: UInt64 = 0
    var i = 0
    while i + LANES <= n:
        var values = key.unsafe_load[width=LANES](i)
        var is_zero = values.eq(0.0)
        var is_positive = values.eq(1.0)
        var is_negative = values.eq(-1.0)
        if not (is_zero | is_positive | is_negative).reduce_and():
            return False
        nonzero |= lane_bits(~is_zero) << UInt64(i)
        negative |= lane_bits(is_negative) << UInt64(i)
        i += LANES
    if i < n and n >= LANES:
        # The last eight components end at n. The first LANES - (n - i) of them were
        # encoded above, so their bits are shifted out.
        var values = key.unsafe_load[width=LANES](n - LANES)
        var is_zero = values.eq(0.0)
        var is_positive = values.eq(1.0)
        var is_negative = values.eq(-1.0)
        if not (is_zero | is_positive | is_negative).reduce_and():
            return False
        var encoded = UInt64(LANES - (n - i))
        nonzero |= (lane_bits(~is_zero) >> encoded) << UInt64(i)
        negative |= (lane_bits(is_negative) >> encoded) << UInt64(i)
        i = n
    while i < n:
        var value = key[unsafe_offset=i]
        if value == 1.0:
            nonzero |= UInt64(1) << UInt64(i)
        elif value == -1.0:
            nonzero |= UInt64(1) << UInt64(i)
            negative |= UInt64(1) << UInt64(i)
        elif value != 0.0:
            return False
        i += 1
    code = Code(nonzero, negative, bitcast[DType.uint64](last))
    return True


@always_inline
def keys_equal(first: FloatPtr, second: FloatPtr, width: Int) -> Bool:
    """Return True when the keys are equal component for component (-0.0 == 0.0)."""
    var i = 0
    while i + LANES <= width:
        var a = first.unsafe_load[width=LANES](i)
        var b = second.unsafe_load[width=LANES](i)
        if not a.eq(b).reduce_and():
            return False
        i += LANES
    while i < width:
        if first[unsafe_offset=i] != second[unsafe_offset=i]:
            return False
        i += 1
    return True


struct HeadCache(Movable):
    """Keys, values and stamps of the distinct keys a head has seen."""

    var key_width: Int
    var value_width: Int
    var exact: Bool  # the metadata declares an exact-match head
    var keys: List[Float64]  # slot s holds keys[s * key_width : (s + 1) * key_width]
    var values: List[Float64]
    # The nonzero components of each slot's value, value_words words per slot, found
    # when the value is written so that a head's output need not look for them.
    var value_masks: List[UInt64]
    var value_words: Int
    var stamps: List[Int]  # the position that last wrote each slot
    var table: List[Int]  # open addressing with linear probing: a slot or EMPTY
    var table_count: Int  # slots in `table`: those whose key is not ternary
    var codes: List[Code]  # the code of each slot (unused for a key that is not ternary)
    # The slots of ternary keys, found by code. A place is 0 when empty, else the top
    # 64 - SLOT_BITS bits of the code's hash (a tag) over slot + 1, which stays below
    # 2^40 because 2^40 slots would take terabytes of keys. The tag rejects almost every
    # other code before `codes` is read, and 8-byte places keep the table in cache.
    var code_table: List[UInt64]
    var code_count: Int
    var index_usable: Bool  # every key so far has an exact-match form
    var sentinel: Int  # slot of the sentinel key, or EMPTY
    var probe: List[Float64]  # scratch key for exact-match lookups
    var probe_steps: Int  # buckets visited by `find` beyond the first, for tests
    var last_indexed: Bool  # the latest `attend` answered through the exact-match index
    var multipliers: List[UInt64]  # one random odd multiplier per key component

    def __init__(out self, key_width: Int, value_width: Int, exact: Bool):
        self.key_width = key_width
        self.value_width = value_width
        self.exact = exact and key_width >= 1
        self.keys = List[Float64]()
        self.values = List[Float64]()
        self.value_words = value_width // MASK_BITS + 1
        self.value_masks = List[UInt64]()
        self.stamps = List[Int]()
        self.table = List[Int](length=INITIAL_TABLE_SIZE, fill=EMPTY)
        self.table_count = 0
        self.codes = List[Code]()
        self.code_table = List[UInt64](length=INITIAL_TABLE_SIZE, fill=0)
        self.code_count = 0
        self.index_usable = True
        self.sentinel = EMPTY
        self.probe = List[Float64](length=max(key_width, 1), fill=0.0)
        self.probe_steps = 0
        self.last_indexed = False
        self.multipliers = List[UInt64](capacity=max(key_width, 1))
        for i in range(max(key_width, 1)):
            self.multipliers.append(mix(GOLDEN * UInt64(i + 1)) | 1)

    def _multipliers(mut self) -> Pointer[UInt64, MutUntrackedOrigin]:
        return Pointer[UInt64, MutUntrackedOrigin](
            unsafe_from_address=Int(self.multipliers.unsafe_ptr())
        )

    def count(self) -> Int:
        return len(self.stamps)

    def value_ptr(mut self, slot: Int) -> FloatPtr:
        return float_ptr(self.values).unsafe_offset(slot * self.value_width)

    def value_mask_ptr(mut self, slot: Int) -> MaskPtr:
        """Return the mask of the nonzero components of the value of `slot`."""
        return MaskPtr(unsafe_from_address=Int(self.value_masks.unsafe_ptr())).unsafe_offset(
            slot * self.value_words
        )

    def _add_value(mut self, slot: Int, value: FloatPtr):
        """Append the value of `slot`, a new slot, and its nonzero mask."""
        for i in range(self.value_width):
            self.values.append(value[unsafe_offset=i])
        for _ in range(self.value_words):
            self.value_masks.append(0)
        nonzero_mask(value, self.value_width, self.value_mask_ptr(slot))

    def _set_value(mut self, slot: Int, value: FloatPtr):
        """Overwrite the value of `slot` and its nonzero mask."""
        copy_floats(self.value_ptr(slot), value, self.value_width)
        nonzero_mask(value, self.value_width, self.value_mask_ptr(slot))

    def find(mut self, key: FloatPtr) -> Int:
        """Return the slot whose key equals `key` component for component, or EMPTY."""
        var code = Code(0, 0, 0)
        if encode_ternary(key, self.key_width, code):
            return self.find_code(code)
        return self._find_float(key)

    def find_code(mut self, code: Code) -> Int:
        """Return the slot of the ternary key with this code, or EMPTY."""
        var mask = len(self.code_table) - 1
        var hash = code.hash()
        var position = Int(hash) & mask
        var tag = hash >> SLOT_BITS
        var table = self.code_table.unsafe_ptr()
        var codes = self.codes.unsafe_ptr()
        while True:
            var place = table[unsafe_offset=position]
            if place == 0:
                return EMPTY
            if place >> SLOT_BITS == tag:
                var slot = Int(place & SLOT_MASK) - 1
                if codes[unsafe_offset=slot] == code:
                    return slot
            position = (position + 1) & mask
            self.probe_steps += 1

    def _find_float(mut self, key: FloatPtr) -> Int:
        var mask = len(self.table) - 1
        var position = Int(hash_key(key, self.key_width, self._multipliers())) & mask
        var keys = float_ptr(self.keys)
        var table = int_ptr(self.table)
        while True:
            var slot = table[unsafe_offset=position]
            if slot == EMPTY:
                return EMPTY
            if keys_equal(keys.unsafe_offset(slot * self.key_width), key, self.key_width):
                return slot
            position = (position + 1) & mask
            self.probe_steps += 1

    def _place(mut self, slot: Int):
        """Put the slot of a key that is not ternary into `table` at the first free
        place of its probe chain."""
        var mask = len(self.table) - 1
        var key = float_ptr(self.keys).unsafe_offset(slot * self.key_width)
        var position = Int(hash_key(key, self.key_width, self._multipliers())) & mask
        while self.table[position] != EMPTY:
            position = (position + 1) & mask
        self.table[position] = slot

    def _place_code(mut self, slot: Int):
        """Put the slot of a ternary key into `code_table`."""
        var mask = len(self.code_table) - 1
        var hash = self.codes[slot].hash()
        var position = Int(hash) & mask
        while self.code_table[position] != 0:
            position = (position + 1) & mask
        self.code_table[position] = ((hash >> SLOT_BITS) << SLOT_BITS) | UInt64(slot + 1)

    def _insert(mut self, slot: Int, ternary: Bool):
        """Index a new slot, doubling its table when that becomes more than half full,
        or a quarter full for `code_table`, where every query of an exact-match head
        looks up a code and a sparser table shortens the probes of misses."""
        if ternary:
            self.code_count += 1
            if 4 * self.code_count > len(self.code_table):
                var size = 2 * len(self.code_table)
                self.code_table = List[UInt64](length=size, fill=0)
                var code = Code(0, 0, 0)
                for other in range(self.count()):
                    var key = float_ptr(self.keys).unsafe_offset(other * self.key_width)
                    if encode_ternary(key, self.key_width, code):
                        self._place_code(other)
            else:
                self._place_code(slot)
            return
        self.table_count += 1
        if 2 * self.table_count > len(self.table):
            self.table = List[Int](length=2 * len(self.table), fill=EMPTY)
            var code = Code(0, 0, 0)
            for other in range(self.count()):
                var key = float_ptr(self.keys).unsafe_offset(other * self.key_width)
                if not encode_ternary(key, self.key_width, code):
                    self._place(other)
        else:
            self._place(slot)

    def append(mut self, key: FloatPtr, value: FloatPtr, stamp: Int) -> Int:
        """Cache (key, value) written at position `stamp`; return its slot.

        An equal key already cached is replaced, which is the exact eviction.
        """
        var code = Code(0, 0, 0)
        var ternary = encode_ternary(key, self.key_width, code)
        var slot = self.find_code(code) if ternary else self._find_float(key)
        if slot == EMPTY:
            slot = self.count()
            for i in range(self.key_width):
                self.keys.append(key[unsafe_offset=i])
            self._add_value(slot, value)
            self.stamps.append(stamp)
            self.codes.append(code)
            self._insert(slot, ternary)
            if self.exact:
                self._check_key_form(key, slot)
            return slot
        # Such a write often stores the value the slot already holds, and then neither
        # the value nor its mask is written again.
        if not keys_equal(self.value_ptr(slot), value, self.value_width):
            self._set_value(slot, value)
        self.stamps.unsafe_get(slot) = stamp
        return slot

    def rewrite(mut self, slot: Int, value: FloatPtr, stamp: Int):
        """Append a key equal to the key of `slot`, with this value, at position
        `stamp`: what `append` does for a cached key, without looking the key up."""
        self._set_value(slot, value)
        self.stamps.unsafe_get(slot) = stamp

    def store_value(mut self, slot: Int, value: FloatPtr, stamp: Int):
        """Write the value and stamp of `slot`, appending it when slot == count(), for a
        cache whose keys another head's cache holds and finds."""
        if slot == self.count():
            self._add_value(slot, value)
            self.stamps.append(stamp)
        else:
            self.rewrite(slot, value, stamp)

    def store_stamp(mut self, slot: Int, stamp: Int):
        """Write the stamp of `slot`, appending it when slot == count(), for a cache
        whose keys and values other heads' caches hold."""
        if slot == self.count():
            self.stamps.append(stamp)
        else:
            self.stamps.unsafe_get(slot) = stamp

    def restamp(mut self, slot: Int, stamp: Int):
        """Append the key and value that `slot` holds again, at position `stamp`."""
        self.stamps.unsafe_get(slot) = stamp

    def _check_key_form(mut self, key: FloatPtr, slot: Int):
        """Record whether a new key keeps the exact-match index exact.

        With n = key_width - 1 the allowed keys are (s, n) with every s_i in {-1, +1},
        (s, c) with every s_i in {-1, 0, +1} and c <= n - 2, and the sentinel
        (0 .. 0, 2n - 1).
        """
        var n = self.key_width - 1
        var signs = True
        var ternary = True
        var zeros = True
        for i in range(n):
            var component = key[unsafe_offset=i]
            var is_sign = component == 1.0 or component == -1.0
            signs = signs and is_sign
            ternary = ternary and (is_sign or component == 0.0)
            zeros = zeros and component == 0.0
        var last = key[unsafe_offset=n]
        if signs and last == Float64(n):
            return
        if ternary and last <= Float64(n - 2):
            return
        if zeros and last == Float64(2 * n - 1):
            self.sentinel = slot
            return
        self.index_usable = False

    def attend(mut self, query: FloatPtr) -> Int:
        """Return the slot with the largest q . k, the latest stamp winning ties.

        Sets `last_indexed` when the exact-match index gave the answer, which then
        depends only on the query and the set of cached keys, not on the stamps.
        """
        self.last_indexed = True
        return self._attend(query)

    def _attend(mut self, query: FloatPtr) -> Int:
        if self.exact and self.index_usable and self.sentinel != EMPTY:
            var n = self.key_width - 1
            if query[unsafe_offset=n] != 1.0:
                return self.attend_brute_force(query)
            # The query's code, if it has the form (t, 1) with every t_i = +-1, is the
            # code of the key (t, n) that it selects.
            var code = Code(0, 0, 0)
            if n <= CODE_BITS and encode_ternary(query, self.key_width, code):
                var all_signs = (
                    UInt64(0) - 1 if n == CODE_BITS else (UInt64(1) << UInt64(n)) - 1
                )
                if code.nonzero == all_signs:
                    code.last = bitcast[DType.uint64](Float64(n))
                    var slot = self.find_code(code)
                    return slot if slot != EMPTY else self.sentinel
                return self.attend_brute_force(query)
            var form = True
            var probe = float_ptr(self.probe)
            for i in range(n):
                var component = query[unsafe_offset=i]
                form = form and (component == 1.0 or component == -1.0)
                probe[unsafe_offset=i] = component
            if form:
                probe[unsafe_offset=n] = Float64(n)
                var slot = self.find(probe)
                return slot if slot != EMPTY else self.sentinel
        return self.attend_brute_force(query)

    def attend_brute_force(mut self, query: FloatPtr) -> Int:
        self.last_indexed = False
        var keys = float_ptr(self.keys)
        var stamps = int_ptr(self.stamps)
        var best = 0
        var best_score: Float64 = 0.0
        var best_stamp = -1
        for slot in range(self.count()):
            var base = slot * self.key_width
            var score: Float64 = 0.0
            for i in range(self.key_width):
                score += query[unsafe_offset=i] * keys[unsafe_offset=base + i]
            var stamp = stamps[unsafe_offset=slot]
            if best_stamp < 0 or score > best_score or (
                score == best_score and stamp > best_stamp
            ):
                best = slot
                best_score = score
                best_stamp = stamp
        return best
