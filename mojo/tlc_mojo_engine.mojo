# Python bindings of the Mojo runtime: the extension module `tlc_mojo_engine`.
#
# Arrays cross the boundary as addresses of C-contiguous numpy buffers that the Python
# caller (tlc.mojo.runner) allocates, checks and keeps alive for the call. An engine
# lives on the heap between calls and Python holds its address as an integer handle.

from std.memory.alloc import unsafe_alloc
from std.os import abort
from std.python import PythonObject
from std.python.bindings import PythonModuleBuilder

from cache import HeadCache
from engine import Engine
from kernels import BytePtr, FloatPtr, IntPtr

comptime EnginePtr = Pointer[Engine, MutUntrackedOrigin]


@export
def PyInit_tlc_mojo_engine() abi("C") -> PythonObject:
    try:
        var module = PythonModuleBuilder("tlc_mojo_engine")
        module.def_function[create](
            "create", docstring="create(descriptor of the packed arrays) -> handle"
        )
        module.def_function[feed](
            "feed", docstring="feed(handle, prompt, n_tokens): run the prompt tokens"
        )
        module.def_function[generate](
            "generate",
            docstring=(
                "generate(handle, max_tokens, tokens or 0, output, status): decode;"
                " status gets (tokens, bytes, stopped, the last token, the token before)"
            ),
        )
        module.def_function[cache_sizes](
            "cache_sizes", docstring="cache_sizes(handle, sizes) -> head count"
        )
        module.def_function[memo_counts](
            "memo_counts",
            docstring=(
                "memo_counts(handle, counts): write (records, hits, clears, lookups, probes)"
            ),
        )
        module.def_function[limit_memo](
            "limit_memo", docstring="limit_memo(handle, records): clear the memo at that size"
        )
        module.def_function[destroy]("destroy", docstring="destroy(handle)")
        module.def_function[probe_exact](
            "probe_exact",
            docstring="probe_exact(keys, queries, count, key_width, results) -> extra probes",
        )
        return module.finalize()
    except error:
        abort(String("failed to create the tlc_mojo_engine module: ", error))


def _engine(handle: PythonObject) raises -> EnginePtr:
    var address = Int(py=handle)
    if address == 0:
        raise Error("the engine handle is null (already destroyed?)")
    return EnginePtr(unsafe_from_address=address)


def _copy[dtype: DType](address: Int, length: Int) -> List[Scalar[dtype]]:
    var source = Pointer[Scalar[dtype], MutUntrackedOrigin](unsafe_from_address=address)
    var copy = List[Scalar[dtype]](capacity=length)
    for i in range(length):
        copy.append(source[unsafe_offset=i])
    return copy^


def create(arrays: PythonObject) raises -> PythonObject:
    """Copy the packed model into a new engine and return its address.

    `arrays` is the address of 9 Int64s: the address and length of `ints`, `indices`
    (Int32), `value_words` (Float64 words holding the entry values) and `floats`, and
    1 when the entry values are Float32.
    """
    var descriptor = IntPtr(unsafe_from_address=Int(py=arrays))
    var ints = List[Int](capacity=descriptor[unsafe_offset=1])
    var int_source = IntPtr(unsafe_from_address=descriptor[unsafe_offset=0])
    for i in range(descriptor[unsafe_offset=1]):
        ints.append(int_source[unsafe_offset=i])
    var indices = _copy[DType.int32](descriptor[unsafe_offset=2], descriptor[unsafe_offset=3])
    var value_words = _copy[DType.float64](
        descriptor[unsafe_offset=4], descriptor[unsafe_offset=5]
    )
    var floats = _copy[DType.float64](descriptor[unsafe_offset=6], descriptor[unsafe_offset=7])
    var narrow = descriptor[unsafe_offset=8] != 0
    var engine = unsafe_alloc[Engine](1)
    engine.unsafe_write(Engine(ints^, indices^, value_words^, narrow, floats^))
    return Int(engine)


def feed(handle: PythonObject, prompt: PythonObject, n_tokens: PythonObject) raises -> PythonObject:
    var engine = _engine(handle)
    engine[].feed_prompt(IntPtr(unsafe_from_address=Int(py=prompt)), Int(py=n_tokens))
    return PythonObject(None)


def generate(
    handle: PythonObject,
    max_tokens: PythonObject,
    tokens: PythonObject,
    output: PythonObject,
    status: PythonObject,
) raises -> PythonObject:
    var engine = _engine(handle)
    var token_address = Int(py=tokens)
    var record = token_address != 0
    if not record:
        # A valid address that is never written, because `record` is off.
        token_address = Int(py=status)
    var counts = engine[].generate(
        Int(py=max_tokens),
        IntPtr(unsafe_from_address=token_address),
        record,
        BytePtr(unsafe_from_address=Int(py=output)),
    )
    var status_out = IntPtr(unsafe_from_address=Int(py=status))
    status_out[unsafe_offset=0] = counts[0]
    status_out[unsafe_offset=1] = counts[1]
    status_out[unsafe_offset=2] = 1 if engine[].stopped else 0
    var fields = engine[].field_count
    for f in range(fields):
        status_out[unsafe_offset=3 + f] = engine[].pending_value(f)
        status_out[unsafe_offset=3 + fields + f] = engine[].previous_value(f)
    return PythonObject(None)


def cache_sizes(handle: PythonObject, sizes_out: PythonObject) raises -> PythonObject:
    """Write the number of cached entries of every head, in layer then head order."""
    var engine = _engine(handle)
    var sizes = IntPtr(unsafe_from_address=Int(py=sizes_out))
    for h in range(len(engine[].caches)):
        sizes[unsafe_offset=h] = engine[].caches[h].count()
    return len(engine[].caches)


def memo_counts(handle: PythonObject, counts_out: PythonObject) raises -> PythonObject:
    """Write the block memo's record count, the outputs taken from it, the times it was
    cleared, its lookups and the hash-table slots they read."""
    var engine = _engine(handle)
    var counts = IntPtr(unsafe_from_address=Int(py=counts_out))
    counts[unsafe_offset=0] = engine[].memo_records
    counts[unsafe_offset=1] = engine[].memo_hits
    counts[unsafe_offset=2] = engine[].memo_clears
    counts[unsafe_offset=3] = engine[].memo_lookups
    counts[unsafe_offset=4] = engine[].memo_probes
    return PythonObject(None)


def limit_memo(handle: PythonObject, records: PythonObject) raises -> PythonObject:
    """Clear the block memo whenever it reaches `records` records."""
    var engine = _engine(handle)
    engine[].limit_memo(Int(py=records))
    return PythonObject(None)


def destroy(handle: PythonObject) raises -> PythonObject:
    var engine = _engine(handle)
    engine.unsafe_deinit_pointee()
    engine.unsafe_free()
    return PythonObject(None)


def probe_exact(
    keys: PythonObject,
    queries: PythonObject,
    count: PythonObject,
    key_width: PythonObject,
    results_out: PythonObject,
) raises -> PythonObject:
    """Append key i at position i and then look up query i, for i in 0 .. count - 1, on
    an exact-match cache. Writes, per step, the winning position through `attend`, the
    winning position by brute force, and 1 when `attend` used the hash index. Returns
    the number of extra hash-table buckets that lookups visited."""
    var width = Int(py=key_width)
    var cache = HeadCache(width, 1, True)
    var key_base = Int(py=keys)
    var query_base = Int(py=queries)
    var results = IntPtr(unsafe_from_address=Int(py=results_out))
    var value = List[Float64](length=1, fill=0.0)
    for i in range(Int(py=count)):
        var key = FloatPtr(unsafe_from_address=key_base + i * width * 8)
        var query = FloatPtr(unsafe_from_address=query_base + i * width * 8)
        value[0] = Float64(i)
        _ = cache.append(key, FloatPtr(unsafe_from_address=Int(value.unsafe_ptr())), i)
        var indexed = cache.exact and cache.index_usable and cache.sentinel >= 0
        results[unsafe_offset=3 * i] = cache.stamps[cache.attend(query)]
        results[unsafe_offset=3 * i + 1] = cache.stamps[cache.attend_brute_force(query)]
        results[unsafe_offset=3 * i + 2] = 1 if indexed else 0
    return cache.probe_steps
