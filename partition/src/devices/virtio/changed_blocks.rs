//! The changed-block map of a virtual disk: Hyper-V's Resilient Change Tracking.
//!
//! Every write the guest makes to a disk sets the bits of the fixed-size blocks it touches. A backup
//! takes the set ([`ChangedBlockMap::take`]) at its point in time and copies only those blocks; the
//! next backup finds only what changed since.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::VirtioError;
use super::blk::SECTOR_SIZE;

const WORD_BITS: u64 = u64::BITS as u64;

/// Which blocks of a disk were written since the map was last taken.
///
/// Shared between the disk device (its I/O thread or a vCPU, which marks) and the backup code
/// (another thread, which takes) through an `Arc`; each 64-block word is an atomic, so neither
/// side locks.
///
/// Ordering: the device marks a range only after the write to the image completed. A backup that
/// takes the map, then reads the image, therefore either sees a block in this set or in the next
/// one, never in neither.
#[derive(Debug)]
pub struct ChangedBlockMap {
    block_shift: u32,
    block_count: u64,
    words: Box<[AtomicU64]>,
}

impl ChangedBlockMap {
    /// The granularity used unless the owner asks otherwise: 64 KiB, a common backup extent.
    pub const DEFAULT_BLOCK_SIZE: u64 = 64 * 1024;

    /// An empty map covering `disk_size` bytes in blocks of `block_size` bytes.
    ///
    /// `block_size` must be a power of two of at least 512 bytes.
    pub fn new(disk_size: u64, block_size: u64) -> Result<Self, VirtioError> {
        if !block_size.is_power_of_two() || block_size < SECTOR_SIZE {
            return Err(VirtioError::InvalidBlockSize { block_size });
        }
        let block_count = disk_size.div_ceil(block_size);
        let words = (0..block_count.div_ceil(WORD_BITS))
            .map(|_| AtomicU64::new(0))
            .collect();
        Ok(Self {
            block_shift: block_size.trailing_zeros(),
            block_count,
            words,
        })
    }

    /// Bytes per block.
    pub fn block_size(&self) -> u64 {
        1 << self.block_shift
    }

    /// Blocks the map covers.
    pub fn block_count(&self) -> u64 {
        self.block_count
    }

    /// Bytes the map covers: the disk size rounded up to whole blocks.
    pub fn covered_bytes(&self) -> u64 {
        self.block_count << self.block_shift
    }

    /// Marks every block that `[offset, offset + len)` touches. Bytes past the end are ignored.
    ///
    /// Lock-free and allocation-free: called by the thread serving the disk after each write.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || self.block_count == 0 {
            return;
        }
        let first = offset >> self.block_shift;
        if first >= self.block_count {
            return;
        }
        let last = (offset.saturating_add(len - 1) >> self.block_shift).min(self.block_count - 1);
        for word in first / WORD_BITS..=last / WORD_BITS {
            let low = first.max(word * WORD_BITS) - word * WORD_BITS;
            let high = last.min(word * WORD_BITS + WORD_BITS - 1) - word * WORD_BITS;
            // Bits `low..=high`; `high - low` is at most 63, so neither shift overflows.
            let mask = (u64::MAX >> (WORD_BITS - 1 - (high - low))) << low;
            if let Some(slot) = usize::try_from(word).ok().and_then(|w| self.words.get(w)) {
                slot.fetch_or(mask, Ordering::Release);
            }
        }
    }

    /// Whether `block` is marked.
    pub fn is_marked(&self, block: u64) -> bool {
        bit_is_set(block, self.block_count, |w| {
            self.words.get(w).map(|slot| slot.load(Ordering::Acquire))
        })
    }

    /// How many blocks are marked.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|slot| u64::from(slot.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// A copy of the marked set; the map keeps its marks.
    pub fn snapshot(&self) -> ChangedBlocks {
        self.collect(|slot| slot.load(Ordering::Acquire))
    }

    /// The marked set, leaving the map empty: the point in time of an incremental backup.
    ///
    /// Each word is swapped atomically, so a write racing with `take` lands either in the
    /// returned set or in the map, never in neither.
    pub fn take(&self) -> ChangedBlocks {
        self.collect(|slot| slot.swap(0, Ordering::AcqRel))
    }

    /// Marks again every block of `blocks`: hands a taken set back after a backup failed, or
    /// carries marks across a restart of the device.
    pub fn merge(&self, blocks: &ChangedBlocks) -> Result<(), VirtioError> {
        if blocks.block_count != self.block_count || blocks.block_size != self.block_size() {
            return Err(VirtioError::ChangedBlockGeometry {
                blocks: self.block_count,
                size: self.block_size(),
                found_blocks: blocks.block_count,
                found_size: blocks.block_size,
            });
        }
        for (slot, word) in self.words.iter().zip(&blocks.words) {
            slot.fetch_or(*word, Ordering::Release);
        }
        Ok(())
    }

    fn collect(&self, read: impl Fn(&AtomicU64) -> u64) -> ChangedBlocks {
        ChangedBlocks {
            block_size: self.block_size(),
            block_count: self.block_count,
            words: self.words.iter().map(read).collect(),
        }
    }
}

/// A set of changed blocks taken from a [`ChangedBlockMap`]: what an incremental backup copies.
///
/// Serializable so a backup manifest or a saved VM can keep it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ChangedBlocksRepr", into = "ChangedBlocksRepr")]
pub struct ChangedBlocks {
    block_size: u64,
    block_count: u64,
    /// Bit `b % 64` of word `b / 64` is block `b`; no bit at or past `block_count` is set.
    words: Vec<u64>,
}

impl ChangedBlocks {
    /// Bytes per block.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Blocks of the disk the set describes.
    pub fn block_count(&self) -> u64 {
        self.block_count
    }

    /// Whether `block` changed.
    pub fn contains(&self, block: u64) -> bool {
        bit_is_set(block, self.block_count, |w| self.words.get(w).copied())
    }

    /// How many blocks changed.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// The changed block indices in ascending order; block `b` covers bytes
    /// `b * block_size .. (b + 1) * block_size` of the disk.
    pub fn iter(&self) -> ChangedBlockIter<'_> {
        ChangedBlockIter {
            words: &self.words,
            index: 0,
            pending: self.words.first().copied().unwrap_or(0),
        }
    }
}

impl<'a> IntoIterator for &'a ChangedBlocks {
    type Item = u64;
    type IntoIter = ChangedBlockIter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Iterator over the indices of a [`ChangedBlocks`] set, ascending.
#[derive(Debug, Clone)]
pub struct ChangedBlockIter<'a> {
    words: &'a [u64],
    index: usize,
    /// The bits of `words[index]` not yet yielded.
    pending: u64,
}

impl Iterator for ChangedBlockIter<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        while self.pending == 0 {
            self.index += 1;
            self.pending = *self.words.get(self.index)?;
        }
        let bit = u64::from(self.pending.trailing_zeros());
        self.pending &= self.pending - 1;
        Some(self.index as u64 * WORD_BITS + bit)
    }
}

/// The serialized form of [`ChangedBlocks`], checked on the way in.
#[derive(Serialize, Deserialize)]
struct ChangedBlocksRepr {
    block_size: u64,
    block_count: u64,
    words: Vec<u64>,
}

impl TryFrom<ChangedBlocksRepr> for ChangedBlocks {
    type Error = VirtioError;

    fn try_from(repr: ChangedBlocksRepr) -> Result<Self, VirtioError> {
        if !repr.block_size.is_power_of_two() || repr.block_size < SECTOR_SIZE {
            return Err(VirtioError::InvalidBlockSize {
                block_size: repr.block_size,
            });
        }
        let tail_bits = repr.block_count % WORD_BITS;
        let tail_is_clear = tail_bits == 0 || repr.words.last().is_none_or(|w| w >> tail_bits == 0);
        if repr.words.len() as u64 != repr.block_count.div_ceil(WORD_BITS) || !tail_is_clear {
            return Err(VirtioError::MalformedChangedBlocks {
                block_count: repr.block_count,
            });
        }
        Ok(Self {
            block_size: repr.block_size,
            block_count: repr.block_count,
            words: repr.words,
        })
    }
}

impl From<ChangedBlocks> for ChangedBlocksRepr {
    fn from(blocks: ChangedBlocks) -> Self {
        Self {
            block_size: blocks.block_size,
            block_count: blocks.block_count,
            words: blocks.words,
        }
    }
}

fn bit_is_set(block: u64, block_count: u64, word: impl Fn(usize) -> Option<u64>) -> bool {
    block < block_count
        && usize::try_from(block / WORD_BITS)
            .ok()
            .and_then(word)
            .is_some_and(|w| w & (1 << (block % WORD_BITS)) != 0)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;

    const KIB: u64 = 1024;

    #[test]
    fn write_inside_one_block_marks_only_that_block() {
        let map = ChangedBlockMap::new(1024 * KIB, 64 * KIB).unwrap();

        map.mark(64 * KIB + 512, 512);

        assert_eq!(map.snapshot().iter().collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn write_straddling_a_boundary_marks_both_blocks() {
        let map = ChangedBlockMap::new(1024 * KIB, 64 * KIB).unwrap();

        map.mark(64 * KIB - 512, 1024);

        assert_eq!(map.snapshot().iter().collect::<Vec<_>>(), [0, 1]);
    }

    #[test]
    fn write_across_several_words_marks_every_block_between() {
        let map = ChangedBlockMap::new(300 * 512, 512).unwrap();

        map.mark(10 * 512, 200 * 512);

        assert_eq!(
            map.snapshot().iter().collect::<Vec<_>>(),
            (10..210).collect::<Vec<_>>()
        );
    }

    #[test]
    fn range_past_the_end_is_clipped_to_the_last_block() {
        let map = ChangedBlockMap::new(4 * 512, 512).unwrap();

        map.mark(3 * 512, u64::MAX);
        map.mark(u64::MAX, 1);

        assert_eq!(map.snapshot().iter().collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn empty_range_marks_nothing() {
        let map = ChangedBlockMap::new(4 * 512, 512).unwrap();

        map.mark(512, 0);

        assert_eq!(map.count(), 0);
    }

    #[test]
    fn take_returns_the_marks_and_clears_the_map() {
        let map = ChangedBlockMap::new(1024 * KIB, 64 * KIB).unwrap();
        map.mark(0, 1);
        map.mark(5 * 64 * KIB, 1);

        let taken = map.take();

        assert_eq!(taken.iter().collect::<Vec<_>>(), [0, 5]);
        assert_eq!(map.count(), 0);
    }

    #[test]
    fn merge_hands_a_taken_set_back() {
        let map = ChangedBlockMap::new(1024 * KIB, 64 * KIB).unwrap();
        map.mark(3 * 64 * KIB, 1);
        let taken = map.take();
        map.mark(7 * 64 * KIB, 1);

        map.merge(&taken).unwrap();

        assert_eq!(map.snapshot().iter().collect::<Vec<_>>(), [3, 7]);
    }

    #[test]
    fn merge_of_another_geometry_is_refused() {
        let map = ChangedBlockMap::new(1024 * KIB, 64 * KIB).unwrap();
        let other = ChangedBlockMap::new(1024 * KIB, 4 * KIB).unwrap().take();

        assert!(matches!(
            map.merge(&other),
            Err(VirtioError::ChangedBlockGeometry { .. })
        ));
    }

    #[test]
    fn block_size_that_is_not_a_power_of_two_is_refused() {
        assert!(matches!(
            ChangedBlockMap::new(1024 * KIB, 3 * 512),
            Err(VirtioError::InvalidBlockSize { block_size: 1536 })
        ));
    }

    #[test]
    fn block_size_below_a_sector_is_refused() {
        assert!(ChangedBlockMap::new(1024 * KIB, 256).is_err());
    }

    #[test]
    fn partial_last_block_is_covered() {
        let map = ChangedBlockMap::new(64 * KIB + 512, 64 * KIB).unwrap();

        map.mark(64 * KIB, 512);

        assert_eq!(map.block_count(), 2);
        assert!(map.is_marked(1));
    }

    #[test]
    fn serialized_set_round_trips() {
        let map = ChangedBlockMap::new(1024 * KIB, 4 * KIB).unwrap();
        map.mark(100 * KIB, 10 * KIB);
        let set = map.snapshot();

        let json = serde_json::to_string(&set).unwrap();

        assert_eq!(serde_json::from_str::<ChangedBlocks>(&json).unwrap(), set);
    }

    #[test]
    fn serialized_set_with_bits_past_the_end_is_refused() {
        let json = r#"{"block_size":512,"block_count":3,"words":[8]}"#;

        assert!(serde_json::from_str::<ChangedBlocks>(json).is_err());
    }

    #[test]
    fn serialized_set_with_wrong_word_count_is_refused() {
        let json = r#"{"block_size":512,"block_count":3,"words":[1,0]}"#;

        assert!(serde_json::from_str::<ChangedBlocks>(json).is_err());
    }

    #[test]
    fn marks_from_another_thread_are_seen_by_take() {
        let map = Arc::new(ChangedBlockMap::new(64 * 512, 512).unwrap());
        let writer = {
            let map = Arc::clone(&map);
            std::thread::spawn(move || (0..64).for_each(|b| map.mark(b * 512, 512)))
        };

        writer.join().unwrap();

        assert_eq!(map.take().count(), 64);
    }

    /// The blocks `[offset, offset + len)` touches, clipped to the disk, computed one block at a time.
    fn touched(disk: u64, block: u64, ranges: &[(u64, u64)]) -> BTreeSet<u64> {
        (0..disk.div_ceil(block))
            .filter(|b| {
                let (start, end) = (b * block, (b + 1) * block);
                ranges
                    .iter()
                    .any(|&(off, len)| len > 0 && off < end && off.saturating_add(len) > start)
            })
            .collect()
    }

    proptest! {
        #[test]
        fn marking_ranges_sets_exactly_the_touched_blocks(
            disk in 1u64..(256 * KIB),
            shift in 9u32..16,
            ranges in prop::collection::vec((0u64..(300 * KIB), 0u64..(80 * KIB)), 0..12),
        ) {
            let block = 1u64 << shift;
            let map = ChangedBlockMap::new(disk, block).unwrap();

            for &(offset, len) in &ranges {
                map.mark(offset, len);
            }

            let expected = touched(disk, block, &ranges);
            prop_assert_eq!(map.snapshot().iter().collect::<BTreeSet<_>>(), expected.clone());
            prop_assert_eq!(map.count(), expected.len() as u64);
            prop_assert!((0..map.block_count()).all(|b| map.is_marked(b) == expected.contains(&b)));
        }
    }
}
