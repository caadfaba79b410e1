//! What a shard tells the allocator. The binary's global allocator is mimalloc (`src/main.rs`), which
//! keeps freed pages of a thread's heap for reuse and hands them back to the kernel only lazily, when
//! that thread allocates again. A shard that just closed thousands of connections then goes quiet, so
//! their memory would stay in its RSS. After such a drop the shard asks mimalloc to give back what is
//! free now (see `Hub::shrink_if_sparse` for when).

/// Returns the calling thread's free pages to the kernel. Rare (after the connection count of a shard
/// fell to a quarter of its peak, then each further halving), and a walk of this thread's heap.
pub(crate) fn return_free_memory() {
    // SAFETY: mi_collect has no preconditions; with `force` it purges this thread's free pages. When
    // mimalloc is not the global allocator (unit tests), its heaps are empty and this does nothing.
    unsafe { libmimalloc_sys::mi_collect(true) };
}
