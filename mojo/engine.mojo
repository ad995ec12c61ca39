# The decoding engine: weights, KV caches and the decode loop of docs/model.md
# section 1. It knows token fields only as integers and the model only as sparse
# matrices; which field is `kind`, which value means RUN and which fields form the
# output byte come from the packed header that tlc.mojo.runner writes.
#
# The packed model, written by tlc.mojo.runner.pack_model, is four arrays: `ints` (entry
# pointers, then the header), `indices` (Int32 column and row indices), `values` (the
# matrix entries, Float32 or Float64) and `floats` (bias vectors). ints[0] is the offset
# of the header in `ints`. The header:
#   MAGIC, D, F, L, kind_field, run_value, out_valid_field (-1: none),
#   byte_term_count, (field, weight) per byte term, vocab size per field,
#   incremental (1 when the embedding may be updated field by field),
#   nan_possible (0 when the packer proved that no logit of the unembedding or of a
#   router can be a NaN, tlc.mojo.twins.cannot_produce_nan),
#   embed^T (D x sum of V_f, every column stored; field f's value t is column
#   V_0 + .. + V_(f-1) + t), unembed (sum of V_f x D, the fields' rows stacked), its
#   bias and its head mask,
#   first_qkv_rows R (0: none), and when R > 0 the q, k and v maps of layer 0's heads
#   applied to the embedding (R x sum of V_f, every column stored, rows by head and then
#   q, k, v) and their bias,
#   per layer: head_count, per head (exact, wq, bq, wk, bk, wv, bv, wo, then the token
#              fields of the key, the value and the query: a count and that many
#              fields, or -1 when the projection reads a dimension a layer writes,
#              then deferrable and the head masks of wq, wk and wv),
#              has_shared, [shared block], expert_count, [router, router bias,
#              router head mask, expert blocks]
#   END_MARK
# A head mask has bit g set when the matrix reads a row that deferrable head g writes
# (tlc.mojo.deferred): the engine computes such a head's output only when a step reads
# it, before the first product that does.
# A matrix is the 10 Ints of a `Matrix`; a bias is one offset into `floats`; a block is
# (w1, b1, w2, b2 as a D x 1 matrix, twin count, twin representatives, twin deltas, the
# head mask of w1, exact: 1 when every sum of the block is an integer below 2^52 in any
# order, tlc.mojo.twins.layer_sums_exact, a D x D linear map of y with no columns stored
# when the block has none, tlc.mojo.twins.split_linear_units, and the head mask of that
# map). b2 is a matrix because it is added to the
# whole residual, where most of its components are zero. The twins (tlc.mojo.twins)
# are hidden units whose W1 rows the packer removed because they equal an earlier
# unit's. They are the block's last units; each one's representative is at an offset
# in `ints` and the differences of their biases at an offset in `floats`.

from std.bit import count_trailing_zeros, pop_count
from std.memory import bitcast, pack_bits, unsafe_memcpy
from std.sys import llvm_intrinsic
from std.sys.intrinsics import prefetch
from std.sys.info import CompilationTarget

from cache import HeadCache, mix
from kernels import (
    Arrays,
    BytePtr,
    FloatPtr,
    IndexPtr,
    IntPtr,
    MASK_BITS,
    MaskPtr,
    Matrix,
    mask_bit,
    mask_word,
    accumulate_marking,
    accumulate_masked,
    read_entry,
    add_column,
    add_scaled_column,
    affine_masked,
    copy_floats,
    first_argmax,
    float_ptr,
    int_ptr,
    nonzero_mask,
    positive_mask,
    same_affine,
)

comptime MAGIC = 0x746C6301
comptime FIELD_LANES = 16  # token fields compared at once
comptime MASK_LANES = 8  # words of a field mask compared at once
comptime RUN_LANES = 8  # logits of a run of the unembedding added at once
comptime SINGLE_ENTRY = -2  # marks an unembedding column of one entry (unembed_columns)
# A token's fields as the engine stores them: Int32, so that a cache line has 16.
comptime TokenPtr = Pointer[Int32, MutUntrackedOrigin]
# The largest field whose changes use the pair deltas (Engine.pair_fields).
comptime PAIR_VOCAB = 8
comptime EMBED_ENTRY_WORDS = 3  # the words of an embedding entry of Engine.pair_words
comptime END_MARK = 0x746C63FF
# The block memo (Engine.memo_table): its hash slots, a power of two, and the limits
# that make the next feed-forward pass clear it: records (at most half the slots, so
# that probes stay short) and words of records (8 bytes each, 8 MiB in all).
comptime MEMO_SLOTS = 1 << 15
comptime MEMO_SHIFT = 49  # 64 - log2(MEMO_SLOTS): a hash's slot is its top bits
comptime MEMO_RECORDS = MEMO_SLOTS // 2
comptime MEMO_WORDS = 1 << 20
comptime MEMO_RECORD_WORDS = 3  # the words before a record's key in Engine.memo_words
# A memo word holds a value's Float64 bits with a residual index (a column or a row,
# below 2^PACK_BITS) in its low PACK_BITS bits. Those bits of the value are zero for
# every integer of magnitude below 2^37. A value with any of them set is not remembered.
comptime PACK_BITS = 16
comptime PACK_MASK: UInt64 = (UInt64(1) << UInt64(PACK_BITS)) - 1
# Added to a column's field in Engine.column_fields when the field is cached.
comptime CACHED_COLUMN = 1 << 30
comptime HASH_MULTIPLIER: UInt64 = 0x9E3779B97F4A7C15  # odd, from the golden ratio


@fieldwise_init
struct HeadWeights(ImplicitlyCopyable, Movable):
    var exact: Bool
    var wq: Matrix
    var bq: Int
    var wk: Matrix
    var bk: Int
    var wv: Matrix
    var bv: Int
    var wo: Matrix
    # The token fields that the key, the value and the query depend on, as the offset
    # of a field mask in Engine.field_masks, or -1 when they depend on more.
    var key_fields: Int
    var value_fields: Int
    var query_fields: Int
    # Whether the head's output may wait until a product reads it, and the head masks of
    # its projections.
    var deferrable: Bool
    var reads_q: UInt64
    var reads_k: UInt64
    var reads_v: UInt64


@fieldwise_init
struct BlockWeights(ImplicitlyCopyable, Movable):
    """A ReLU block x + W2 ReLU(W1 y + b1) + b2."""

    var w1: Matrix
    var b1: Int
    var w2: Matrix
    var b2: Matrix  # one column
    var twin_count: Int  # the last twin_count hidden units are twins
    var twin_representatives: Int  # each twin's representative, in `ints`
    var twin_deltas: Int  # b1[twin] - b1[representative] in `floats`
    var reads: UInt64  # the head mask of w1
    # Whether every sum of the block is an integer below 2^52 in any order, so that the
    # engine may remember its output (see Engine.memo_table).
    var exact: Bool
    # A D x D map L of y that the block adds besides its units, computed at every step
    # and never remembered (no columns stored: none), and the head mask of L. No block
    # of the layer writes a column L reads (tlc.mojo.twins.split_linear_units).
    var linear: Matrix
    var linear_reads: UInt64


@fieldwise_init
struct LayerWeights(ImplicitlyCopyable, Movable):
    var first_head: Int
    var head_count: Int
    var shared: Int  # index into the block list, or -1
    var router: Matrix
    var router_bias: Int
    var router_reads: UInt64  # the head mask of the router
    var first_expert: Int  # index into the block list
    var expert_count: Int
    # The router's argmax at a position where x is zero in every column it reads, so
    # that its logits are its bias.
    var bias_expert: Int
    # Where Engine.router_choices lists, per stored router column, the router's argmax
    # when x is 1 in that column and 0 in the others it reads.
    var one_hot_choices: Int


struct HeaderReader:
    """Reads the packed header Int by Int."""

    var ints: IntPtr
    var position: Int
    var length: Int

    def __init__(out self, ints: IntPtr, length: Int):
        self.ints = ints
        self.position = 0
        self.length = length

    def next(mut self) raises -> Int:
        if self.position >= self.length:
            raise Error("packed model header ends early")
        var value = self.ints[unsafe_offset=self.position]
        self.position += 1
        return value

    def matrix(mut self) raises -> Matrix:
        var rows = self.next()
        var stored = self.next()
        var entry_pointers = self.next()
        var column_ids = self.next()
        var row_ids = self.next()
        var entries = self.next()
        var first_word = self.next()
        var mask_words = self.next()
        var column_mask = self.next()
        var column_rank = self.next()
        var single = stored > 0 and entry_pointers >= 0 and entry_pointers + stored < self.length
        if single:
            var first = self.ints[unsafe_offset=entry_pointers]
            for k in range(1, stored + 1):
                if self.ints[unsafe_offset=entry_pointers + k] != first + k:
                    single = False
                    break
        return Matrix(
            rows,
            stored,
            entry_pointers,
            column_ids,
            row_ids,
            entries,
            first_word,
            mask_words,
            column_mask,
            column_rank,
            single,
        )

    def block(mut self) raises -> BlockWeights:
        var w1 = self.matrix()
        var b1 = self.next()
        var w2 = self.matrix()
        var b2 = self.matrix()
        var twin_count = self.next()
        var twin_representatives = self.next()
        var twin_deltas = self.next()
        var reads = UInt64(self.next())
        var exact = self.next() != 0
        var linear = self.matrix()
        var linear_reads = UInt64(self.next())
        if twin_count < 0 or twin_count > w1.rows:
            raise Error(
                String(
                    "packed model: a block has ", twin_count, " twins and ", w1.rows,
                    " hidden units; repack the weights",
                )
            )
        if twin_count > 0 and (
            twin_representatives < 0 or twin_representatives + twin_count > self.length
        ):
            raise Error(
                String(
                    "packed model: a block's twins at offset ", twin_representatives,
                    " lie outside the ", self.length, " packed integers; repack the weights",
                )
            )
        for i in range(twin_count):
            var representative = self.ints[unsafe_offset=twin_representatives + i]
            if representative < 0 or representative >= w1.rows - twin_count:
                raise Error(
                    String(
                        "packed model: twin representative ", representative,
                        " is not one of the ", w1.rows - twin_count,
                        " units before the twins; repack the weights",
                    )
                )
        return BlockWeights(
            w1,
            b1,
            w2,
            b2,
            twin_count,
            twin_representatives,
            twin_deltas,
            reads,
            exact,
            linear,
            linear_reads,
        )


struct Engine(Movable):
    """A loaded model and the state of one decoding run."""

    var ints: List[Int]
    var indices: List[Int32]
    var value_words: List[Float64]  # raw storage of the entry values
    # Raw storage of Arrays.entries, which the engine builds at load from `indices` and
    # `value_words`. The products read only it.
    var entry_words: List[Float64]
    var narrow: Bool  # entry values are Float32, two per word of value_words
    var floats: List[Float64]
    var width: Int
    var field_count: Int
    var kind_field: Int
    var run_value: Int
    var out_valid_field: Int
    var byte_fields: List[Int]
    var byte_weights: List[Int]
    var vocab: List[Int]
    var field_offsets: List[Int]  # first column of each field in embed, row in unembed
    var embed: Matrix
    var unembed: Matrix
    var unembed_bias: Int
    var unembed_reads: UInt64  # the head mask of the unembedding
    # Layer 0's queries, keys and values of `embedded_token`, kept like the embedding
    # when the packer found that exact: first_qkv is Wqkv E^T with R = first_qkv_rows
    # rows and `kept_qkv` its product with the token plus the bias. kept_offsets[3 h + p]
    # is the offset in kept_qkv of head h's query (p = 0), key (1) or value (2), or -1.
    var first_qkv_rows: Int
    var first_qkv: Matrix
    var first_qkv_bias: Int
    var kept_qkv: List[Float64]
    var kept_offsets: List[Int]
    # The embedding of `embedded_token`, kept so that the next token's embedding only
    # changes the fields that differ. Exact because every embedding value is an integer.
    var incremental: Bool
    # Whether a logit may be a NaN, so that each argmax must first look for one.
    var nan_possible: Bool
    var embedded: List[Float64]
    # Whether no row of the embedding is a row that a head or a block writes. Then x
    # equals the embedding at the embedding's rows at every position, and is zero at
    # the layers' rows before they write them, so the engine keeps the embedding in x
    # itself and `embedded` stays unused.
    var separate_rows: Bool
    var embedded_token: List[Int32]
    var embedded_valid: Bool
    # For a field f of V_f <= PAIR_VOCAB values, the change of the embedding and of the
    # kept q, k and v when f goes from value `old` to value `new`. That change is pair
    # p = pair_fields[2 f] + old V_f + new. Its embedding entries fill the words
    # pair_pointers[2 p] .. pair_pointers[2 p + 1] - 1 of pair_words, EMBED_ENTRY_WORDS
    # each: the bits of the row (an Int64), the delta, and the bits of a UInt64 that
    # flips the row's bit in embedded_mask when the row turns zero or nonzero. The
    # entries of kept_qkv follow up to pair_pointers[2 p + 2] - 1, two words each: the
    # row's bits and the delta. pair_fields[2 f + 1] is V_f, and pair_fields[2 f] is -1
    # for a larger field, whose changes subtract and add whole columns. Adding a delta
    # is exact for the same reason as the incremental embedding.
    var pair_fields: List[Int]
    # The fields with an embedding entry or a kept q, k or v entry in some value's
    # column. A change of another field only updates embedded_token.
    var embedded_fields: List[UInt64]
    var pair_pointers: List[Int32]
    var pair_words: List[Float64]
    # Whether each row of the embedding is written by the columns of one field only.
    # Then a row's value depends on that field's value alone, so whether a pair makes
    # it zero is known at load and the flips are valid. Otherwise the mask bits are set
    # from the updated values.
    var owned_rows: Bool
    # Bit masks, one bit per residual dimension: set where `embedded` is nonzero, and a
    # superset of the nonzero components of x.
    var embedded_mask: List[UInt64]
    var x_mask: List[UInt64]
    # The components of x that the layers wrote at this position. x equals `embedded`
    # everywhere else, so the next position restores only these.
    var written_mask: List[UInt64]
    # The fields of the token at `position` that differ from the token before it,
    # one bit per field (every bit at position 0), and the field masks of the heads
    # (see _read_field_mask).
    var changed_fields: List[UInt64]
    var field_words: Int
    var field_masks: List[UInt64]
    # The unembedding's logits, equal to its bias between steps: a step adds the
    # product into them, marks the fields whose logits it writes in written_fields,
    # takes the argmax of those fields and restores their bias. logit_fields[r] is the
    # field of logit r and default_token the argmax of each field's bias, the answer
    # for every field whose logits the product does not write.
    var unembed_logits: List[Float64]
    var written_fields: List[UInt64]
    var logit_fields: List[Int32]
    # Per stored column of the unembedding, the field of every logit it writes, or
    # -1 - i when they belong to several fields: column_field_lists[i] is the count of
    # those fields and they follow it. A column of a cached field has CACHED_COLUMN
    # plus the field (see cached_fields).
    var column_fields: List[Int32]
    var column_field_lists: List[Int32]
    # The same per column c of x, with the column's entries, so that the product reads
    # one place per column: unembed_columns[4 c] is its column_fields entry, except
    # that a column of several fields has -1 - j, where column_field_words[j] counts
    # the words of their field mask and (word, bits) pairs follow. 4 c + 1 and 4 c + 2
    # are the first and the end of its entries, and 4 c + 3 is -1, or r when its last
    # entries are a run: at least RUN_LANES entries of consecutive rows, which the
    # product adds RUN_LANES logits at a time. Then the entries end before the run, and
    # runs[3 r] .. [3 r + 2] are the run's first row, its length and the offset of its
    # weights in run_weights. Each logit still gets one fused multiply-add. A column of
    # one field and one entry has SINGLE_ENTRY there instead, its row in 4 c + 1 and
    # the offset of its weight in run_weights in 4 c + 2.
    var unembed_columns: List[Int32]
    var column_field_words: List[UInt64]
    var runs: List[Int]
    var run_weights: List[Float64]
    # The argmax cache of the fields of more than three values whose columns write no
    # other field (cached_fields; each of their columns has CACHED_COLUMN added to its
    # column_fields entry). Such a field's logits are its bias plus, per nonzero column
    # of x that writes them, that column's weights times x there, so its argmax is a
    # function of those columns and values. The product skips the field and counts
    # its nonzero columns in unembed_keys[2 f] (at most 2, meaning two or more) and
    # keeps the column c of x and the value bits of the first at 2 f + 1 and in
    # column_values[f]. When it has one, argmax_cache[2 c] and [2 c + 1] are the value
    # bits and the argmax plus one (0: none yet) of the last value seen in column c.
    var cached_fields: List[UInt64]
    var unembed_keys: List[Int]
    var column_values: List[UInt64]
    var argmax_cache: List[UInt64]
    # For a key the cache lacks, the field's logits are computed in field_logits from
    # the field's own list of columns: field f's are items field_items[f] ..
    # field_items[f + 1] - 1 in column order, and item i adds item_weights[j] times x at
    # column item_columns[i] to logit item_rows[j] of the field, for j = item_entries[i]
    # .. item_entries[i + 1] - 1 in the unembedding's entry order. So each logit gets
    # the same additions in the same order as the product would give it.
    var field_logits: List[Float64]
    var field_items: List[Int32]
    var item_columns: List[Int32]
    var item_entries: List[Int32]
    var item_rows: List[Int32]
    var item_weights: List[Float64]
    var default_token: List[Int32]
    # Per half of token_pair (field_words words each, the half at offset 0 first): a
    # superset of the fields where that token differs from default_token, so that a
    # new prediction rewrites only those and the fields the product writes.
    var token_fields: List[UInt64]
    # The fields of two and of three values, whose argmax the unembedding takes with
    # inline comparisons. Both are empty when nan_possible, so that every field then
    # goes through first_argmax and its search for a NaN.
    var two_value_fields: List[UInt64]
    var three_value_fields: List[UInt64]
    # Query and key projections with at most one entry per column and finite weights,
    # stored by rows: the column of x and the weight of each row's first entry, with
    # column `width` (a zero that pads x) and weight 0 for a row without an entry. A
    # row's further entries (row, column, weight) follow in column order in the extra
    # lists.
    # Such a projection is a gather and a multiply-add per row, in place of the masked
    # product. Per head, gather_offsets[3 h + p] is the offset of its query (p = 0), key
    # (1) or value (2) projection in the gather lists, or -1, and its extra entries are
    # extra_pointers[3 h + p] .. extra_pointers[3 h + p + 1] - 1.
    # Value projections and routers take the masked product instead, which visits
    # only the nonzero columns of x: routers read one-hot codes such as the opcode's,
    # of which one component is nonzero, so a gather per expert costs more.
    var gather_columns: List[Int]
    var gather_weights: List[Float64]
    var gather_offsets: List[Int]
    var extra_rows: List[Int]
    var extra_columns: List[Int]
    var extra_weights: List[Float64]
    var extra_pointers: List[Int]
    var layers: List[LayerWeights]
    # Layers quiet_start .. end have no heads and no shared block, and their routers
    # choose an expert that adds nothing when x is zero in every column they read,
    # the set bits of quiet_mask. See `_quiet`.
    var quiet_start: Int
    var quiet_mask: List[UInt64]
    var quiet_words: List[Int]  # the indices of the nonzero words of quiet_mask
    var quiet_reads: UInt64  # the head masks of those routers
    var router_choices: List[Int32]  # see LayerWeights.one_hot_choices
    # The deferrable heads of this position whose output x does not hold yet, by bit.
    var pending_heads: UInt64
    var heads: List[HeadWeights]
    var blocks: List[BlockWeights]
    var caches: List[HeadCache]
    # Per head: the slot that the latest position appended to (-1 before the first),
    # and whether `winners` holds an answer of the exact-match index that is still
    # right while the query and the cache's slot count (in `winner_counts`) stay the same.
    var last_slots: List[Int]
    # Per head: the first head with the same key projection and lookup kind (itself
    # when none), whose cache then finds the slots and answers the queries for both,
    # and the head whose cached values it reads: the first head with the same key
    # leader and the same value projection, itself when none.
    var key_leaders: List[Int]
    var value_leaders: List[Int]
    var winner_reusable: List[Bool]
    var winner_counts: List[Int]
    # Work buffers, sized for the largest matrix that writes into each.
    var x: List[Float64]
    var query: List[Float64]
    var key: List[Float64]
    var value: List[Float64]
    var shared_hidden: List[Float64]
    var expert_hidden: List[Float64]
    var shared_mask: List[UInt64]  # positive units of shared_hidden after the ReLU
    var expert_mask: List[UInt64]
    var logits: List[Float64]  # the logits of a router
    var winners: List[Int]
    var one: List[Float64]  # the input of the one-column b2 matrices
    # The block memo. A block whose sums are exact (BlockWeights.exact) computes its
    # output W2 ReLU(W1 y + b1) + b2 from the nonzero components of y in the columns W1
    # stores, and adding that output to x in one sum per row gives the same x as adding
    # its terms one by one, because every partial sum is an integer below 2^52. So the
    # engine remembers the output of each input it has seen. A record in memo_words is
    # the key's word count, the end of its outputs, the record's end, the key (the
    # block's index, then the value bits of every nonzero input with its column in the
    # low PACK_BITS, in column order), the value bits of every output component that
    # the block writes with its row in the low PACK_BITS, and per nonzero word of those
    # rows' mask the word's index and bits. When an input or an output value does not
    # pack, or the residual is wider than 2^PACK_BITS, the block is computed as without
    # the memo. memo_table has two words per slot, the key's hash (0: empty) and the
    # first word of its record, probed linearly from the slot of the hash. memo_records
    # counts the records. When a limit (memo_record_limit, MEMO_WORDS) is reached,
    # memo_full makes the next feed-forward pass start from an empty memo.
    var memo_table: List[UInt64]
    var memo_records: Int
    var memo_words: List[UInt64]
    var memo_full: Bool
    # The record limit (at most MEMO_RECORDS; tests lower it to clear the memo often),
    # and counts of the outputs taken from the memo and of the times it was cleared.
    var memo_record_limit: Int
    var memo_hits: Int
    var memo_clears: Int
    # Lookups in memo_table and the slots they read, so that tests can check that the
    # hash spreads keys.
    var memo_lookups: Int
    var memo_probes: Int
    # The keys of this layer's shared block (words 0 ..) and expert (key_words ..).
    var memo_keys: List[UInt64]
    var key_words: Int
    # A recorded block's output before it is added to x, zero between blocks, and the
    # bits of the components it writes.
    var delta: List[Float64]
    var delta_mask: List[UInt64]
    # The nonzero words of delta_mask while _record_delta writes a record.
    var record_mask: List[UInt64]
    # Decoding state.
    var position: Int
    # Two tokens: the latest predicted one ("pending") at pending_offset and the one
    # emitted before it ("previous", or the last prompt token) at F - pending_offset.
    var token_pair: List[Int32]
    var prompt_token: List[Int32]  # a prompt token, converted from Int
    var pending_offset: Int
    var need_step: Bool  # pending was emitted and must be fed back before the next one
    var stopped: Bool

    def __init__(
        out self,
        var ints: List[Int],
        var indices: List[Int32],
        var value_words: List[Float64],
        narrow: Bool,
        var floats: List[Float64],
    ) raises:
        self.ints = ints^
        self.indices = indices^
        self.value_words = value_words^
        self.entry_words = List[Float64]()
        self.narrow = narrow
        self.floats = floats^
        if len(self.ints) == 0:
            raise Error("packed model is empty")
        var reader = HeaderReader(int_ptr(self.ints), len(self.ints))
        reader.position = self.ints[0]
        if reader.next() != MAGIC:
            raise Error("packed model has the wrong magic number")
        self.width = reader.next()
        self.field_count = reader.next()
        var layer_count = reader.next()
        self.kind_field = reader.next()
        self.run_value = reader.next()
        self.out_valid_field = reader.next()
        self.byte_fields = List[Int]()
        self.byte_weights = List[Int]()
        for _ in range(reader.next()):
            self.byte_fields.append(reader.next())
            self.byte_weights.append(reader.next())
        self.vocab = List[Int]()
        self.field_offsets = List[Int]()
        var total_vocab = 0
        for _ in range(self.field_count):
            var vocab = reader.next()
            if vocab < 1 or vocab > Int(Int32.MAX):
                raise Error(
                    String(
                        "packed model: a token field has ", vocab,
                        " values, outside 1 to 2^31 - 1; repack the weights",
                    )
                )
            self.vocab.append(vocab)
            self.field_offsets.append(total_vocab)
            total_vocab += vocab
        self.incremental = reader.next() != 0
        self.nan_possible = reader.next() != 0
        self.embed = reader.matrix()
        self.unembed = reader.matrix()
        self.unembed_bias = reader.next()
        self.unembed_reads = UInt64(reader.next())
        self.first_qkv_rows = reader.next()
        self.first_qkv = Matrix(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, False)
        self.first_qkv_bias = 0
        if self.first_qkv_rows > 0:
            self.first_qkv = reader.matrix()
            self.first_qkv_bias = reader.next()
        if self.unembed.rows != total_vocab:
            raise Error(
                String(
                    "packed model: the unembedding has ", self.unembed.rows,
                    " rows but the fields have ", total_vocab, " values",
                )
            )
        var unembed_bias = float_ptr(self.floats).unsafe_offset(self.unembed_bias)
        self.unembed_logits = List[Float64](length=total_vocab + 1, fill=0.0)
        self.logit_fields = List[Int32](length=total_vocab + 1, fill=0)
        self.default_token = List[Int32](length=self.field_count, fill=0)
        for f in range(self.field_count):
            var first = self.field_offsets[f]
            for r in range(first, first + self.vocab[f]):
                self.unembed_logits[r] = unembed_bias[unsafe_offset=r]
                self.logit_fields[r] = Int32(f)
            self.default_token[f] = Int32(
                first_argmax(unembed_bias.unsafe_offset(first), self.vocab[f], self.nan_possible)
            )
        self.field_words = self.field_count // MASK_BITS + 1
        self.written_fields = List[UInt64](length=self.field_words, fill=0)
        self.column_fields = List[Int32]()
        self.column_field_lists = List[Int32]()
        self.two_value_fields = List[UInt64](length=self.field_words, fill=0)
        self.three_value_fields = List[UInt64](length=self.field_words, fill=0)
        self.cached_fields = List[UInt64](length=self.field_words, fill=0)
        self.unembed_keys = List[Int](length=2 * self.field_count, fill=0)
        self.column_values = List[UInt64](length=self.field_count, fill=0)
        self.argmax_cache = List[UInt64](length=2 * self.width, fill=0)
        self.unembed_columns = List[Int32]()
        self.column_field_words = List[UInt64]()
        self.runs = List[Int]()
        self.run_weights = List[Float64]()
        var largest_vocab = 1
        for f in range(self.field_count):
            largest_vocab = max(largest_vocab, self.vocab[f])
        self.field_logits = List[Float64](length=largest_vocab, fill=0.0)
        self.field_items = List[Int32]()
        self.item_columns = List[Int32]()
        self.item_entries = List[Int32]()
        self.item_rows = List[Int32]()
        self.item_weights = List[Float64]()
        if not self.nan_possible:
            for f in range(self.field_count):
                if self.vocab[f] == 2:
                    self.two_value_fields[mask_word(f)] |= mask_bit(f)
                elif self.vocab[f] == 3:
                    self.three_value_fields[mask_word(f)] |= mask_bit(f)
        self.changed_fields = List[UInt64](length=_mask_words(self.field_count), fill=0)
        self.field_masks = List[UInt64]()
        self.layers = List[LayerWeights]()
        self.heads = List[HeadWeights]()
        self.blocks = List[BlockWeights]()
        for _ in range(layer_count):
            self.layers.append(
                _read_layer(reader, self.heads, self.blocks, self.field_masks, self.field_count)
            )
        for block in self.blocks:
            if block.linear.stored > 0 and block.linear.rows != self.width:
                raise Error("packed model: a block's linear map has the wrong shape")
        if self.width > Int(PACK_MASK) + 1:
            # The memo's words hold residual indices in PACK_BITS bits.
            for ref block in self.blocks:
                block.exact = False
        for ref layer in self.layers:
            if layer.expert_count > 0:
                var bias = float_ptr(self.floats).unsafe_offset(layer.router_bias)
                layer.bias_expert = first_argmax(bias, layer.expert_count, self.nan_possible)
        if reader.next() != END_MARK:
            raise Error("packed model header does not end where expected")
        if self.first_qkv_rows > 0 and (
            self.first_qkv.rows != self.first_qkv_rows or self.first_qkv.stored != total_vocab
        ):
            raise Error("packed model: the first layer's qkv matrix has the wrong shape")
        self.kept_qkv = List[Float64](length=self.first_qkv_rows + 1, fill=0.0)
        self.kept_offsets = _kept_offsets(self.layers, self.heads, self.first_qkv_rows)
        self.caches = List[HeadCache]()
        for head in self.heads:
            self.caches.append(HeadCache(head.wk.rows, head.wv.rows, head.exact))
        self.last_slots = List[Int](length=len(self.heads), fill=-1)
        self.key_leaders = List[Int](length=len(self.heads), fill=0)
        self.value_leaders = List[Int](length=len(self.heads), fill=0)
        self.winner_reusable = List[Bool](length=len(self.heads), fill=False)
        self.winner_counts = List[Int](length=len(self.heads), fill=0)
        self.x = List[Float64](length=self.width + 1, fill=0.0)
        self.query = List[Float64](length=_max_rows(self.heads, 0) + 1, fill=0.0)
        self.key = List[Float64](length=_max_rows(self.heads, 1) + 1, fill=0.0)
        self.value = List[Float64](length=_max_rows(self.heads, 2) + 1, fill=0.0)
        for h in range(len(self.heads)):
            ref head = self.heads[h]
            # The output reads the mask words of its value in its value cache.
            if head.wo.rows != self.width or head.wo.first_word + head.wo.mask_words > (
                head.wv.rows // MASK_BITS + 1
            ):
                raise Error("packed model: an output projection has the wrong shape")
            if head.deferrable and h >= MASK_BITS:
                raise Error("packed model: only the first 64 heads can be deferrable")
        var hidden = _max_hidden(self.blocks) + 1
        # positive_mask reads up to seven components past a block's last unit.
        self.shared_hidden = List[Float64](length=hidden + 8, fill=0.0)
        self.expert_hidden = List[Float64](length=hidden + 8, fill=0.0)
        self.shared_mask = List[UInt64](length=hidden // MASK_BITS + 1, fill=0)
        self.expert_mask = List[UInt64](length=hidden // MASK_BITS + 1, fill=0)
        var logit_count = 1
        for layer in self.layers:
            logit_count = max(logit_count, layer.expert_count)
        self.logits = List[Float64](length=logit_count, fill=0.0)
        self.winners = List[Int](length=len(self.heads) + 1, fill=0)
        self.one = List[Float64](length=1, fill=1.0)
        self.memo_table = List[UInt64](length=2 * MEMO_SLOTS, fill=0)
        self.memo_records = 0
        # Reserved whole, so that growing it never copies it. The pages it does not
        # use yet are not touched.
        self.memo_words = List[UInt64](capacity=MEMO_WORDS)
        self.memo_full = False
        self.memo_record_limit = MEMO_RECORDS
        self.memo_hits = 0
        self.memo_clears = 0
        self.memo_lookups = 0
        self.memo_probes = 0
        self.key_words = self.width + 2  # the block index and a word per input
        self.memo_keys = List[UInt64](length=2 * self.key_words, fill=0)
        self.delta = List[Float64](length=self.width + 1, fill=0.0)
        # As long as x_mask, which _record_delta updates word by word.
        self.delta_mask = List[UInt64](
            length=max((self.width + MASK_BITS - 1) // MASK_BITS, 1), fill=0
        )
        self.record_mask = List[UInt64](length=len(self.delta_mask), fill=0)
        self.embedded = List[Float64](length=self.width, fill=0.0)
        self.separate_rows = False  # found below, once every field is set
        self.embedded_token = List[Int32](length=self.field_count, fill=0)
        self.embedded_valid = False
        var mask_words = (self.width + MASK_BITS - 1) // MASK_BITS
        self.embedded_mask = List[UInt64](length=max(mask_words, 1), fill=0)
        self.x_mask = List[UInt64](length=max(mask_words, 1), fill=0)
        self.written_mask = List[UInt64](length=max(mask_words, 1), fill=0)
        self.quiet_start = len(self.layers)
        self.quiet_mask = List[UInt64](length=max(mask_words, 1), fill=0)
        self.quiet_reads = 0
        self.router_choices = List[Int32]()
        self.pending_heads = 0
        var l = len(self.layers) - 1
        while l >= 0:
            var layer = self.layers[l]
            if layer.head_count != 0 or layer.shared >= 0 or layer.expert_count == 0:
                break
            ref block = self.blocks[layer.first_expert + layer.bias_expert]
            if block.w1.rows != 0 or block.b2.stored != 0 or block.linear.stored != 0:
                break
            for index in range(layer.router.mask_words):
                var word = layer.router.first_word + index
                self.quiet_mask[word] |= UInt64(self.ints[layer.router.column_mask + index])
            self.quiet_reads |= layer.router_reads
            self.quiet_start = l
            l -= 1
        self.quiet_words = List[Int]()
        for w in range(len(self.quiet_mask)):
            if self.quiet_mask[w] != 0:
                self.quiet_words.append(w)
        self.position = 0
        self.token_pair = List[Int32](length=2 * self.field_count, fill=0)
        self.prompt_token = List[Int32](length=self.field_count, fill=0)
        self.token_fields = List[UInt64](length=2 * self.field_words, fill=0)
        self.pending_offset = 0
        self.need_step = False
        self.stopped = False
        self.pair_fields = List[Int](length=2 * self.field_count, fill=-1)
        self.embedded_fields = List[UInt64](length=_mask_words(self.field_count), fill=0)
        for f in range(self.field_count):
            self.pair_fields[2 * f + 1] = self.vocab[f]
        self.pair_pointers = List[Int32]()
        self.pair_words = List[Float64]()
        self.owned_rows = False
        self.gather_columns = List[Int]()
        self.gather_weights = List[Float64]()
        var projections = 3 * len(self.heads)
        self.gather_offsets = List[Int](length=projections, fill=-1)
        self.extra_rows = List[Int]()
        self.extra_columns = List[Int]()
        self.extra_weights = List[Float64]()
        self.extra_pointers = List[Int](length=projections + 1, fill=0)
        if self.narrow:
            self._interleave_entries[DType.float32]()
            self._find_shared_projections[DType.float32]()
            self._index_embedding_deltas[DType.float32]()
            self._index_gathers[DType.float32]()
        else:
            self._interleave_entries[DType.float64]()
            self._find_shared_projections[DType.float64]()
            self._index_embedding_deltas[DType.float64]()
            self._index_gathers[DType.float64]()
        self._index_column_fields()
        if self.narrow:
            self._index_cached_fields[DType.float32]()
        else:
            self._index_cached_fields[DType.float64]()
        if self.narrow:
            self._index_unembed_columns[DType.float32]()
        else:
            self._index_unembed_columns[DType.float64]()
        self._find_token_fields(0)
        self._find_token_fields(self.field_count)
        if self.narrow:
            self._index_router_choices[DType.float32]()
        else:
            self._index_router_choices[DType.float64]()
        self.separate_rows = self._find_separate_rows()

    def _index_router_choices[dtype: DType](mut self):
        """Fill `router_choices` by running each router on x = 1 in one of its columns,
        with the same kernels as a step, so that a step may look its choice up."""
        var arrays = self._arrays[dtype]()
        var unit = List[Float64](length=self.width + 1, fill=0.0)
        var unit_mask = List[UInt64](length=len(self.x_mask), fill=0)
        var logits = float_ptr(self.logits)
        for ref layer in self.layers:
            layer.one_hot_choices = len(self.router_choices)
            if layer.expert_count == 0:
                continue
            for k in range(layer.router.stored):
                var column = Int(self.indices[layer.router.column_ids + k])
                unit[column] = 1.0
                unit_mask[mask_word(column)] = mask_bit(column)
                affine_masked(
                    layer.router, layer.router_bias, arrays, float_ptr(unit),
                    MaskPtr(unsafe_from_address=Int(unit_mask.unsafe_ptr())), logits,
                )
                self.router_choices.append(
                    Int32(first_argmax(logits, layer.expert_count, self.nan_possible))
                )
                unit[column] = 0.0
                unit_mask[mask_word(column)] = 0

    def _find_shared_projections[dtype: DType](mut self):
        """Fill `key_leaders` and `value_leaders` by comparing the heads' weights.

        A head of an earlier layer can lead too, when both projections read token
        fields only (key_fields or value_fields set): then both see the embedding, so
        equal weights give equal keys or values at every position."""
        var arrays = self._arrays[dtype]()
        for layer in self.layers:
            for h in range(layer.first_head, layer.first_head + layer.head_count):
                self.key_leaders[h] = h
                self.value_leaders[h] = h
                ref head = self.heads[h]
                for g in range(h):
                    ref other = self.heads[g]
                    var same_layer = g >= layer.first_head
                    if (
                        self.key_leaders[g] == g
                        and other.exact == head.exact
                        and (same_layer or (other.key_fields >= 0 and head.key_fields >= 0))
                        and same_affine(other.wk, other.bk, head.wk, head.bk, arrays)
                    ):
                        self.key_leaders[h] = g
                        # The values may equal those of any head that follows the same
                        # key leader, which keeps them at the same slots.
                        for v in range(g, h):
                            ref owner = self.heads[v]
                            if (
                                self.key_leaders[v] == g
                                and self.value_leaders[v] == v
                                and (
                                    v >= layer.first_head
                                    or (owner.value_fields >= 0 and head.value_fields >= 0)
                                )
                                and same_affine(owner.wv, owner.bv, head.wv, head.bv, arrays)
                            ):
                                self.value_leaders[h] = v
                                break
                        break

    def _extra(self, index: Int) -> Tuple[IntPtr, IntPtr, FloatPtr, Int, Int]:
        """Return the extra entries of gathered projection `index` for `project`."""
        return (
            IntPtr(unsafe_from_address=Int(self.extra_rows.unsafe_ptr())),
            IntPtr(unsafe_from_address=Int(self.extra_columns.unsafe_ptr())),
            FloatPtr(unsafe_from_address=Int(self.extra_weights.unsafe_ptr())),
            self.extra_pointers.unsafe_get(index),
            self.extra_pointers.unsafe_get(index + 1),
        )

    def _index_gathers[dtype: DType](mut self):
        """Fill the gather form of every query and key projection that has one."""
        var arrays = self._arrays[dtype]()
        for h in range(len(self.heads)):
            var head = self.heads[h]
            for p in range(3):
                # Value projections keep the masked product, which measured cheaper.
                if p < 2:
                    var matrix = head.wq if p == 0 else head.wk
                    self.gather_offsets[3 * h + p] = self._add_gather(matrix, arrays)
                self.extra_pointers[3 * h + p + 1] = len(self.extra_rows)

    def _add_gather[dtype: DType](mut self, matrix: Matrix, arrays: Arrays[dtype]) -> Int:
        """Append the gather form of `matrix` and return its offset, or return -1 when a
        column has two entries or a weight is not finite."""
        var pointers = arrays.pointers.unsafe_offset(matrix.entry_pointers)
        var columns = List[Int](length=matrix.rows, fill=self.width)
        var weights = List[Float64](length=matrix.rows, fill=0.0)
        var filled = List[Bool](length=matrix.rows, fill=False)
        var extra_rows = List[Int]()
        var extra_columns = List[Int]()
        var extra_weights = List[Float64]()
        for k in range(matrix.stored):
            var start = pointers[unsafe_offset=k]
            if pointers[unsafe_offset=k + 1] - start != 1:
                return -1
            var row = Int(arrays.indices[unsafe_offset=matrix.row_ids + start])
            var weight = arrays.values[unsafe_offset=matrix.entries + start].cast[
                DType.float64
            ]()
            if weight - weight != 0.0:
                return -1
            var column = Int(arrays.indices[unsafe_offset=matrix.column_ids + k])
            if filled[row]:
                extra_rows.append(row)
                extra_columns.append(column)
                extra_weights.append(weight)
                continue
            filled[row] = True
            columns[row] = column
            weights[row] = weight
        for i in range(len(extra_rows)):
            self.extra_rows.append(extra_rows[i])
            self.extra_columns.append(extra_columns[i])
            self.extra_weights.append(extra_weights[i])
        var offset = len(self.gather_columns)
        for row in range(matrix.rows):
            self.gather_columns.append(columns[row])
            self.gather_weights.append(weights[row])
        return offset

    def _index_embedding_deltas[dtype: DType](mut self) raises:
        """Fill the pair deltas of the embedding and of the first layer's kept q, k and v
        for every field of at most PAIR_VOCAB values."""
        var arrays = self._arrays[dtype]()
        self.owned_rows = _owned_rows(self.embed, self.width, arrays, self.vocab)
        var rows = max(self.width, self.first_qkv_rows) + 1
        var old_sums = List[Float64](length=rows, fill=0.0)
        var new_sums = List[Float64](length=rows, fill=0.0)
        var touched = List[Int]()
        var every_row = List[Bool](length=rows, fill=False)
        var unread = self._unread_kept_rows(rows)
        var pairs = 0
        var embed_pointers = arrays.pointers.unsafe_offset(self.embed.entry_pointers)
        var qkv_pointers = arrays.pointers.unsafe_offset(self.first_qkv.entry_pointers)
        for f in range(self.field_count):
            var first_column = self.field_offsets[f]
            var end_column = first_column + self.vocab[f]
            var entries = embed_pointers[unsafe_offset=end_column] - embed_pointers[
                unsafe_offset=first_column
            ]
            if self.first_qkv_rows > 0:
                entries += qkv_pointers[unsafe_offset=end_column] - qkv_pointers[
                    unsafe_offset=first_column
                ]
            if entries > 0:
                self.embedded_fields[mask_word(f)] |= mask_bit(f)
        for f in range(self.field_count):
            var vocab = self.vocab[f]
            if vocab > PAIR_VOCAB:
                continue
            self.pair_fields[2 * f] = pairs
            pairs += vocab * vocab
            var first = self.field_offsets[f]
            for old in range(vocab):
                for new in range(vocab):
                    self.pair_pointers.append(Int32(len(self.pair_words)))
                    if old != new:
                        _append_difference(
                            self.embed, first + old, first + new, arrays, True,
                            old_sums, new_sums, touched, every_row, self.pair_words,
                        )
                    self.pair_pointers.append(Int32(len(self.pair_words)))
                    if old != new and self.first_qkv_rows > 0:
                        _append_difference(
                            self.first_qkv, first + old, first + new, arrays, False,
                            old_sums, new_sums, touched, unread, self.pair_words,
                        )
        self.pair_pointers.append(Int32(len(self.pair_words)))
        if len(self.pair_words) > Int(Int32.MAX):
            raise Error(
                String(
                    "packed model: the embedding's pair deltas take ", len(self.pair_words),
                    " words, more than an Int32 can index",
                )
            )

    def _find_separate_rows(self) -> Bool:
        """Return True when no row that the embedding writes is a row that an output
        projection, a W2 or a b2 writes (see Engine.separate_rows)."""
        var embedding_rows = List[Bool](length=self.width, fill=False)
        for row in self._matrix_rows(self.embed):
            embedding_rows[row] = True
        for head in self.heads:
            for row in self._matrix_rows(head.wo):
                if embedding_rows[row]:
                    return False
        for block in self.blocks:
            for row in self._matrix_rows(block.w2):
                if embedding_rows[row]:
                    return False
            for row in self._matrix_rows(block.b2):
                if embedding_rows[row]:
                    return False
            for row in self._matrix_rows(block.linear):
                if embedding_rows[row]:
                    return False
        return True

    def _matrix_rows(self, matrix: Matrix) -> List[Int]:
        """Return the row of every entry of `matrix`."""
        var rows = List[Int]()
        var count = self.ints[matrix.entry_pointers + matrix.stored]
        for entry in range(count):
            rows.append(Int(self.indices[matrix.row_ids + entry]))
        return rows^

    def _unread_kept_rows(self, rows: Int) -> List[Bool]:
        """Return, per row of kept_qkv (and False past them up to `rows`), whether no
        step reads it: the key of a head whose key leader is another head, and the value
        of a head whose value leader is another head. The pair deltas leave such rows
        out, so their values go stale after the first position."""
        var unread = List[Bool](length=rows, fill=False)
        for h in range(len(self.heads)):
            ref head = self.heads[h]
            var key = self.kept_offsets[3 * h + 1]
            if key >= 0 and self.key_leaders[h] != h:
                for row in range(key, key + head.wk.rows):
                    unread[row] = True
            var value = self.kept_offsets[3 * h + 2]
            if value >= 0 and self.value_leaders[h] != h:
                for row in range(value, value + head.wv.rows):
                    unread[row] = True
        return unread^

    # ---- one position ------------------------------------------------------------

    def _arrays[dtype: DType](mut self) -> Arrays[dtype]:
        return Arrays[dtype](
            int_ptr(self.ints),
            IndexPtr(unsafe_from_address=Int(self.indices.unsafe_ptr())),
            Pointer[Scalar[dtype], MutUntrackedOrigin](
                unsafe_from_address=Int(self.value_words.unsafe_ptr())
            ),
            float_ptr(self.floats),
            Pointer[Scalar[dtype], MutUntrackedOrigin](
                unsafe_from_address=Int(self.entry_words.unsafe_ptr())
            ),
        )

    def _interleave_entries[dtype: DType](mut self):
        """Fill entry_words with the (row, value) pair of every entry of every matrix."""
        self.entry_words = List[Float64](length=2 * len(self.value_words) + 2, fill=0.0)
        var matrices = List[Matrix]()
        matrices.append(self.embed)
        matrices.append(self.unembed)
        if self.first_qkv_rows > 0:
            matrices.append(self.first_qkv)
        for head in self.heads:
            matrices.append(head.wq)
            matrices.append(head.wk)
            matrices.append(head.wv)
            matrices.append(head.wo)
        for block in self.blocks:
            matrices.append(block.w1)
            matrices.append(block.w2)
            matrices.append(block.b2)
            matrices.append(block.linear)
        for layer in self.layers:
            if layer.expert_count > 0:
                matrices.append(layer.router)
        var arrays = self._arrays[dtype]()
        for matrix in matrices:
            var pointers = arrays.pointers.unsafe_offset(matrix.entry_pointers)
            var entries = arrays.entries.unsafe_offset(2 * matrix.entries)
            for entry in range(pointers[unsafe_offset=0], pointers[unsafe_offset=matrix.stored]):
                var row = arrays.indices[unsafe_offset=matrix.row_ids + entry]
                comptime if dtype == DType.float32:
                    entries[unsafe_offset=2 * entry] = rebind[Scalar[dtype]](
                        bitcast[DType.float32, 1](Int32(row))
                    )
                else:
                    entries[unsafe_offset=2 * entry] = rebind[Scalar[dtype]](
                        bitcast[DType.float64, 1](Int64(row))
                    )
                entries[unsafe_offset=2 * entry + 1] = arrays.values[
                    unsafe_offset=matrix.entries + entry
                ]

    def _masks(mut self) -> Tuple[MaskPtr, MaskPtr, MaskPtr]:
        """Return pointers to (embedded_mask, x_mask, written_mask)."""
        return (
            MaskPtr(unsafe_from_address=Int(self.embedded_mask.unsafe_ptr())),
            MaskPtr(unsafe_from_address=Int(self.x_mask.unsafe_ptr())),
            MaskPtr(unsafe_from_address=Int(self.written_mask.unsafe_ptr())),
        )

    def _embed[dtype: DType](mut self, token: TokenPtr):
        """Set x to the embedding of `token`, the sum of one column per field, and
        `changed_fields` to the fields that differ from the previous token's."""
        var arrays = self._arrays[dtype]()
        var x = float_ptr(self.x)
        var embedded = x if self.separate_rows else float_ptr(self.embedded)
        var embedded_token = token_ptr(self.embedded_token)
        var offsets = int_ptr(self.field_offsets)
        var masks = self._masks()
        var embedded_mask = masks[0]
        var written = masks[2]
        var changed = MaskPtr(unsafe_from_address=Int(self.changed_fields.unsafe_ptr()))
        if self.embedded_valid:
            self._mark_changed(token)
        else:
            for w in range(self.field_words):
                changed[unsafe_offset=w] = ~UInt64(0)
        if not (self.incremental and self.embedded_valid):
            for i in range(self.width):
                embedded[unsafe_offset=i] = 0.0
            for i in range(len(self.embedded_mask)):
                embedded_mask[unsafe_offset=i] = 0
            var kept = float_ptr(self.kept_qkv)
            unsafe_memcpy(
                dest=kept,
                src=arrays.floats.unsafe_offset(self.first_qkv_bias),
                count=self.first_qkv_rows,
            )
            for f in range(self.field_count):
                var value = token[unsafe_offset=f]
                var column = offsets[unsafe_offset=f] + Int(value)
                add_column(self.embed, column, arrays, embedded, 1.0, embedded_mask, embedded)
                if self.first_qkv_rows > 0:
                    add_scaled_column(self.first_qkv, column, arrays, kept, 1.0)
                embedded_token[unsafe_offset=f] = value
            self.embedded_valid = True
            if not self.separate_rows:
                unsafe_memcpy(dest=x, src=embedded, count=self.width)
            for w in range(len(self.written_mask)):
                written[unsafe_offset=w] = 0
        elif self.separate_rows:
            self._apply_changes[True](token)
            # The layers' rows go back to zero, the embedding's value there.
            _restore_written[True](x, x, written, len(self.written_mask))
        else:
            self._apply_changes[False](token)
            # x equals the embedding except where the layers wrote at the last position.
            _restore_written[False](x, embedded, written, len(self.written_mask))
        _copy_mask(masks[1], embedded_mask, len(self.x_mask))

    def _apply_changes[separate: Bool](mut self, token: TokenPtr):
        """Update `embedded`, x, `embedded_mask` and the kept q, k and v from the fields
        set in `changed_fields`, and copy those fields of `token` to `embedded_token`.
        With `separate` (Engine.separate_rows) x alone holds the embedding."""
        var embedded = float_ptr(self.embedded)
        var embedded_token = token_ptr(self.embedded_token)
        var embedded_mask = MaskPtr(unsafe_from_address=Int(self.embedded_mask.unsafe_ptr()))
        var x = float_ptr(self.x)
        var kept = float_ptr(self.kept_qkv)
        var changed = MaskPtr(unsafe_from_address=Int(self.changed_fields.unsafe_ptr()))
        var pair_fields = int_ptr(self.pair_fields)
        var pair_pointers = IndexPtr(unsafe_from_address=Int(self.pair_pointers.unsafe_ptr()))
        var pair_words = float_ptr(self.pair_words)
        var pair_bits = IntPtr(unsafe_from_address=Int(self.pair_words.unsafe_ptr()))
        var owned_rows = self.owned_rows
        for w in range(self.field_words):
            var unembedded = changed[unsafe_offset=w] & ~self.embedded_fields.unsafe_get(w)
            while unembedded != 0:
                var g = w * MASK_BITS + Int(count_trailing_zeros(unembedded))
                unembedded &= unembedded - 1
                embedded_token[unsafe_offset=g] = token[unsafe_offset=g]
            var bits = changed[unsafe_offset=w] & self.embedded_fields.unsafe_get(w)
            while bits != 0:
                var g = w * MASK_BITS + Int(count_trailing_zeros(bits))
                bits &= bits - 1
                var value = Int(token[unsafe_offset=g])
                var old = Int(embedded_token[unsafe_offset=g])
                embedded_token[unsafe_offset=g] = Int32(value)
                var pair_base = pair_fields[unsafe_offset=2 * g]
                if pair_base < 0:
                    self._change_columns(g, old, value)
                    continue
                var pair = 2 * (pair_base + old * pair_fields[unsafe_offset=2 * g + 1] + value)
                var e = Int(pair_pointers[unsafe_offset=pair])
                var middle = Int(pair_pointers[unsafe_offset=pair + 1])
                var end = Int(pair_pointers[unsafe_offset=pair + 2])
                if owned_rows:
                    # The row's value depends on field g alone, so the flip found at
                    # load keeps its mask bit equal to "the row is nonzero".
                    while e < middle:
                        var row = pair_bits[unsafe_offset=e]
                        comptime if separate:
                            x[unsafe_offset=row] += pair_words[unsafe_offset=e + 1]
                        else:
                            var updated = embedded[unsafe_offset=row] + pair_words[
                                unsafe_offset=e + 1
                            ]
                            embedded[unsafe_offset=row] = updated
                            x[unsafe_offset=row] = updated
                        embedded_mask[unsafe_offset=mask_word(row)] ^= UInt64(
                            pair_bits[unsafe_offset=e + 2]
                        )
                        e += EMBED_ENTRY_WORDS
                else:
                    while e < middle:
                        var row = pair_bits[unsafe_offset=e]
                        var updated: Float64
                        comptime if separate:
                            updated = x[unsafe_offset=row] + pair_words[unsafe_offset=e + 1]
                            x[unsafe_offset=row] = updated
                        else:
                            updated = embedded[unsafe_offset=row] + pair_words[unsafe_offset=e + 1]
                            embedded[unsafe_offset=row] = updated
                            x[unsafe_offset=row] = updated
                        var bit = mask_bit(row)
                        var word = embedded_mask[unsafe_offset=mask_word(row)]
                        embedded_mask[unsafe_offset=mask_word(row)] = (
                            word | bit
                        ) if updated != 0.0 else (word & ~bit)
                        e += EMBED_ENTRY_WORDS
                # The kept q, k and v stay exact: the packer checked that every partial
                # sum of a row is an integer below 2^53, and a delta is the difference of
                # two columns whose sum of magnitudes is below that bound too.
                while e < end:
                    kept[unsafe_offset=pair_bits[unsafe_offset=e]] += pair_words[unsafe_offset=e + 1]
                    e += 2

    @no_inline
    def _change_columns(mut self, field: Int, old: Int, new: Int):
        """Move field `field` of the embedding and the kept q, k and v from value `old` to
        value `new` by subtracting and adding whole columns, for a field with more than
        PAIR_VOCAB values."""
        if self.narrow:
            self._change_columns_of[DType.float32](field, old, new)
        else:
            self._change_columns_of[DType.float64](field, old, new)

    def _change_columns_of[dtype: DType](mut self, field: Int, old: Int, new: Int):
        var arrays = self._arrays[dtype]()
        var x = float_ptr(self.x)
        var embedded = x if self.separate_rows else float_ptr(self.embedded)
        var embedded_mask = self._masks()[0]
        var kept = float_ptr(self.kept_qkv)
        var base = self.field_offsets.unsafe_get(field)
        add_column(self.embed, base + old, arrays, embedded, -1.0, embedded_mask, x)
        add_column(self.embed, base + new, arrays, embedded, 1.0, embedded_mask, x)
        if self.first_qkv_rows > 0:
            add_scaled_column(self.first_qkv, base + new, arrays, kept, 1.0)
            add_scaled_column(self.first_qkv, base + old, arrays, kept, -1.0)

    def _mark_changed(mut self, token: TokenPtr):
        """Set the bit of every field where `token` differs from `embedded_token`,
        comparing FIELD_LANES fields at a time."""
        var embedded_token = token_ptr(self.embedded_token)
        var changed = MaskPtr(unsafe_from_address=Int(self.changed_fields.unsafe_ptr()))
        # A full mask word is built in a register from its equal fields by an unrolled
        # loop with constant shifts, and then inverted.
        var full_words = self.field_count // MASK_BITS
        for w in range(full_words):
            var start = w * MASK_BITS
            var same: UInt64 = 0
            comptime for group in range(MASK_BITS // FIELD_LANES):
                var f = start + group * FIELD_LANES
                var new_values = token.unsafe_load[width=FIELD_LANES](f)
                var old_values = embedded_token.unsafe_load[width=FIELD_LANES](f)
                var equal = pack_bits[DType.uint16](new_values.eq(old_values))
                same |= UInt64(equal) << UInt64(group * FIELD_LANES)
            changed[unsafe_offset=w] = ~same
        # The last word (field_words = full_words + 1) holds the remaining fields.
        var start = full_words * MASK_BITS
        var bits: UInt64 = 0
        var f = start
        while f + FIELD_LANES <= self.field_count:
            var new_values = token.unsafe_load[width=FIELD_LANES](f)
            var old_values = embedded_token.unsafe_load[width=FIELD_LANES](f)
            var differ = pack_bits[DType.uint16](new_values.ne(old_values))
            bits |= UInt64(differ) << UInt64(f - start)
            f += FIELD_LANES
        while f < self.field_count:
            if token[unsafe_offset=f] != embedded_token[unsafe_offset=f]:
                bits |= UInt64(1) << UInt64(f - start)
            f += 1
        changed[unsafe_offset=full_words] = bits

    @always_inline
    def _unchanged(self, fields: Int) -> Bool:
        """Return True when the field mask at offset `fields` exists and none of its
        fields changed at this position."""
        if fields < 0:
            return False
        var masks = MaskPtr(unsafe_from_address=Int(self.field_masks.unsafe_ptr())).unsafe_offset(
            fields
        )
        var changed = MaskPtr(unsafe_from_address=Int(self.changed_fields.unsafe_ptr()))
        var i = 0
        while i < len(self.changed_fields):
            var both = masks.unsafe_load[width=MASK_LANES](i) & changed.unsafe_load[
                width=MASK_LANES
            ](i)
            if both.reduce_or() != 0:
                return False
            i += MASK_LANES
        return True

    @always_inline
    def _head_projection[
        dtype: DType
    ](
        self, h: Int, part: Int, arrays: Arrays[dtype], x: FloatPtr, x_mask: MaskPtr, buffer: FloatPtr
    ) -> FloatPtr:
        """Return head h's query (part 0), key (1) or value (2) at this position: its
        kept layer 0 projection, or `buffer` after projecting x into it."""
        var kept = self.kept_offsets.unsafe_get(3 * h + part)
        if kept >= 0:
            return float_ptr(self.kept_qkv).unsafe_offset(kept)
        ref head = self.heads.unsafe_get(h)
        var matrix = head.wq if part == 0 else (head.wk if part == 1 else head.wv)
        var bias = head.bq if part == 0 else (head.bk if part == 1 else head.bv)
        project(
            matrix,
            bias,
            self.gather_offsets.unsafe_get(3 * h + part),
            arrays,
            x,
            x_mask,
            buffer,
            int_ptr(self.gather_columns),
            float_ptr(self.gather_weights),
            self._extra(3 * h + part),
        )
        return buffer

    def _attention[dtype: DType](mut self, layer: LayerWeights, need_output: Bool):
        """Append this position's keys and values; when the layer's output is needed,
        add every head's output to x, or mark a deferrable head pending."""
        var arrays = self._arrays[dtype]()
        var x = float_ptr(self.x)
        var key_buffer = float_ptr(self.key)
        var value_buffer = float_ptr(self.value)
        var x_mask = self._masks()[1]
        var caches = self.caches.unsafe_ptr()
        for h in range(layer.first_head, layer.first_head + layer.head_count):
            var reads = self.heads.unsafe_get(h).reads_k | self.heads.unsafe_get(h).reads_v
            self._settle[dtype](reads)
            ref head = self.heads.unsafe_get(h)
            ref cache = caches[unsafe_offset=h]
            var slot = self.last_slots.unsafe_get(h)
            var leader = self.key_leaders.unsafe_get(h)
            if leader != h:
                # The key equals the leader's, which has already found its slot.
                var leader_slot = self.last_slots.unsafe_get(leader)
                if self.value_leaders.unsafe_get(h) != h:
                    cache.store_stamp(leader_slot, self.position)
                elif (
                    slot >= 0
                    and self._unchanged(head.key_fields)
                    and self._unchanged(head.value_fields)
                ):
                    cache.restamp(leader_slot, self.position)
                else:
                    var value = self._head_projection(h, 2, arrays, x, x_mask, value_buffer)
                    cache.store_value(leader_slot, value, self.position)
                self.last_slots.unsafe_get(h) = leader_slot
            elif slot >= 0 and self._unchanged(head.key_fields):
                # The key equals the previous position's, so it owns the same slot.
                if self._unchanged(head.value_fields):
                    cache.restamp(slot, self.position)
                else:
                    var value = self._head_projection(h, 2, arrays, x, x_mask, value_buffer)
                    cache.rewrite(slot, value, self.position)
            else:
                var key = self._head_projection(h, 1, arrays, x, x_mask, key_buffer)
                var value = self._head_projection(h, 2, arrays, x, x_mask, value_buffer)
                self.last_slots.unsafe_get(h) = cache.append(key, value, self.position)
            if not need_output:
                self.winner_reusable.unsafe_get(h) = False
            elif head.deferrable:
                self.pending_heads |= UInt64(1) << UInt64(h)
            else:
                self._find_winner[dtype](h)
        if not need_output:
            return
        # Every query above read x before any head of this layer wrote to it.
        for h in range(layer.first_head, layer.first_head + layer.head_count):
            if not self.heads.unsafe_get(h).deferrable:
                self._add_output[dtype](h)

    def _find_winner[dtype: DType](mut self, h: Int):
        """Set winners[h] to the slot that head h's query selects at this position."""
        # The query may read what pending heads of earlier layers write.
        var due = self.pending_heads & self.heads.unsafe_get(h).reads_q
        if due != 0:
            self._evaluate[dtype](due)
        ref head = self.heads.unsafe_get(h)
        ref cache = self.caches.unsafe_ptr()[unsafe_offset=h]
        var count = cache.count()
        if (
            self.winner_reusable.unsafe_get(h)
            and self.winner_counts.unsafe_get(h) == count
            and self._unchanged(head.query_fields)
        ):
            return
        var arrays = self._arrays[dtype]()
        var query = self._head_projection(
            h, 0, arrays, float_ptr(self.x), self._masks()[1], float_ptr(self.query)
        )
        ref index = self.caches.unsafe_ptr()[unsafe_offset=self.key_leaders.unsafe_get(h)]
        self.winners.unsafe_get(h) = index.attend(query)
        self.winner_reusable.unsafe_get(h) = index.last_indexed
        self.winner_counts.unsafe_get(h) = count

    def _add_output[dtype: DType](mut self, h: Int):
        """Add head h's output projection of its winning value to x."""
        var arrays = self._arrays[dtype]()
        var masks = self._masks()
        ref head = self.heads.unsafe_get(h)
        var values = self.value_leaders.unsafe_get(h)
        ref cache = self.caches.unsafe_ptr()[unsafe_offset=values]
        var slot = self.winners.unsafe_get(h)
        var winner = cache.value_ptr(slot)
        var value_mask = cache.value_mask_ptr(slot)
        accumulate_masked[mark_output=True](
            head.wo, arrays, winner, value_mask, float_ptr(self.x), masks[1], masks[2]
        )

    @always_inline
    def _settle[dtype: DType](mut self, reads: UInt64):
        """Add the output of every pending head in `reads` to x, before a product that
        reads what they write."""
        var due = self.pending_heads & reads
        if due != 0:
            self._evaluate[dtype](due)

    def _evaluate[dtype: DType](mut self, heads: UInt64):
        """Find the winners of the pending heads in `heads` and add their outputs."""
        var due = heads
        self.pending_heads &= ~due
        while due != 0:
            var h = Int(count_trailing_zeros(due))
            due &= due - 1
            self._find_winner[dtype](h)
            self._add_output[dtype](h)

    def _drop_pending_heads(mut self):
        """Forget the heads that no product of this position read. Their winners are
        stale, so the next position must not reuse them."""
        while self.pending_heads != 0:
            var h = Int(count_trailing_zeros(self.pending_heads))
            self.pending_heads &= self.pending_heads - 1
            self.winner_reusable.unsafe_get(h) = False

    def _feed_forward[dtype: DType](mut self, layer: LayerWeights):
        """Add the shared block and the routed expert, both computed from the same y,
        or taken from the block memo."""
        var arrays = self._arrays[dtype]()
        var x = float_ptr(self.x)
        var shared_hidden = float_ptr(self.shared_hidden)
        var expert_hidden = float_ptr(self.expert_hidden)
        var x_mask = self._masks()[1]
        var shared_mask = MaskPtr(unsafe_from_address=Int(self.shared_mask.unsafe_ptr()))
        var expert_mask = MaskPtr(unsafe_from_address=Int(self.expert_mask.unsafe_ptr()))
        var keys = MaskPtr(unsafe_from_address=Int(self.memo_keys.unsafe_ptr()))
        if self.memo_full:
            self._clear_memo()
        # Per block: the memo's record of this input (-1: none), and the key's hash and
        # word count, with 0 words when the block does not use the memo. Both keys are
        # found before either lookup, so that the two lookups' cache misses overlap.
        var shared_record = -1
        var shared_hash: UInt64 = 0
        var shared_words = 0
        if layer.shared >= 0:
            self._settle[dtype](self.blocks.unsafe_get(layer.shared).reads)
            if _remembers(self.blocks.unsafe_get(layer.shared)):
                shared_hash, shared_words = _memo_key(
                    layer.shared, self.blocks.unsafe_get(layer.shared), arrays, x, x_mask, keys
                )
                if shared_words > 0:
                    self._prefetch_slot(shared_hash)
        var expert = -1
        var expert_record = -1
        var expert_hash: UInt64 = 0
        var expert_words = 0
        var expert_key = keys.unsafe_offset(self.key_words)
        if layer.expert_count > 0:
            self._settle[dtype](layer.router_reads)
            var chosen = self._one_hot_choice(layer, arrays, x, x_mask)
            if chosen < 0:
                var logits = float_ptr(self.logits)
                affine_masked(layer.router, layer.router_bias, arrays, x, x_mask, logits)
                chosen = first_argmax(logits, layer.expert_count, self.nan_possible)
            expert = layer.first_expert + chosen
            ref block = self.blocks.unsafe_get(expert)
            if block.w1.rows == 0 and block.b2.stored == 0 and block.linear.stored == 0:
                # An expert without hidden units, output bias or linear map adds nothing.
                expert = -1
            else:
                self._settle[dtype](self.blocks.unsafe_get(expert).reads)
                if _remembers(self.blocks.unsafe_get(expert)):
                    expert_hash, expert_words = _memo_key(
                        expert, self.blocks.unsafe_get(expert), arrays, x, x_mask, expert_key
                    )
                    if expert_words > 0:
                        self._prefetch_slot(expert_hash)
                if shared_words > 0:
                    shared_record = self._find_record(shared_hash, keys, shared_words)
                if expert_words > 0:
                    expert_record = self._find_record(expert_hash, expert_key, expert_words)
                if expert_record < 0:
                    ref routed = self.blocks.unsafe_get(expert)
                    pre_activations(routed, arrays, x, x_mask, expert_hidden)
                    positive_mask(expert_hidden, routed.w1.rows, expert_mask, self.nan_possible)
        if layer.shared >= 0 and expert < 0 and shared_words > 0:
            shared_record = self._find_record(shared_hash, keys, shared_words)
        if layer.shared >= 0 and shared_record < 0:
            ref block = self.blocks.unsafe_get(layer.shared)
            pre_activations(block, arrays, x, x_mask, shared_hidden)
            positive_mask(shared_hidden, block.w1.rows, shared_mask, self.nan_possible)
        if layer.shared >= 0:
            self._add_block[dtype](
                layer.shared, shared_record, shared_hash, keys, shared_words,
                shared_hidden, shared_mask,
            )
        if expert >= 0:
            self._add_block[dtype](
                expert, expert_record, expert_hash, expert_key, expert_words,
                expert_hidden, expert_mask,
            )
        # Last, as no block of the layer writes a column that a linear map reads.
        if layer.shared >= 0 and self.blocks.unsafe_get(layer.shared).linear.stored > 0:
            self._add_linear[dtype](layer.shared)
        if expert >= 0 and self.blocks.unsafe_get(expert).linear.stored > 0:
            self._add_linear[dtype](expert)

    @always_inline
    def _add_linear[dtype: DType](mut self, index: Int):
        """Add block `index`'s linear map of x to x. The columns it reads still hold y,
        and none of them is a row it writes."""
        self._settle[dtype](self.blocks.unsafe_get(index).linear_reads)
        var arrays = self._arrays[dtype]()
        var masks = self._masks()
        var x = float_ptr(self.x)
        ref block = self.blocks.unsafe_get(index)
        accumulate_masked[mark_output=True](
            block.linear, arrays, x, masks[1], x, masks[1], masks[2]
        )

    @always_inline
    def _one_hot_choice[
        dtype: DType
    ](self, layer: LayerWeights, arrays: Arrays[dtype], x: FloatPtr, x_mask: MaskPtr) -> Int:
        """Return the router's expert without its product when x_mask marks none of the
        columns it reads (bias_expert) or one column where x is 1 (router_choices), and
        -1 otherwise. Both are the argmax the product would give: no column adds
        anything, or the one that does is the column router_choices was found for."""
        ref router = layer.router
        var column_mask = arrays.pointers.unsafe_offset(router.column_mask)
        var found = -1  # the rank of the one marked column among the stored ones
        for index in range(router.mask_words):
            var stored_bits = UInt64(column_mask[unsafe_offset=index])
            var bits = stored_bits & x_mask[unsafe_offset=router.first_word + index]
            if bits == 0:
                continue
            if found >= 0 or bits & (bits - 1) != 0:
                return -1
            var bit = count_trailing_zeros(bits)
            if x[unsafe_offset=(router.first_word + index) * MASK_BITS + Int(bit)] != 1.0:
                return -1
            var below = stored_bits & ((UInt64(1) << bit) - 1)
            found = Int(arrays.pointers[unsafe_offset=router.column_rank + index]) + Int(
                pop_count(below)
            )
        if found < 0:
            return layer.bias_expert
        return Int(self.router_choices.unsafe_get(layer.one_hot_choices + found))

    @always_inline
    def _add_block[
        dtype: DType
    ](
        mut self,
        index: Int,
        record: Int,
        hash: UInt64,
        key: MaskPtr,
        words: Int,
        hidden: FloatPtr,
        hidden_mask: MaskPtr,
    ):
        """Add block `index`'s output to x: from memo record `record` when it is not -1,
        else from `hidden` (its activations and their positive-unit mask), recording it
        under the key key[0 .. words - 1] when `words` is not 0."""
        var arrays = self._arrays[dtype]()
        var masks = self._masks()
        var x = float_ptr(self.x)
        var one = float_ptr(self.one)
        ref block = self.blocks.unsafe_get(index)
        if record >= 0:
            self._add_record(record)
            self.memo_hits += 1
        elif words == 0:
            accumulate_masked[mark_output=True](
                block.w2, arrays, hidden, hidden_mask, x, masks[1], masks[2]
            )
            accumulate_marking(block.b2, arrays, one, x, masks[1], masks[2])
        else:
            var delta = float_ptr(self.delta)
            var delta_mask = MaskPtr(unsafe_from_address=Int(self.delta_mask.unsafe_ptr()))
            accumulate_masked[mark_output=True](
                block.w2, arrays, hidden, hidden_mask, delta, delta_mask, delta_mask
            )
            accumulate_marking(block.b2, arrays, one, delta, delta_mask, delta_mask)
            self._record_delta(hash, key, words)

    # ---- the block memo ----------------------------------------------------------

    def _clear_memo(mut self):
        """Empty the memo: its slots, records and words."""
        for i in range(2 * MEMO_SLOTS):
            self.memo_table.unsafe_get(i) = 0
        self.memo_records = 0
        self.memo_words.clear()
        self.memo_full = False
        self.memo_clears += 1

    def limit_memo(mut self, records: Int):
        """Clear the memo whenever it reaches `records` records (1 to MEMO_RECORDS)."""
        self.memo_record_limit = max(1, min(records, MEMO_RECORDS))

    @always_inline
    def _find_record(mut self, hash: UInt64, key: MaskPtr, words: Int) -> Int:
        """Return the first word of the memo record whose key is key[0 .. words - 1],
        or -1."""
        var table = self.memo_table.unsafe_ptr()
        var stored = self.memo_words.unsafe_ptr()
        var slot = _memo_slot(hash)
        self.memo_lookups += 1
        while True:
            self.memo_probes += 1
            var tag = table[unsafe_offset=2 * slot]
            if tag == 0:
                return -1
            if tag == hash:
                var first = Int(table[unsafe_offset=2 * slot + 1])
                var record_key = MaskPtr(
                    unsafe_from_address=Int(stored.unsafe_offset(first + MEMO_RECORD_WORDS))
                )
                if Int(stored[unsafe_offset=first]) == words and _same_words(
                    record_key, key, words
                ):
                    return first
            slot = (slot + 1) & (MEMO_SLOTS - 1)

    @always_inline
    def _prefetch_slot(mut self, hash: UInt64):
        """Start loading the memo_table slot of a key's hash, so that the two blocks'
        lookups wait on memory together."""
        prefetch(self.memo_table.unsafe_ptr().unsafe_offset(2 * _memo_slot(hash)))

    @always_inline
    def _add_record(mut self, first: Int):
        """Add the output in the memo record at word `first` to x, marking its rows in
        x_mask and written_mask."""
        var masks = self._masks()
        var x = float_ptr(self.x)
        var stored = self.memo_words.unsafe_ptr()
        var e = first + MEMO_RECORD_WORDS + Int(stored[unsafe_offset=first])
        var outputs_end = Int(stored[unsafe_offset=first + 1])
        var end = Int(stored[unsafe_offset=first + 2])
        while e < outputs_end:
            var packed = stored[unsafe_offset=e]
            var row = Int(packed & PACK_MASK)
            x[unsafe_offset=row] += bitcast[DType.float64, 1](packed & ~PACK_MASK)
            e += 1
        # The mask words of the rows, so that each mask word is updated once.
        while e < end:
            var word = Int(stored[unsafe_offset=e])
            var bits = stored[unsafe_offset=e + 1]
            masks[1][unsafe_offset=word] |= bits
            masks[2][unsafe_offset=word] |= bits
            e += 2

    def _record_headroom(self) -> Int:
        """Return the maximum length of one record in words: its header, a key of
        key_words words, an output word per row and a pair of words per mask word."""
        return MEMO_RECORD_WORDS + self.key_words + self.width + 2 * len(self.delta_mask)

    def _record_delta(mut self, hash: UInt64, key: MaskPtr, words: Int):
        """Add `delta` to x at the rows set in delta_mask, marking them, return both to
        zero, and remember the output under the key key[0 .. words - 1] unless the memo
        is full."""
        var masks = self._masks()
        var x = float_ptr(self.x)
        var delta = float_ptr(self.delta)
        var delta_mask = MaskPtr(unsafe_from_address=Int(self.delta_mask.unsafe_ptr()))
        var keep = not self.memo_full
        var first = len(self.memo_words)
        if keep:
            self.memo_words.append(UInt64(words))
            self.memo_words.append(0)  # the end of the outputs, set below
            self.memo_words.append(0)  # the end of the record, set below
            for i in range(words):
                self.memo_words.append(key[unsafe_offset=i])
        for w in range(len(self.delta_mask)):
            var bits = delta_mask[unsafe_offset=w]
            delta_mask[unsafe_offset=w] = 0
            masks[1][unsafe_offset=w] |= bits
            masks[2][unsafe_offset=w] |= bits
            if keep:
                self.record_mask.unsafe_get(w) = bits
            while bits != 0:
                var row = w * MASK_BITS + Int(count_trailing_zeros(bits))
                bits &= bits - 1
                var value = delta[unsafe_offset=row]
                delta[unsafe_offset=row] = 0.0
                x[unsafe_offset=row] += value
                if keep:
                    var value_bits = bitcast[DType.uint64, 1](value)
                    if value_bits & PACK_MASK == 0:
                        self.memo_words.append(value_bits | UInt64(row))
                    else:
                        # The value does not pack: drop the record.
                        keep = False
                        while len(self.memo_words) > first:
                            _ = self.memo_words.pop()
        if not keep:
            for w in range(len(self.record_mask)):
                self.record_mask.unsafe_get(w) = 0
            return
        self.memo_words.unsafe_get(first + 1) = UInt64(len(self.memo_words))
        for w in range(len(self.delta_mask)):
            var bits = self.record_mask.unsafe_get(w)
            if bits != 0:
                self.memo_words.append(UInt64(w))
                self.memo_words.append(bits)
                self.record_mask.unsafe_get(w) = 0
        self.memo_words.unsafe_get(first + 2) = UInt64(len(self.memo_words))
        var table = self.memo_table.unsafe_ptr()
        var slot = _memo_slot(hash)
        while table[unsafe_offset=2 * slot] != 0:
            slot = (slot + 1) & (MEMO_SLOTS - 1)
        table[unsafe_offset=2 * slot] = hash
        table[unsafe_offset=2 * slot + 1] = UInt64(first)
        self.memo_records += 1
        if self.memo_records >= self.memo_record_limit or len(
            self.memo_words
        ) + self._record_headroom() > MEMO_WORDS:
            self.memo_full = True

    def _unembed[dtype: DType](mut self):
        """Set `pending` to the argmax token. A field whose logits the product does not
        write keeps the argmax of its bias; the others take the argmax of their logits,
        which then return to the bias."""
        self._settle[dtype](self.unembed_reads)
        var arrays = self._arrays[dtype]()
        var logits = float_ptr(self.unembed_logits)
        var written = MaskPtr(unsafe_from_address=Int(self.written_fields.unsafe_ptr()))
        var x = float_ptr(self.x)
        var x_mask = self._masks()[1]
        var keys = int_ptr(self.unembed_keys)
        var column_values = self.column_values.unsafe_ptr()
        var columns = self.unembed_columns.unsafe_ptr()
        var field_words = MaskPtr(unsafe_from_address=Int(self.column_field_words.unsafe_ptr()))
        var run_weights = float_ptr(self.run_weights)
        var entries = arrays.entries.unsafe_offset(2 * self.unembed.entries)
        var column_mask = arrays.pointers.unsafe_offset(self.unembed.column_mask)
        # The product by columns, marking the fields it writes; a cached field's columns
        # go to its key instead.
        for index in range(self.unembed.mask_words):
            var word = self.unembed.first_word + index
            var stored_bits = UInt64(column_mask[unsafe_offset=index])
            var bits = stored_bits & x_mask[unsafe_offset=word]
            while bits != 0:
                var bit = count_trailing_zeros(bits)
                bits &= bits - 1
                var column = word * MASK_BITS + Int(bit)
                var coefficient = x[unsafe_offset=column]
                if coefficient == 0.0:
                    continue
                var group = Int(columns[unsafe_offset=4 * column])
                if group >= CACHED_COLUMN:
                    var field = group - CACHED_COLUMN
                    var field_word = mask_word(field)
                    var field_bit = mask_bit(field)
                    if written[unsafe_offset=field_word] & field_bit == 0:
                        written[unsafe_offset=field_word] |= field_bit
                        keys[unsafe_offset=2 * field] = 1
                        keys[unsafe_offset=2 * field + 1] = column
                        column_values[unsafe_offset=field] = bitcast[DType.uint64, 1](coefficient)
                    else:
                        keys[unsafe_offset=2 * field] = 2
                    continue
                var run = Int(columns[unsafe_offset=4 * column + 3])
                if run == SINGLE_ENTRY:
                    var row = Int(columns[unsafe_offset=4 * column + 1])
                    var weight_at = Int(columns[unsafe_offset=4 * column + 2])
                    logits[unsafe_offset=row] += run_weights[unsafe_offset=weight_at] * coefficient
                    written[unsafe_offset=mask_word(group)] |= mask_bit(group)
                    continue
                var entry = Int(columns[unsafe_offset=4 * column + 1])
                var entry_end = Int(columns[unsafe_offset=4 * column + 2])
                while entry < entry_end:
                    var row, weight = read_entry(entries, entry)
                    logits[unsafe_offset=row] += weight * coefficient
                    entry += 1
                if run >= 0:
                    _add_run(
                        logits.unsafe_offset(self.runs.unsafe_get(3 * run)),
                        run_weights.unsafe_offset(self.runs.unsafe_get(3 * run + 2)),
                        self.runs.unsafe_get(3 * run + 1),
                        coefficient,
                    )
                if group >= 0:
                    written[unsafe_offset=mask_word(group)] |= mask_bit(group)
                else:
                    var start = -1 - group
                    var end = start + 1 + 2 * Int(field_words[unsafe_offset=start])
                    var i = start + 1
                    while i < end:
                        written[unsafe_offset=Int(field_words[unsafe_offset=i])] |= field_words[
                            unsafe_offset=i + 1
                        ]
                        i += 2
        var pending = self._pending()
        var token_fields = MaskPtr(unsafe_from_address=Int(self.token_fields.unsafe_ptr()))
        var differing = token_fields.unsafe_offset(self._half_words())
        var default_token = token_ptr(self.default_token)
        var offsets = int_ptr(self.field_offsets)
        var vocab = int_ptr(self.vocab)
        var bias = arrays.floats.unsafe_offset(self.unembed_bias)
        for w in range(self.field_words):
            var fresh = written[unsafe_offset=w]
            written[unsafe_offset=w] = 0
            # The pending half still holds an earlier token (while generating, the
            # prediction of two steps ago), which differs from default_token only in
            # the fields set in `differing`.
            var stale = differing[unsafe_offset=w] & ~fresh
            differing[unsafe_offset=w] = fresh
            while stale != 0:
                var f = w * MASK_BITS + Int(count_trailing_zeros(stale))
                stale &= stale - 1
                pending[unsafe_offset=f] = default_token[unsafe_offset=f]
            var twos = fresh & self.two_value_fields.unsafe_get(w)
            var threes = fresh & self.three_value_fields.unsafe_get(w)
            var cached = fresh & self.cached_fields.unsafe_get(w)
            var others = fresh & ~(twos | threes | cached)
            while cached != 0:
                var f = w * MASK_BITS + Int(count_trailing_zeros(cached))
                cached &= cached - 1
                pending[unsafe_offset=f] = Int32(self._cached_argmax[dtype](f, arrays))
            while twos != 0:
                var f = w * MASK_BITS + Int(count_trailing_zeros(twos))
                twos &= twos - 1
                var first = offsets[unsafe_offset=f]
                var segment = logits.unsafe_offset(first)
                var second_wins = segment[unsafe_offset=1] > segment[unsafe_offset=0]
                pending[unsafe_offset=f] = Int32(Int(second_wins))
                segment.unsafe_store(0, bias.unsafe_load[width=2](first))
            while threes != 0:
                var f = w * MASK_BITS + Int(count_trailing_zeros(threes))
                threes &= threes - 1
                var first = offsets[unsafe_offset=f]
                var segment = logits.unsafe_offset(first)
                # Value 2 wins only when above both others, as in first_argmax.
                var winner = 1 if segment[unsafe_offset=1] > segment[unsafe_offset=0] else 0
                var top = max(segment[unsafe_offset=0], segment[unsafe_offset=1])
                pending[unsafe_offset=f] = Int32(2 if segment[unsafe_offset=2] > top else winner)
                segment.unsafe_store(0, bias.unsafe_load[width=2](first))
                segment[unsafe_offset=2] = bias[unsafe_offset=first + 2]
            while others != 0:
                var f = w * MASK_BITS + Int(count_trailing_zeros(others))
                others &= others - 1
                var first = offsets[unsafe_offset=f]
                var length = vocab[unsafe_offset=f]
                var segment = logits.unsafe_offset(first)
                pending[unsafe_offset=f] = Int32(first_argmax(segment, length, self.nan_possible))
                copy_floats(segment, bias.unsafe_offset(first), length)

    @always_inline
    def _cached_argmax[dtype: DType](mut self, field: Int, arrays: Arrays[dtype]) -> Int:
        """Return the argmax of cached field `field` at this step, from the argmax cache
        when one column writes it and its value was the last one seen there."""
        if self.unembed_keys.unsafe_get(2 * field) != 1:
            return self._field_argmax(field, arrays)
        var c = self.unembed_keys.unsafe_get(2 * field + 1)
        var value_bits = self.column_values.unsafe_get(field)
        var cache = self.argmax_cache.unsafe_ptr()
        if cache[unsafe_offset=2 * c] == value_bits and cache[unsafe_offset=2 * c + 1] != 0:
            return Int(cache[unsafe_offset=2 * c + 1]) - 1
        var argmax = self._field_argmax(field, arrays)
        cache[unsafe_offset=2 * c] = value_bits
        cache[unsafe_offset=2 * c + 1] = UInt64(argmax + 1)
        return argmax

    @no_inline
    def _field_argmax[dtype: DType](mut self, field: Int, arrays: Arrays[dtype]) -> Int:
        """Return the argmax of cached field `field`: its bias plus, per item, the
        item's weights times x in its column."""
        var x = float_ptr(self.x)
        var logits = float_ptr(self.field_logits)
        var length = self.vocab.unsafe_get(field)
        copy_floats(
            logits,
            arrays.floats.unsafe_offset(self.unembed_bias + self.field_offsets.unsafe_get(field)),
            length,
        )
        var rows = self.item_rows.unsafe_ptr()
        var weights = float_ptr(self.item_weights)
        for i in range(
            Int(self.field_items.unsafe_get(field)), Int(self.field_items.unsafe_get(field + 1))
        ):
            var coefficient = x[unsafe_offset=Int(self.item_columns.unsafe_get(i))]
            if coefficient == 0.0:
                continue
            for j in range(
                Int(self.item_entries.unsafe_get(i)), Int(self.item_entries.unsafe_get(i + 1))
            ):
                logits[unsafe_offset=Int(rows[unsafe_offset=j])] += (
                    weights[unsafe_offset=j] * coefficient
                )
        return first_argmax(logits, length, self.nan_possible)

    def _index_column_fields(mut self):
        """Fill column_fields and column_field_lists from the unembedding's rows."""
        var pointers = int_ptr(self.ints).unsafe_offset(self.unembed.entry_pointers)
        # The column that last listed each field, so that a column lists it once.
        var listed_by = List[Int](length=self.field_count, fill=-1)
        self.column_fields = List[Int32](length=self.unembed.stored, fill=0)
        var fields = List[Int32]()
        for k in range(self.unembed.stored):
            fields.clear()
            for entry in range(pointers[unsafe_offset=k], pointers[unsafe_offset=k + 1]):
                var row = Int(self.indices[self.unembed.row_ids + entry])
                var field = self.logit_fields[row]
                if listed_by[Int(field)] != k:
                    listed_by[Int(field)] = k
                    fields.append(field)
            if len(fields) == 1:
                self.column_fields[k] = fields[0]
            else:
                self.column_fields[k] = Int32(-1 - len(self.column_field_lists))
                self.column_field_lists.append(Int32(len(fields)))
                for field in fields:
                    self.column_field_lists.append(field)

    def _index_cached_fields[dtype: DType](mut self) raises:
        """Choose the cached fields, flag their columns in column_fields and list their
        items (see Engine.cached_fields)."""
        var arrays = self._arrays[dtype]()
        var pointers = int_ptr(self.ints).unsafe_offset(self.unembed.entry_pointers)
        # Fields of more than three values that no column shared with another field
        # writes.
        var cacheable = List[Bool](length=self.field_count, fill=False)
        for f in range(self.field_count):
            cacheable[f] = self.vocab[f] > 3 and self.field_count < CACHED_COLUMN
        var i = 0
        while i < len(self.column_field_lists):
            var count = Int(self.column_field_lists[i])
            for j in range(i + 1, i + 1 + count):
                cacheable[Int(self.column_field_lists[j])] = False
            i += 1 + count
        # The stored column of each column of x, so that items run in column order.
        var by_column = List[Int](length=self.width, fill=-1)
        for k in range(self.unembed.stored):
            var column = Int(self.indices[self.unembed.column_ids + k])
            if column < 0 or column >= self.width or by_column[column] >= 0:
                raise Error(
                    String(
                        "packed model: the unembedding's column ", column,
                        " is outside the residual or stored twice; repack the weights",
                    )
                )
            by_column[column] = k
        for f in range(self.field_count):
            self.field_items.append(Int32(len(self.item_columns)))
            if not cacheable[f]:
                continue
            self.cached_fields[mask_word(f)] |= mask_bit(f)
            var first = self.field_offsets[f]
            for column in range(self.width):
                var k = by_column[column]
                if k < 0 or Int(self.column_fields[k]) != f:
                    continue
                self.column_fields[k] = Int32(f + CACHED_COLUMN)
                self.item_columns.append(Int32(column))
                self.item_entries.append(Int32(len(self.item_rows)))
                for e in range(pointers[unsafe_offset=k], pointers[unsafe_offset=k + 1]):
                    var row = Int(self.indices[self.unembed.row_ids + e])
                    self.item_rows.append(Int32(row - first))
                    self.item_weights.append(
                        arrays.values[unsafe_offset=self.unembed.entries + e].cast[DType.float64]()
                    )
        self.field_items.append(Int32(len(self.item_columns)))
        self.item_entries.append(Int32(len(self.item_rows)))

    def _index_unembed_columns[dtype: DType](mut self) raises:
        """Fill unembed_columns, column_field_words and run_weights from column_fields,
        column_field_lists and the unembedding's entries."""
        var arrays = self._arrays[dtype]()
        var pointers = int_ptr(self.ints).unsafe_offset(self.unembed.entry_pointers)
        if pointers[unsafe_offset=self.unembed.stored] > Int(Int32.MAX):
            raise Error(
                String(
                    "packed model: the unembedding has ", pointers[unsafe_offset=self.unembed.stored],
                    " entries, more than the Mojo runtime's Int32 indices reach;",
                    " run it with --backend torch",
                )
            )
        self.unembed_columns = List[Int32](length=4 * self.width, fill=0)
        var words = List[UInt64](length=self.field_words, fill=0)
        for k in range(self.unembed.stored):
            var column = Int(self.indices[self.unembed.column_ids + k])
            var group = Int(self.column_fields[k])
            if group < 0:
                var start = -1 - group
                for i in range(start + 1, start + 1 + Int(self.column_field_lists[start])):
                    var field = Int(self.column_field_lists[i])
                    words[mask_word(field)] |= mask_bit(field)
                group = -1 - len(self.column_field_words)
                var count_at = len(self.column_field_words)
                self.column_field_words.append(0)
                for w in range(self.field_words):
                    if words[w] != 0:
                        self.column_field_words.append(UInt64(w))
                        self.column_field_words.append(words[w])
                        self.column_field_words[count_at] += 1
                        words[w] = 0
            self.unembed_columns[4 * column] = Int32(group)
            var first = pointers[unsafe_offset=k]
            var end = pointers[unsafe_offset=k + 1]
            self.unembed_columns[4 * column + 1] = Int32(first)
            self.unembed_columns[4 * column + 2] = Int32(end)
            self.unembed_columns[4 * column + 3] = -1
            if group >= CACHED_COLUMN:
                continue
            if group >= 0 and end - first == 1:
                var row = self.indices[self.unembed.row_ids + first]
                self.unembed_columns[4 * column + 1] = Int32(row)
                self.unembed_columns[4 * column + 2] = Int32(len(self.run_weights))
                self.unembed_columns[4 * column + 3] = SINGLE_ENTRY
                self.run_weights.append(
                    arrays.values[unsafe_offset=self.unembed.entries + first].cast[DType.float64]()
                )
                continue
            # The longest run of consecutive rows at the end of the column's entries.
            var start = end - 1
            while start > first and Int(self.indices[self.unembed.row_ids + start - 1]) == Int(
                self.indices[self.unembed.row_ids + start]
            ) - 1:
                start -= 1
            if end - start < RUN_LANES:
                continue
            self.unembed_columns[4 * column + 2] = Int32(start)
            self.unembed_columns[4 * column + 3] = Int32(len(self.runs) // 3)
            self.runs.append(Int(self.indices[self.unembed.row_ids + start]))
            self.runs.append(end - start)
            self.runs.append(len(self.run_weights))
            for e in range(start, end):
                self.run_weights.append(
                    arrays.values[unsafe_offset=self.unembed.entries + e].cast[DType.float64]()
                )

    def _half_words(self) -> Int:
        """Return the offset in token_fields of the pending half's field mask."""
        return self.field_words if self.pending_offset != 0 else 0

    def _find_token_fields(mut self, offset: Int):
        """Set the field mask in token_fields of the half of token_pair at `offset`
        to the fields where its token differs from default_token."""
        var words = self.field_words if offset != 0 else 0
        for w in range(self.field_words):
            self.token_fields[words + w] = 0
        for f in range(self.field_count):
            if self.token_pair[offset + f] != self.default_token[f]:
                self.token_fields[words + mask_word(f)] |= mask_bit(f)

    def _quiet(self) -> Bool:
        """Return True when x is zero in every column that the routers of the layers
        from quiet_start on read. Each of them then chooses an expert that adds
        nothing, x stays the same, and so those layers change nothing."""
        for i in range(len(self.quiet_words)):
            var w = self.quiet_words.unsafe_get(i)
            if self.quiet_mask.unsafe_get(w) & self.x_mask.unsafe_get(w) != 0:
                return False
        return True

    def _step[dtype: DType](mut self, token: TokenPtr, predict: Bool):
        self._embed[dtype](token)
        var last = len(self.layers) - 1
        for l in range(len(self.layers)):
            if l == self.quiet_start:
                self._settle[dtype](self.quiet_reads)
                if self._quiet():
                    break
            var layer = self.layers.unsafe_get(l)
            var need_output = predict or l < last
            self._attention[dtype](layer, need_output)
            if need_output:
                self._feed_forward[dtype](layer)
        if predict:
            self._unembed[dtype]()
        self._drop_pending_heads()
        self.position += 1

    def step(mut self, token: TokenPtr, predict: Bool):
        """Run one token through the model, filling every cache.

        With `predict` the argmax token becomes the pending token; without it the work that
        only feeds the prediction (the last layer's queries and feed-forward block and
        the unembedding) is skipped, as for every prompt token but the last.
        """
        if self.narrow:
            self._step[DType.float32](token, predict)
        else:
            self._step[DType.float64](token, predict)

    # ---- decoding ----------------------------------------------------------------

    def _pending(mut self) -> TokenPtr:
        return token_ptr(self.token_pair).unsafe_offset(self.pending_offset)

    def _previous(mut self) -> TokenPtr:
        return token_ptr(self.token_pair).unsafe_offset(self.field_count - self.pending_offset)

    def pending_value(mut self, field: Int) -> Int:
        return Int(self._pending()[unsafe_offset=field])

    def previous_value(mut self, field: Int) -> Int:
        return Int(self._previous()[unsafe_offset=field])

    def feed_prompt(mut self, prompt: IntPtr, length: Int):
        """Run the prompt tokens (row-major, F per token); the last one's prediction
        becomes the first generated token."""
        var token = token_ptr(self.prompt_token)
        for i in range(length):
            for f in range(self.field_count):
                token[unsafe_offset=f] = Int32(prompt[unsafe_offset=i * self.field_count + f])
            self.step(token, i == length - 1)
        var previous = self._previous()
        for f in range(self.field_count):
            previous[unsafe_offset=f] = token[unsafe_offset=f]
        self._find_token_fields(self.field_count - self.pending_offset)
        self.need_step = False
        self.stopped = False

    def output_byte(mut self) -> Int:
        """Return the byte the pending token writes, or -1 when it writes none."""
        var pending = self._pending()
        if self.out_valid_field < 0 or pending[unsafe_offset=self.out_valid_field] != 1:
            return -1
        var byte = 0
        for i in range(len(self.byte_fields)):
            byte += self.byte_weights[i] * Int(pending[unsafe_offset=self.byte_fields[i]])
        return byte & 0xFF

    def generate(
        mut self, max_tokens: Int, tokens: IntPtr, record: Bool, output: BytePtr
    ) -> Tuple[Int, Int]:
        """Emit up to `max_tokens` tokens, stopping after one whose kind is not RUN.

        Writes each token to `tokens` when `record` is set and each output byte to
        `output`; returns (tokens emitted, bytes written).
        """
        var emitted = 0
        var written = 0
        while emitted < max_tokens and not self.stopped:
            if self.need_step:
                # The pending token becomes the previous one and the input of the step,
                # which writes its prediction into the other half of the pair.
                self.pending_offset = self.field_count - self.pending_offset
                self.step(self._previous(), True)
            self.need_step = True
            var pending = self._pending()
            if record:
                var base = emitted * self.field_count
                for f in range(self.field_count):
                    tokens[unsafe_offset=base + f] = Int(pending[unsafe_offset=f])
            var byte = self.output_byte()
            if byte >= 0:
                output[unsafe_offset=written] = UInt8(byte)
                written += 1
            emitted += 1
            if Int(pending[unsafe_offset=self.kind_field]) != self.run_value:
                self.stopped = True
        return (emitted, written)


def token_ptr(ref values: List[Int32]) -> TokenPtr:
    """Return an untracked pointer to the first field of a token list."""
    return TokenPtr(unsafe_from_address=Int(values.unsafe_ptr()))


@always_inline
def _remembers(block: BlockWeights) -> Bool:
    """Return True when the engine takes the block's output from the block memo."""
    return block.exact and block.w1.rows > 0


@always_inline
def _memo_key[
    dtype: DType
](
    index: Int,
    block: BlockWeights,
    arrays: Arrays[dtype],
    x: FloatPtr,
    x_mask: MaskPtr,
    key: MaskPtr,
) -> Tuple[UInt64, Int]:
    """Write the memo key of block `index` for input x to `key` (see Engine.memo_table)
    and return its hash and word count, or (0, 0) when a value does not pack. A zero
    in a column that x_mask marks is left out, as the masked product skips it; -0.0
    counts as zero too."""
    var column_mask = arrays.pointers.unsafe_offset(block.w1.column_mask)
    key[unsafe_offset=0] = UInt64(index)
    var hash = _fold_word(0, UInt64(index + 1))
    var words = 1
    for i in range(block.w1.mask_words):
        var word = block.w1.first_word + i
        var bits = UInt64(column_mask[unsafe_offset=i]) & x_mask[unsafe_offset=word]
        while bits != 0:
            var column = word * MASK_BITS + Int(count_trailing_zeros(bits))
            bits &= bits - 1
            var value = x[unsafe_offset=column]
            if value == 0.0:
                continue
            var value_bits = bitcast[DType.uint64, 1](value)
            if value_bits & PACK_MASK != 0:
                return (0, 0)  # the value does not pack, so the block is computed
            var packed = value_bits | UInt64(column)
            key[unsafe_offset=words] = packed
            hash = _fold_word(hash, packed)
            words += 1
    # Bit 0 set, because a zero tag marks an empty slot of memo_table.
    return (hash | 1, words)


@always_inline
def _add_run(logits: FloatPtr, weights: FloatPtr, count: Int, coefficient: Float64):
    """Add coefficient times the `count` weights to as many consecutive logits, with a
    fused multiply-add per logit, as the product's entry loop does."""
    var i = 0
    while i + RUN_LANES <= count:
        logits.unsafe_store(
            i,
            weights.unsafe_load[width=RUN_LANES](i).fma(
                coefficient, logits.unsafe_load[width=RUN_LANES](i)
            ),
        )
        i += RUN_LANES
    while i < count:
        logits[unsafe_offset=i] = weights[unsafe_offset=i].fma(coefficient, logits[unsafe_offset=i])
        i += 1


@always_inline
def _fold_word(hash: UInt64, word: UInt64) -> UInt64:
    """Return a memo key's hash with `word` folded in: a CRC-32C step, one instruction,
    where the target has SSE 4.2, else the sum of the word's splitmix64 finalizer.

    Both tell apart keys that differ only in sign bits: +1.0 and -1.0 differ only in
    bit 63, so a plain sum or product of the words would cancel in pairs of sign flips,
    while a CRC is linear over GF(2) with a different map per position, and `mix`
    spreads bit 63 over every bit. The hash only picks a slot; the whole key is
    compared before a record is used.
    """
    comptime if CompilationTarget.has_sse4():
        return llvm_intrinsic["llvm.x86.sse42.crc32.64.64", UInt64](hash, word)
    else:
        return hash + mix(word)


@always_inline
def _same_words(first: MaskPtr, second: MaskPtr, count: Int) -> Bool:
    """Return True when the `count` words at `first` and `second` are equal, comparing
    eight at a time."""
    comptime LANES = 8
    var i = 0
    while i + LANES <= count:
        if first.unsafe_load[width=LANES](i).ne(second.unsafe_load[width=LANES](i)).reduce_or():
            return False
        i += LANES
    while i < count:
        if first[unsafe_offset=i] != second[unsafe_offset=i]:
            return False
        i += 1
    return True


@always_inline
def _memo_slot(hash: UInt64) -> Int:
    """Return the first slot of memo_table to probe for a key's hash."""
    var mixed = (hash ^ (hash >> 29)) * HASH_MULTIPLIER
    return Int(mixed >> MEMO_SHIFT)


@always_inline
def pre_activations[
    dtype: DType
](block: BlockWeights, arrays: Arrays[dtype], x: FloatPtr, x_mask: MaskPtr, hidden: FloatPtr):
    """Set hidden to W1 x + b1. Each twin unit takes its representative's value plus
    the difference of their biases, the same row of W1 plus its own bias. The twins
    are the block's last units, so their biases are not copied and eight are set at
    once. Exact because the packer bounded every partial sum of integers below 2^52
    (tlc.mojo.twins)."""
    var first_twin = block.w1.rows - block.twin_count
    copy_floats(hidden, arrays.floats.unsafe_offset(block.b1), first_twin)
    accumulate_masked(block.w1, arrays, x, x_mask, hidden, x_mask, x_mask)
    comptime LANES = 8
    var representatives = arrays.pointers.unsafe_offset(block.twin_representatives)
    var deltas = arrays.floats.unsafe_offset(block.twin_deltas)
    var twins = hidden.unsafe_offset(first_twin)
    var i = 0
    while i + LANES <= block.twin_count:
        var sources = hidden.unsafe_gather(representatives.unsafe_load[width=LANES](i))
        twins.unsafe_store(i, sources + deltas.unsafe_load[width=LANES](i))
        i += LANES
    while i < block.twin_count:
        twins[unsafe_offset=i] = (
            hidden[unsafe_offset=representatives[unsafe_offset=i]] + deltas[unsafe_offset=i]
        )
        i += 1


@always_inline
def project[
    dtype: DType
](
    matrix: Matrix,
    bias: Int,
    gather: Int,
    arrays: Arrays[dtype],
    x: FloatPtr,
    x_mask: MaskPtr,
    output: FloatPtr,
    gather_columns: IntPtr,
    gather_weights: FloatPtr,
    extra: Tuple[IntPtr, IntPtr, FloatPtr, Int, Int],
):
    """Set output = matrix @ x + bias, by gathers from the engine's gather lists when
    `gather` >= 0, then adding the extra entries (rows, columns, weights, first, end).

    A gathered row computes bias + weight * x[column] with one fused multiply-add, as
    the masked product does. It differs only where x[column] is 0, which the masked
    product skips: the sum is then bias + (+-0.0), which can turn a bias of -0.0 into
    +0.0. Keys, queries and values compare components with == and ignore zero
    components, and router logits only feed an argmax, so no result changes.
    """
    if gather < 0:
        affine_masked(matrix, bias, arrays, x, x_mask, output)
        return
    comptime LANES = 8
    var columns = gather_columns.unsafe_offset(gather)
    var weights = gather_weights.unsafe_offset(gather)
    var biases = arrays.floats.unsafe_offset(bias)
    var row = 0
    while row + LANES <= matrix.rows:
        var inputs = x.unsafe_gather(columns.unsafe_load[width=LANES](row))
        var products = weights.unsafe_load[width=LANES](row).fma(
            inputs, biases.unsafe_load[width=LANES](row)
        )
        output.unsafe_store(row, products)
        row += LANES
    while row < matrix.rows:
        var input = x[unsafe_offset=columns[unsafe_offset=row]]
        output[unsafe_offset=row] = weights[unsafe_offset=row].fma(
            input, biases[unsafe_offset=row]
        )
        row += 1
    for e in range(extra[3], extra[4]):
        var target = extra[0][unsafe_offset=e]
        var input = x[unsafe_offset=extra[1][unsafe_offset=e]]
        output[unsafe_offset=target] = extra[2][unsafe_offset=e].fma(
            input, output[unsafe_offset=target]
        )


def _read_layer(
    mut reader: HeaderReader,
    mut heads: List[HeadWeights],
    mut blocks: List[BlockWeights],
    mut field_masks: List[UInt64],
    field_count: Int,
) raises -> LayerWeights:
    var first_head = len(heads)
    var head_count = reader.next()
    for _ in range(head_count):
        var exact = reader.next() != 0
        var wq = reader.matrix()
        var bq = reader.next()
        var wk = reader.matrix()
        var bk = reader.next()
        var wv = reader.matrix()
        var bv = reader.next()
        var wo = reader.matrix()
        var key_fields = _read_field_mask(reader, field_masks, field_count)
        var value_fields = _read_field_mask(reader, field_masks, field_count)
        var query_fields = _read_field_mask(reader, field_masks, field_count)
        var deferrable = reader.next() != 0
        var reads_q = UInt64(reader.next())
        var reads_k = UInt64(reader.next())
        var reads_v = UInt64(reader.next())
        heads.append(
            HeadWeights(
                exact,
                wq,
                bq,
                wk,
                bk,
                wv,
                bv,
                wo,
                key_fields,
                value_fields,
                query_fields,
                deferrable,
                reads_q,
                reads_k,
                reads_v,
            )
        )
    var shared = -1
    if reader.next() != 0:
        shared = len(blocks)
        blocks.append(reader.block())
    var expert_count = reader.next()
    var router = Matrix(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, False)
    var router_bias = 0
    var router_reads: UInt64 = 0
    var first_expert = len(blocks)
    if expert_count > 0:
        router = reader.matrix()
        router_bias = reader.next()
        router_reads = UInt64(reader.next())
        for _ in range(expert_count):
            blocks.append(reader.block())
    return LayerWeights(
        first_head,
        head_count,
        shared,
        router,
        router_bias,
        router_reads,
        first_expert,
        expert_count,
        0,
        0,
    )


def _read_field_mask(
    mut reader: HeaderReader, mut field_masks: List[UInt64], field_count: Int
) raises -> Int:
    """Read a count and that many fields (or -1) and return the offset of their mask
    in `field_masks` (or -1). The mask is stored whole, _mask_words(field_count)
    words, one bit per field."""
    var count = reader.next()
    if count < 0:
        return -1
    var offset = len(field_masks)
    for _ in range(_mask_words(field_count)):
        field_masks.append(0)
    for _ in range(count):
        var field = reader.next()
        if field < 0 or field >= field_count:
            raise Error("packed model names a token field out of range")
        field_masks[offset + mask_word(field)] |= mask_bit(field)
    return offset


def _mask_words(field_count: Int) -> Int:
    """Return the words of a field mask: one bit per field, rounded up to a multiple
    of MASK_LANES words so that masks are compared MASK_LANES words at a time."""
    var words = field_count // MASK_BITS + 1
    return (words + MASK_LANES - 1) // MASK_LANES * MASK_LANES


def _max_rows(heads: List[HeadWeights], which: Int) -> Int:
    """Return the widest query (which = 0), key (1) or value (2) of any head."""
    var widest = 0
    for head in heads:
        if which == 0:
            widest = max(widest, head.wq.rows)
        elif which == 1:
            widest = max(widest, head.wk.rows)
        else:
            widest = max(widest, head.wv.rows)
    return widest


def _max_hidden(blocks: List[BlockWeights]) -> Int:
    var widest = 0
    for block in blocks:
        widest = max(widest, block.w1.rows)
    return widest


@always_inline
def _copy_mask(dest: MaskPtr, src: MaskPtr, words: Int):
    """Copy `words` mask words from src to dest, four at a time."""
    var w = 0
    while w + 4 <= words:
        dest.unsafe_store(w, src.unsafe_load[width=4](w))
        w += 4
    while w < words:
        dest[unsafe_offset=w] = src[unsafe_offset=w]
        w += 1


@always_inline
def _restore_written[
    zero: Bool
](x: FloatPtr, embedded: FloatPtr, written: MaskPtr, words: Int):
    """Copy `embedded` to x at the bits set in `written`, or with `zero` set x to 0
    there, and clear them. Four mask words are tested at once, because most of them
    are zero."""
    var w = 0
    while w + 4 <= words:
        if written.unsafe_load[width=4](w).reduce_or() != 0:
            comptime for lane in range(4):
                _restore_word[zero](x, embedded, written[unsafe_offset=w + lane], w + lane)
            written.unsafe_store(w, SIMD[DType.uint64, 4](0))
        w += 4
    while w < words:
        _restore_word[zero](x, embedded, written[unsafe_offset=w], w)
        written[unsafe_offset=w] = 0
        w += 1


@always_inline
def _restore_word[
    zero: Bool
](x: FloatPtr, embedded: FloatPtr, var bits: UInt64, word: Int):
    while bits != 0:
        var i = word * MASK_BITS + Int(count_trailing_zeros(bits))
        bits &= bits - 1
        comptime if zero:
            x[unsafe_offset=i] = 0.0
        else:
            x[unsafe_offset=i] = embedded[unsafe_offset=i]


def _kept_offsets(
    layers: List[LayerWeights], heads: List[HeadWeights], rows: Int
) raises -> List[Int]:
    """Return the offset of every head's query, key and value in Engine.kept_qkv, with
    -1 outside layer 0 and for every head when `rows` is 0."""
    var offsets = List[Int](length=3 * len(heads), fill=-1)
    if rows == 0:
        return offsets^
    if len(layers) == 0:
        raise Error("packed model has a first-layer qkv matrix but no layers")
    var offset = 0
    for h in range(layers[0].first_head, layers[0].first_head + layers[0].head_count):
        offsets[3 * h] = offset
        offset += heads[h].wq.rows
        offsets[3 * h + 1] = offset
        offset += heads[h].wk.rows
        offsets[3 * h + 2] = offset
        offset += heads[h].wv.rows
    if offset != rows:
        raise Error(
            String(
                "packed model: the first-layer qkv matrix has ",
                rows,
                " rows but layer 0's heads have ",
                offset,
            )
        )
    return offsets^


def _append_difference[
    dtype: DType
](
    matrix: Matrix,
    old: Int,
    new: Int,
    arrays: Arrays[dtype],
    flips: Bool,
    mut old_sums: List[Float64],
    mut new_sums: List[Float64],
    mut touched: List[Int],
    skipped: List[Bool],
    mut words: List[Float64],
):
    """Append to `words` the row bits and the value of every nonzero entry of stored
    column `new` minus stored column `old`, for a matrix that stores all of its columns,
    and with `flips` the bits of the row's mask bit when exactly one column is zero
    there (else 0). Rows set in `skipped` are left out. The sums must be zero and at
    least as long as the matrix has rows; they stay zero."""
    var entry_pointers = arrays.pointers.unsafe_offset(matrix.entry_pointers)
    var row_ids = arrays.indices.unsafe_offset(matrix.row_ids)
    var values = arrays.values.unsafe_offset(matrix.entries)
    touched.clear()
    for column in range(2):
        var stored = new if column == 1 else old
        var end = entry_pointers[unsafe_offset=stored + 1]
        for entry in range(entry_pointers[unsafe_offset=stored], end):
            var row = Int(row_ids[unsafe_offset=entry])
            var value = values[unsafe_offset=entry].cast[DType.float64]()
            if column == 1:
                new_sums[row] += value
            else:
                old_sums[row] += value
            touched.append(row)
    for row in touched:
        var delta = new_sums[row] - old_sums[row]
        if delta != 0.0 and not skipped[row]:
            words.append(bitcast[DType.float64, 1](Int64(row)))
            words.append(delta)
            if flips:
                var flip = mask_bit(row) if (old_sums[row] != 0.0) != (
                    new_sums[row] != 0.0
                ) else UInt64(0)
                words.append(bitcast[DType.float64, 1](flip))
        # A row touched twice is appended once, because its delta is then zero.
        old_sums[row] = 0.0
        new_sums[row] = 0.0


def _owned_rows[
    dtype: DType
](matrix: Matrix, rows: Int, arrays: Arrays[dtype], vocab: List[Int]) -> Bool:
    """Return True when every row of the embedding matrix (a column per token value,
    the fields' columns in order) has entries in the columns of one field only."""
    var entry_pointers = arrays.pointers.unsafe_offset(matrix.entry_pointers)
    var row_ids = arrays.indices.unsafe_offset(matrix.row_ids)
    var owners = List[Int](length=rows, fill=-1)
    var column = 0
    for f in range(len(vocab)):
        for _ in range(vocab[f]):
            var end = entry_pointers[unsafe_offset=column + 1]
            for entry in range(entry_pointers[unsafe_offset=column], end):
                var row = Int(row_ids[unsafe_offset=entry])
                if owners[row] >= 0 and owners[row] != f:
                    return False
                owners[row] = f
            column += 1
    return True
