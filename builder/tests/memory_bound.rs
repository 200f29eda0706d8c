//! A block writer's memory is bounded by its settings (Arrow batch, row group), not by the size
//! of the block or of its records: the heap's peak while a block many times the row group is
//! written, counted by a global allocator of this test binary.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use blocksmith_builder::block::{BlockOptions, BlockWriter, MAX_BATCHES_HELD, batch_bytes};
use blocksmith_builder::record::RecordRef;
use blocksmith_crds::pipeline::Compression;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            let live = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size
                - layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const MIB: usize = 1 << 20;

/// Peak heap above what was live before, while `block_bytes` of `record_bytes` records are
/// written with row groups of `row_group_bytes`.
fn peak_while_writing(record_bytes: usize, block_bytes: usize, row_group_bytes: usize) -> usize {
    // Uncompressed, so encoded row groups are as big as their records (the worst case).
    let opts = BlockOptions {
        compression: Compression::None,
        row_group_bytes,
        ..BlockOptions::default()
    };
    let value = vec![7u8; record_bytes];
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let mut writer = BlockWriter::with_encoder_thread(std::io::sink(), &opts).unwrap();
    for offset in 0..(block_bytes / record_bytes) as i64 {
        writer
            .push(RecordRef {
                partition: 0,
                offset,
                timestamp_ms: Some(offset),
                key: None,
                value: Some(&value),
                headers: vec![],
            })
            .unwrap();
    }
    let (_, stats) = writer.finish().unwrap();
    assert!(stats.bytes as usize > block_bytes, "{stats:?}");
    PEAK.load(Ordering::Relaxed) - before
}

/// The bound docs/production.md states for the writer: the Arrow batches it may hold, each
/// at most one record over the batch size, plus twice the row group (its encoded pages, and
/// the pages being written out when it closes), plus 4 MiB for the column writers' buffers.
fn bound(record_bytes: usize, row_group_bytes: usize) -> usize {
    MAX_BATCHES_HELD * (batch_bytes(row_group_bytes) + record_bytes) + 2 * row_group_bytes + 4 * MIB
}

#[test]
fn memory_is_bounded_by_the_settings_not_by_the_block_or_its_records() {
    let row_group = 8 * MIB;
    for record_bytes in [1 << 10, 64 << 10] {
        let peak = peak_while_writing(record_bytes, 128 * MIB, row_group);
        let bound = bound(record_bytes, row_group);
        eprintln!(
            "records of {record_bytes} B, 128 MiB block, 8 MiB row groups: peak heap {:.1} MiB, bound {:.1} MiB",
            peak as f64 / MIB as f64,
            bound as f64 / MIB as f64
        );
        assert!(peak <= bound, "peak {peak} over the bound {bound}");
    }
}
