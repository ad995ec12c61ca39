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

from std.memory import bitcast, unsafe_memcpy

from kernels import FloatPtr, float_ptr, int_ptr

comptime EMPTY = -1
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
    var stamps: List[Int]  # the position that last wrote each slot
    var table: List[Int]  # open addressing with linear probing: a slot or EMPTY
    var index_usable: Bool  # every key so far has an exact-match form
    var sentinel: Int  # slot of the sentinel key, or EMPTY
    var probe: List[Float64]  # scratch key for exact-match lookups
    var probe_steps: Int  # buckets visited by `find` beyond the first, for tests
    var multipliers: List[UInt64]  # one random odd multiplier per key component

    def __init__(out self, key_width: Int, value_width: Int, exact: Bool):
        self.key_width = key_width
        self.value_width = value_width
        self.exact = exact and key_width >= 1
        self.keys = List[Float64]()
        self.values = List[Float64]()
        self.stamps = List[Int]()
        self.table = List[Int](length=INITIAL_TABLE_SIZE, fill=EMPTY)
        self.index_usable = True
        self.sentinel = EMPTY
        self.probe = List[Float64](length=max(key_width, 1), fill=0.0)
        self.probe_steps = 0
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

    def find(mut self, key: FloatPtr) -> Int:
        """Return the slot whose key equals `key` component for component, or EMPTY."""
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
        """Put `slot` into the hash table at the first free place of its probe chain."""
        var mask = len(self.table) - 1
        var key = float_ptr(self.keys).unsafe_offset(slot * self.key_width)
        var position = Int(hash_key(key, self.key_width, self._multipliers())) & mask
        while self.table[position] != EMPTY:
            position = (position + 1) & mask
        self.table[position] = slot

    def _grow_table(mut self):
        var size = len(self.table) * 2
        self.table = List[Int](length=size, fill=EMPTY)
        for slot in range(self.count()):
            self._place(slot)

    def append(mut self, key: FloatPtr, value: FloatPtr, stamp: Int) -> Int:
        """Cache (key, value) written at position `stamp`; return its slot.

        An equal key already cached is replaced, which is the exact eviction.
        """
        var slot = self.find(key)
        if slot == EMPTY:
            slot = self.count()
            for i in range(self.key_width):
                self.keys.append(key[unsafe_offset=i])
            for i in range(self.value_width):
                self.values.append(value[unsafe_offset=i])
            self.stamps.append(stamp)
            if 2 * self.count() > len(self.table):
                self._grow_table()
            else:
                self._place(slot)
            if self.exact:
                self._check_key_form(key, slot)
            return slot
        unsafe_memcpy(dest=self.value_ptr(slot), src=value, count=self.value_width)
        self.stamps[slot] = stamp
        return slot

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
        """Return the slot with the largest q . k, the latest stamp winning ties."""
        if self.exact and self.index_usable and self.sentinel != EMPTY:
            var n = self.key_width - 1
            var form = query[unsafe_offset=n] == 1.0
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
