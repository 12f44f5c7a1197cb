//! Fuzzing (issue 18) with proptest: the safetensors header parser, the EDM2 list syntax,
//! every JSON body and query the API parses, and the statistics readers (pickle, `.npy`,
//! `.npz`), on random, structured and mutated inputs. Each must answer (Ok or a clear error; a
//! 4xx for HTTP, never a 500 or a panic) and allocate within its stated cap: a counting global
//! allocator records the largest single allocation and the peak of live bytes.
//!
//! CI runs the default number of cases per target (`FUZZ_CASES`, 2 000); the benchmark
//! figure in BENCHMARKS.md comes from `FUZZ_CASES=200000 cargo test --release --test fuzz`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;

use axum::http::StatusCode;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use hindsight::format::{read_header, MAX_HEADER_BYTES};
use hindsight::phema::{parse_float_list_at_most, parse_sigma_rel_list, MAX_LIST_VALUES};

mod common;
use common::http::{get, post_json_text, send};
use common::snapshot::SnapshotBuilder;

/// Counts, for a thread while its `TRACKING` is on, the largest single allocation and the
/// peak of live bytes (allocations add, deallocations subtract; memory freed that was taken
/// before tracking began makes the count go below zero, never the peak). The tests of this
/// file run in parallel threads; each measures only its own allocations.
struct Counting;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

/// Records `added` bytes allocated (of which the largest single block is `block`) and
/// `removed` freed.
fn note(block: usize, added: usize, removed: usize) {
    let _ = TRACKING.try_with(|t| {
        if t.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(block)));
            let _ = LIVE.try_with(|live| {
                let now = live.get() + added as isize - removed as isize;
                live.set(now);
                let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
            });
        }
    });
}

// SAFETY: defers every call to the system allocator; only updates thread-local counters
// (const-initialised, no destructors, so they never allocate).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size(), layout.size(), 0);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(0, 0, layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size, new_size, layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What a closure allocated: its largest single allocation and its peak of live bytes.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    largest: usize,
    peak: usize,
}

impl Usage {
    fn max(self, other: Usage) -> Usage {
        Usage {
            largest: self.largest.max(other.largest),
            peak: self.peak.max(other.peak),
        }
    }
}

/// Runs `f` and returns its result with what it allocated (its result is dropped inside the
/// measurement when `T` is `()`, so drops count too).
fn measure<T>(f: impl FnOnce() -> T) -> (T, Usage) {
    LARGEST.with(|l| l.set(0));
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    TRACKING.with(|t| t.set(true));
    let out = f();
    TRACKING.with(|t| t.set(false));
    let usage = Usage {
        largest: LARGEST.with(|l| l.get()),
        peak: PEAK.with(|p| p.get()).max(0) as usize,
    };
    (out, usage)
}

/// Runs `f` and returns its result with the largest single allocation it made.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let (out, usage) = measure(f);
    (out, usage.largest)
}

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })
}

/// A valid safetensors file with a few tensors and metadata.
fn valid_file() -> Vec<u8> {
    SnapshotBuilder::new()
        .raw("net.a", "F32", &[2, 3], (0..24).collect())
        .raw("net.b", "F16", &[4], vec![0x3c; 8])
        .meta("nimg", 1000)
        .meta("sigma_rel", "0.05")
        .bytes()
}

/// A mutation of `base`: flipped bytes, a changed length prefix, text spliced into the
/// JSON header, or a truncation.
fn mutated(base: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let n = base.len();
    let splice = prop::sample::select(vec![
        "\"shape\":[18446744073709551615,18446744073709551615]",
        "\"data_offsets\":[0,18446744073709551615]",
        "\"dtype\":\"F64\"",
        "\"__metadata__\":{\"nimg\":\"9223372036854775808\"}",
        "{}",
        "[",
        "\u{0}",
        "\"shape\":[-1]",
        "\"data_offsets\":[24,0]",
        "1e999",
    ]);
    (
        prop::collection::vec((0..n, any::<u8>()), 0..8),
        prop::option::of(any::<u64>()),
        prop::option::of((8..n, splice)),
        prop::option::of(0..n),
    )
        .prop_map(move |(flips, len, insert, cut)| {
            let mut b = base.clone();
            for (i, v) in flips {
                b[i] ^= v;
            }
            if let Some(l) = len {
                b[..8].copy_from_slice(&l.to_le_bytes());
            }
            if let Some((at, text)) = insert {
                let at = at.min(b.len());
                b.splice(at..at, text.bytes());
            }
            if let Some(c) = cut {
                b.truncate(c.max(1));
            }
            b
        })
}

#[test]
fn safetensors_header_parser_never_panics_and_stays_within_its_cap() {
    let base = valid_file();
    let strategy = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        mutated(base.clone()),
    ];
    let refused = std::cell::Cell::new(0u32);
    let largest_seen = std::cell::Cell::new(0usize);
    runner()
        .run(&strategy, |bytes| {
            let (result, largest) =
                largest_allocation(|| read_header(&mut &bytes[..], bytes.len() as u64, "fuzz"));
            largest_seen.set(largest_seen.get().max(largest));
            // The header is read into one buffer of at most its stated length: never more
            // than the file, never more than MAX_HEADER_BYTES.
            prop_assert!(
                largest as u64 <= (bytes.len() as u64).min(MAX_HEADER_BYTES) + 4096,
                "allocated {largest} bytes for a {}-byte file",
                bytes.len()
            );
            if result.is_err() {
                refused.set(refused.get() + 1);
            }
            Ok(())
        })
        .unwrap();
    let (refused, largest_seen) = (refused.get(), largest_seen.get());
    assert!(
        refused < cases(),
        "every input was refused: the fuzzer never reaches a good file"
    );
    assert!(
        refused > 0,
        "no input was refused: the fuzzer is not reaching the checks"
    );
    eprintln!(
        "safetensors header: {} cases, {refused} refused, largest allocation {largest_seen} B",
        cases()
    );
}

#[test]
fn list_syntax_never_panics_and_never_allocates_past_its_cap() {
    let piece = prop_oneof![
        "[0-9]{1,3}(\\.[0-9]{0,3})?(e-?[0-9]{1,3})?",
        Just("...".to_owned()),
        Just("1e-300".to_owned()),
        Just("1e300".to_owned()),
        Just("NaN".to_owned()),
        Just("inf".to_owned()),
        Just("-0".to_owned()),
        Just(" ".to_owned()),
        ".{0,4}",
    ];
    let strategy = prop::collection::vec(piece, 0..8).prop_map(|p| p.join(","));
    let cap = 64;
    runner()
        .run(&strategy, |text| {
            let (result, largest) = largest_allocation(|| parse_float_list_at_most(&text, cap));
            if let Ok(values) = &result {
                prop_assert!(values.len() <= cap, "{text:?} gave {} values", values.len());
            }
            // The values themselves (≤ cap f64) and the error message are all it allocates.
            prop_assert!(largest <= 64 * 1024, "{text:?}: allocated {largest} bytes");
            let _ = parse_sigma_rel_list(&text);
            Ok(())
        })
        .unwrap();
    // The default cap on hostile lists, without allocating them.
    for text in ["1,2,...,1e15", "1e-300,2e-300,...,1e300", "0,1e-300,...,1"] {
        let (result, largest) =
            largest_allocation(|| parse_float_list_at_most(text, MAX_LIST_VALUES));
        assert!(result.is_err(), "{text}");
        assert!(largest < 64 * 1024, "{text}: {largest}");
    }
}

#[test]
fn statistics_file_parsers_never_panic_and_stay_within_their_caps() {
    // .npy (inside pytorch-fid's .npz) and pickle (EDM2's .pkl), as POST /references reads
    // them: random bytes, and mutations of a valid .npy and of pickle-looking prefixes.
    let mut npy = Vec::new();
    hindsight::metrics::npy::write_f64(&mut npy, &[3, 3], &[0.5; 9]).unwrap();
    let pickle_start = prop::sample::select(vec![
        b"\x80\x04\x95".to_vec(),
        b"\x80\x02}q\x00(X\x02\x00\x00\x00mu".to_vec(),
        b"\x80\x04]\x94(K\x01K\x02e.".to_vec(),
        b"\x80\x04\x95\xff\xff\xff\xff\xff\xff\xff\x7f".to_vec(),
        b"(((((((((((((((((((((((((((((((((((((((((((((((((".to_vec(),
    ]);
    let strategy = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        mutated(npy),
        (pickle_start, prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(mut a, b)| {
            a.extend(b);
            a
        }),
    ];
    let seen = Cell::new(Usage::default());
    runner()
        .run(&strategy, |bytes| {
            let ((), usage) = measure(|| {
                let _ = hindsight::metrics::npy::read_f64(&bytes, "fuzz");
                let _ = hindsight::metrics::npy::read_f32(&bytes, "fuzz");
                let _ = hindsight::metrics::pickle::parse(&bytes, "fuzz");
            });
            seen.set(seen.get().max(usage));
            // Nothing bigger than the input itself, give or take fixed buffers.
            prop_assert!(
                usage.largest <= 8 * bytes.len() + 64 * 1024,
                "allocated {} bytes at once for {} input bytes",
                usage.largest,
                bytes.len()
            );
            prop_assert!(
                usage.peak <= 64 * bytes.len() + 256 * 1024,
                "{} live bytes at the peak for {} input bytes",
                usage.peak,
                bytes.len()
            );
            Ok(())
        })
        .unwrap();
    let seen = seen.get();
    eprintln!(
        "npy/pickle bytes: {} cases, largest allocation {} B, peak live {} B",
        cases(),
        seen.largest,
        seen.peak
    );
}

/// The statistics fixtures NumPy wrote (tests/fixtures/stats), by name.
fn stats_fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/stats")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Pickle opcode runs that stress the reader's budgets: nesting (MARK, EMPTY_*, TUPLEn,
/// APPEND, BINPERSID, REDUCE), memo storms (BINPUT/BINGET/MEMOIZE/DUP), payloads, protocol-2
/// bytes, out-of-band buffers.
fn pickle_piece() -> impl Strategy<Value = Vec<u8>> {
    prop::sample::select(vec![
        b"(".to_vec(),
        b"]".to_vec(),
        b")".to_vec(),
        b"}".to_vec(),
        b"\x8f".to_vec(),
        b"\x85".to_vec(),
        b"\x86".to_vec(),
        b"\x87".to_vec(),
        b"a".to_vec(),
        b"e".to_vec(),
        b"l".to_vec(),
        b"t".to_vec(),
        b"u".to_vec(),
        b"s".to_vec(),
        b"d".to_vec(),
        b"\x90".to_vec(),
        b"\x91".to_vec(),
        b"h\x00".to_vec(),
        b"h\x01".to_vec(),
        b"q\x00".to_vec(),
        b"q\x01".to_vec(),
        b"j\x00\x00\x00\x00".to_vec(),
        b"r\xff\xff\xff\xff".to_vec(),
        b"\x94".to_vec(),
        b"2".to_vec(),
        b"0".to_vec(),
        b"1".to_vec(),
        b"Q".to_vec(),
        b"R".to_vec(),
        b"\x81".to_vec(),
        b"b".to_vec(),
        b"N".to_vec(),
        b"K\x01".to_vec(),
        b"\x88".to_vec(),
        b"\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f".to_vec(),
        b"G?\xf0\x00\x00\x00\x00\x00\x00".to_vec(),
        b"C\x04abcd".to_vec(),
        b"B\x00\x01\x00\x00".to_vec(),
        b"\x8c\x02mu".to_vec(),
        b"\x8c\x03fid".to_vec(),
        b"\x8c\x05numpy\x8c\x05dtype\x93".to_vec(),
        b"cnumpy._core.multiarray\n_reconstruct\n".to_vec(),
        b"cnumpy._core.numeric\n_frombuffer\n".to_vec(),
        b"c_codecs\nencode\n".to_vec(),
        b"X\x02\x00\x00\x00\xc3\xa9".to_vec(),
        b"X\x06\x00\x00\x00latin1".to_vec(),
        b"\x96\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\xf0?".to_vec(),
        b"\x95\x00\x00\x00\x00\x00\x00\x00\x00".to_vec(),
        b"\x97".to_vec(),
        b".".to_vec(),
        // Pushes that are consumed again: values without stack growth.
        b"N0".to_vec(),
        b"]q\x00".to_vec(),
        b"h\x00a".to_vec(),
    ])
}

/// A pickle of runs of pieces, each repeated a few times or thousands (deep nesting, memo
/// storms).
fn structured_pickle() -> impl Strategy<Value = Vec<u8>> {
    let count = prop_oneof![3 => 1usize..4, 1 => 500usize..5000];
    (
        prop::sample::select(vec![2u8, 3, 4, 5]),
        prop::collection::vec((pickle_piece(), count), 1..10),
    )
        .prop_map(|(protocol, runs)| {
            let mut out = vec![0x80, protocol];
            for (piece, n) in runs {
                for _ in 0..n {
                    out.extend_from_slice(&piece);
                }
            }
            out.push(b'.');
            out
        })
}

/// A mutation of `base`: flipped bytes, a 4-byte little-endian value written somewhere (a
/// length prefix, a memo key), a run of pieces spliced in, or a truncation.
fn mutated_pickle(base: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let n = base.len();
    (
        prop::collection::vec((0..n, any::<u8>()), 0..6),
        prop::option::of((0..n, prop_oneof![any::<u32>(), 0u32..4096, Just(u32::MAX)])),
        prop::option::of((0..n, pickle_piece(), prop_oneof![1usize..4, 500usize..3000])),
        prop::option::of(0..n),
    )
        .prop_map(move |(flips, word, splice, cut)| {
            let mut b = base.clone();
            for (i, v) in flips {
                b[i] ^= v;
            }
            if let Some((at, w)) = word {
                let at = at.min(b.len().saturating_sub(4));
                b[at..at + 4].copy_from_slice(&w.to_le_bytes());
            }
            if let Some((at, piece, count)) = splice {
                let run: Vec<u8> = piece
                    .iter()
                    .copied()
                    .cycle()
                    .take(piece.len() * count)
                    .collect();
                b.splice(at..at, run);
            }
            if let Some(c) = cut {
                b.truncate(c.max(1));
            }
            b
        })
}

/// Parses `bytes` as a pickle and reads it the ways callers do (a bounded look at its entries
/// as NumPy arrays, then as statistics); the parse's error, if any.
fn read_pickle_as_callers_do(bytes: &[u8]) -> Result<(), String> {
    use hindsight::metrics::{npy, pickle, FeatureStats};
    let parsed = pickle::parse(bytes, "fuzz").map_err(|e| e.to_string())?;
    let root = parsed.root();
    let _ = root.describe();
    let _ = npy::pickled_f64(root, "root");
    if let Some(entries) = root.entries() {
        for (_, v) in entries.iter().take(16) {
            let _ = npy::pickled_f64(v, "v");
            if let Some(inner) = v.entries() {
                for (_, w) in inner.iter().take(16) {
                    let _ = npy::pickled_f64(w, "w");
                }
            }
        }
    }
    drop(parsed);
    let _ = FeatureStats::parse(bytes, "fuzz");
    Ok(())
}

/// The budget an error names (`depth` for "(the pickle depth limit)"), or `other`.
fn limit_named(error: &str) -> String {
    error
        .split("(the pickle ")
        .nth(1)
        .and_then(|rest| rest.split(" limit)").next())
        .unwrap_or("other")
        .to_owned()
}

/// Budgets small enough for fuzzed inputs to reach each one.
const TIGHT: hindsight::metrics::pickle::Limits = hindsight::metrics::pickle::Limits {
    max_bytes: 64 * 1024,
    max_depth: 50,
    max_values: 4096,
    max_stack: 512,
    max_memo_entries: 64,
    max_decoded_bytes: 4096,
};

#[test]
fn pickle_reader_never_panics_and_stays_within_its_caps() {
    use hindsight::metrics::pickle;
    let bases: Vec<Vec<u8>> = [
        "edm2_p2.pkl",
        "edm2_p3.pkl",
        "edm2_p4.pkl",
        "edm2_p5.pkl",
        "edm2_p5_f32_fortran.pkl",
        "arrays_p2.pkl",
        "arrays_p5_numpy1.pkl",
    ]
    .iter()
    .map(|n| stats_fixture(n))
    .collect();
    let strategy = prop_oneof![
        2 => structured_pickle(),
        3 => prop::sample::select(bases).prop_flat_map(mutated_pickle),
        1 => prop::collection::vec(any::<u8>(), 0..256).prop_map(|mut b| {
            b.splice(0..0, [0x80, 2]);
            b
        }),
        // Storms: one list memoised, then thousands of the same step (references appended,
        // values pushed and popped, memo entries, nesting).
        1 => (
            prop::sample::select(vec![
                &b"h\x00a"[..],
                b"N0",
                b"Na",
                b"\x94",
                b"h\x00\x85",
                b"]",
                b"(",
                b"h\x00Q",
                b"C\x04abcd0",
            ]),
            1000usize..20_000,
        )
            .prop_map(|(step, n)| {
                let mut b = b"\x80\x04]\x94".to_vec();
                for _ in 0..n {
                    b.extend_from_slice(step);
                }
                b.push(b'.');
                b
            }),
    ];
    let (parsed, refused, seen, largest_input) = (
        Cell::new(0u32),
        Cell::new(0u32),
        Cell::new(Usage::default()),
        Cell::new(0usize),
    );
    let limits: std::cell::RefCell<BTreeMap<String, u32>> = Default::default();
    let tight_limits: std::cell::RefCell<BTreeMap<String, u32>> = Default::default();
    let tight_seen = Cell::new(Usage::default());
    let started = std::time::Instant::now();
    runner()
        .run(&strategy, |bytes| {
            let (result, usage) = measure(|| read_pickle_as_callers_do(&bytes));
            seen.set(seen.get().max(usage));
            largest_input.set(largest_input.get().max(bytes.len()));
            match result {
                Ok(()) => parsed.set(parsed.get() + 1),
                Err(e) => {
                    refused.set(refused.get() + 1);
                    *limits.borrow_mut().entry(limit_named(&e)).or_insert(0) += 1;
                }
            }
            // The arena holds at most one node (≤ 40 bytes) and one slot per input byte, in
            // vectors that at most double; the memo and the decoded arrays are smaller.
            prop_assert!(
                usage.largest <= 96 * bytes.len() + 64 * 1024,
                "allocated {} bytes at once for {} input bytes",
                usage.largest,
                bytes.len()
            );
            prop_assert!(
                usage.peak <= 256 * bytes.len() + 256 * 1024,
                "{} live bytes at the peak for {} input bytes",
                usage.peak,
                bytes.len()
            );
            // Under tight budgets every limit is within reach of small inputs, and what the
            // parse holds is bounded by the budgets, whatever the input's size.
            let (result, usage) =
                measure(|| pickle::parse_with(&bytes, "fuzz", &TIGHT).map(|p| p.len()));
            tight_seen.set(tight_seen.get().max(usage));
            if let Err(e) = result {
                *tight_limits
                    .borrow_mut()
                    .entry(limit_named(&e.to_string()))
                    .or_insert(0) += 1;
            }
            prop_assert!(
                usage.peak <= 1 << 20,
                "{} live bytes at the peak under tight budgets",
                usage.peak
            );
            Ok(())
        })
        .unwrap();
    let (seen, tight_seen) = (seen.get(), tight_seen.get());
    let tight_limits = tight_limits.into_inner();
    // (With a thousand cases or more, each budget is reached many times over.)
    for limit in ["depth", "value", "stack", "memo", "decoded-size", "size"] {
        assert!(
            cases() < 1000 || tight_limits.contains_key(limit),
            "no input reached the {limit} limit under tight budgets: {tight_limits:?}"
        );
    }
    eprintln!(
        "pickle under tight budgets: refused by limit {tight_limits:?}; largest allocation {} B, \
         peak live {} B",
        tight_seen.largest, tight_seen.peak
    );
    assert!(
        parsed.get() > 0,
        "no pickle parsed: the fuzzer never reaches a good one"
    );
    let limits = limits.into_inner();
    assert!(
        cases() < 1000 || limits.contains_key("depth"),
        "no input reached the depth limit: {limits:?}"
    );
    eprintln!(
        "pickle: {} cases in {:.1} s, {} parsed, {} refused (by limit: {limits:?}), inputs up \
         to {} B, largest allocation {} B, peak live {} B",
        cases(),
        started.elapsed().as_secs_f64(),
        parsed.get(),
        refused.get(),
        largest_input.get(),
        seen.largest,
        seen.peak
    );
}

/// A ZIP of `entries` (name, bytes, deflated?), written in one pass; big entries are written
/// a MiB at a time, so a bomb is never held whole.
/// Writes an entry's bytes.
type WriteEntry<'a> = &'a dyn Fn(&mut dyn std::io::Write);

fn zip_of(entries: &[(&str, WriteEntry, bool)]) -> Vec<u8> {
    use zip::write::SimpleFileOptions;
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, write, deflate) in entries {
        let method = if *deflate {
            zip::CompressionMethod::Deflated
        } else {
            zip::CompressionMethod::Stored
        };
        let options = SimpleFileOptions::default()
            .compression_method(method)
            .large_file(true);
        zip.start_file(*name, options).unwrap();
        write(&mut zip);
    }
    zip.finish().unwrap().into_inner()
}

/// Writes `n` MiB of zeros.
fn zeros(n: usize) -> impl Fn(&mut dyn std::io::Write) {
    move |w: &mut dyn std::io::Write| {
        let block = vec![0u8; 1 << 20];
        for _ in 0..n {
            w.write_all(&block).unwrap();
        }
    }
}

fn npy_f64(shape: &[usize], values: &[f64]) -> Vec<u8> {
    let mut out = Vec::new();
    hindsight::metrics::npy::write_f64(&mut out, shape, values).unwrap();
    out
}

/// A mutation of an archive aimed at its bookkeeping: the sizes, counts and offsets its
/// local headers, central directory and end record declare, besides flips and truncation.
fn mutated_archive(base: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    // Where each record's fields start: local header (PK\3\4: sizes at +18, +22), central
    // header (PK\1\2: sizes at +20, +24, local offset at +42), end record (PK\5\6: counts
    // at +8, +10, size and offset at +12, +16).
    let mut fields = Vec::new();
    for (i, w) in base.windows(4).enumerate() {
        match w {
            b"PK\x03\x04" => fields.extend([i + 18, i + 22]),
            b"PK\x01\x02" => fields.extend([i + 20, i + 24, i + 42]),
            b"PK\x05\x06" => fields.extend([i + 8, i + 12, i + 16]),
            _ => {}
        }
    }
    fields.retain(|&f| f + 4 <= base.len());
    let n = base.len();
    let value = prop_oneof![
        Just(u32::MAX),
        Just(0u32),
        Just(0xffff_u32),
        0u32..(1 << 20),
        any::<u32>()
    ];
    (
        prop::collection::vec((prop::sample::select(fields), value), 0..4),
        prop::collection::vec((0..n, any::<u8>()), 0..4),
        prop::option::of(0..n),
    )
        .prop_map(move |(sets, flips, cut)| {
            let mut b = base.clone();
            for (at, v) in sets {
                b[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            for (i, v) in flips {
                b[i] ^= v;
            }
            if let Some(c) = cut {
                b.truncate(c.max(1));
            }
            b
        })
}

#[test]
fn statistics_reader_never_panics_and_stays_within_its_caps() {
    use hindsight::metrics::FeatureStats;
    let mu = npy_f64(&[4], &[1.0, 2.0, 3.0, 4.0]);
    let sigma = npy_f64(
        &[4, 4],
        &[
            1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0,
        ],
    );
    let (mu_w, sigma_w) = (mu.clone(), sigma.clone());
    let write_mu = move |w: &mut dyn std::io::Write| w.write_all(&mu_w).unwrap();
    let write_sigma = move |w: &mut dyn std::io::Write| w.write_all(&sigma_w).unwrap();
    let bases = vec![
        stats_fixture("ref_fortran.npz"),
        stats_fixture("ref_compressed.npz"),
        zip_of(&[
            ("mu.npy", &write_mu, true),
            ("sigma.npy", &write_sigma, false),
        ]),
        // Bombs: a 64 MiB mu.npy, and a valid 4-d mu beside a 64 MiB sigma.npy.
        zip_of(&[
            ("mu.npy", &zeros(64), true),
            ("sigma.npy", &write_sigma, true),
        ]),
        zip_of(&[("mu.npy", &write_mu, true), ("sigma.npy", &zeros(64), true)]),
    ];
    let others = vec![
        stats_fixture("ref_dict.npy"),
        stats_fixture("plain_array.npy"),
        stats_fixture("edm2_p5.pkl"),
    ];
    let strategy = prop_oneof![
        4 => prop::sample::select(bases).prop_flat_map(mutated_archive),
        2 => prop::sample::select(others).prop_flat_map(mutated_pickle),
        1 => prop::collection::vec(any::<u8>(), 0..256).prop_map(|mut b| {
            b.splice(0..0, *b"PK\x03\x04");
            b
        }),
    ];
    let (read, refused, seen, largest_input) = (
        Cell::new(0u32),
        Cell::new(0u32),
        Cell::new(Usage::default()),
        Cell::new(0usize),
    );
    let reasons: std::cell::RefCell<BTreeMap<&str, u32>> = Default::default();
    let started = std::time::Instant::now();
    runner()
        .run(&strategy, |bytes| {
            let (result, usage) = measure(|| FeatureStats::parse(&bytes, "fuzz").map(|_| ()));
            seen.set(seen.get().max(usage));
            largest_input.set(largest_input.get().max(bytes.len()));
            match result {
                Ok(()) => read.set(read.get() + 1),
                Err(e) => {
                    refused.set(refused.get() + 1);
                    let e = e.to_string();
                    let why = [
                        "(the .npz entry size limit)",
                        "(the .npz entry limit)",
                        "(the statistics dimension limit)",
                        "not an .npz (a readable ZIP archive)",
                        "does not inflate",
                        "not a pytorch-fid .npz",
                        "not a readable .npy",
                        "not a readable pickle",
                    ]
                    .into_iter()
                    .find(|w| e.contains(w))
                    .unwrap_or("other");
                    *reasons.borrow_mut().entry(why).or_insert(0) += 1;
                }
            }
            // Entries inflate through caps: mu at most 8192 float64 plus a header (75 548
            // bytes), sigma at most d² float64 for mu's d; the archive's directory is bounded by
            // the input.
            prop_assert!(
                usage.largest <= 4 * bytes.len() + 512 * 1024,
                "allocated {} bytes at once for {} input bytes",
                usage.largest,
                bytes.len()
            );
            prop_assert!(
                usage.peak <= 8 * bytes.len() + 2 * 1024 * 1024,
                "{} live bytes at the peak for {} input bytes",
                usage.peak,
                bytes.len()
            );
            Ok(())
        })
        .unwrap();
    let seen = seen.get();
    assert!(
        read.get() > 0,
        "no statistics read: the fuzzer never reaches a good file"
    );
    let reasons = reasons.into_inner();
    assert!(
        reasons.contains_key("(the .npz entry size limit)"),
        "no archive reached the entry size limit: {reasons:?}"
    );
    eprintln!(
        "statistics (.npz/.npy/.pkl): {} cases in {:.1} s, {} read, {} refused ({reasons:?}), \
         inputs up to {} B, largest allocation {} B, peak live {} B",
        cases(),
        started.elapsed().as_secs_f64(),
        read.get(),
        refused.get(),
        largest_input.get(),
        seen.largest,
        seen.peak
    );
}

/// Issue "Reliability 2": a 1 MB `.npz` whose mu.npy inflates to 1 GiB took 1.07 GB before
/// it was refused; now it is refused after inflating one MAX_DIMS mu's worth.
#[test]
fn a_gibibyte_zip_bomb_is_refused_in_small_memory() {
    use hindsight::metrics::FeatureStats;
    let sigma = npy_f64(&[1, 1], &[1.0]);
    let write_sigma = move |w: &mut dyn std::io::Write| w.write_all(&sigma).unwrap();
    let bomb = zip_of(&[
        ("mu.npy", &zeros(1024), true),
        ("sigma.npy", &write_sigma, true),
    ]);
    let started = std::time::Instant::now();
    let (result, usage) = measure(|| FeatureStats::parse(&bomb, "bomb.npz").map(|_| ()));
    let err = result.unwrap_err().to_string();
    assert!(err.contains("(the .npz entry size limit)"), "{err}");
    assert!(usage.peak < 1 << 20, "{usage:?}");
    eprintln!(
        "zip bomb: {} B archive of a 1 GiB mu.npy refused in {:.3} s; largest allocation {} B, \
         peak live {} B",
        bomb.len(),
        started.elapsed().as_secs_f64(),
        usage.largest,
        usage.peak
    );
}

/// Issue "Reliability 2"'s pickles: each aborted the process (a stack overflow while
/// dropping) or took gigabytes of memo copies. Now each is refused, or read, in memory of
/// the order of its own size.
#[test]
fn the_reported_pickles_are_refused_or_read_in_small_memory() {
    use hindsight::metrics::pickle;
    let repeat = |head: &[u8], run: &[u8], n: usize, tail: &[u8]| -> Vec<u8> {
        let mut b = head.to_vec();
        for _ in 0..n {
            b.extend_from_slice(run);
        }
        b.extend_from_slice(tail);
        b
    };
    let mut marks = repeat(b"\x80\x02", b"(", 100_000, b"");
    marks.extend(std::iter::repeat_n(b'l', 100_000));
    marks.push(b'.');
    let mut reduces = repeat(b"\x80\x02cbuiltins\nlist\nq\x00", b"h\x00", 99_999, b")");
    reduces.extend(repeat(b"", b"\x85R", 100_000, b"."));
    let mut memo_bytes = b"\x80\x03B\x00\x00\x10\x00".to_vec();
    memo_bytes.extend(std::iter::repeat_n(0u8, 1 << 20));
    memo_bytes.extend(repeat(b"q\x00", b"h\x00", 2000, b"\x87."));
    let cases: [(&str, Vec<u8>, bool); 6] = [
        (
            "50 000 TUPLE1",
            repeat(b"\x80\x02)", b"\x85", 50_000, b"."),
            false,
        ),
        ("100 000 MARK/LIST", marks, false),
        ("100 000 REDUCE", reduces, false),
        (
            "1 000 000 BINPERSID",
            repeat(b"\x80\x02N", b"Q", 1_000_000, b"."),
            false,
        ),
        ("1 MiB BINBYTES, 2000 BINGETs", memo_bytes, true),
        (
            "lists of memo references, 2^400 paths",
            repeat(b"\x80\x02]q\x00", b"(h\x00h\x00lq\x00", 400, b"."),
            true,
        ),
    ];
    for (name, bytes, parses) in cases {
        let (result, usage) = measure(|| pickle::parse(&bytes, "fuzz").map(|p| p.len()));
        match (&result, parses) {
            (Ok(_), true) => {}
            (Err(e), false) => assert!(
                e.to_string().contains("(the pickle depth limit)"),
                "{name}: {e}"
            ),
            _ => panic!("{name}: {result:?}"),
        }
        assert!(
            usage.peak <= 4 * bytes.len() + (1 << 20),
            "{name}: {usage:?} for {} bytes",
            bytes.len()
        );
        eprintln!(
            "{name}: {} B pickle {}; largest allocation {} B, peak live {} B",
            bytes.len(),
            if parses { "read" } else { "refused" },
            usage.largest,
            usage.peak
        );
    }
}

/// A random JSON value, nested a few levels, biased towards the API's field names.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let key = prop_oneof![
        Just("run".to_owned()),
        Just("sigma_rel".to_owned()),
        Just("gamma".to_owned()),
        Just("nimg".to_owned()),
        Just("dtype".to_owned()),
        Just("wait_secs".to_owned()),
        Just("targets".to_owned()),
        Just("sigma_rels".to_owned()),
        Just("nimgs".to_owned()),
        Just("reference".to_owned()),
        Just("num_images".to_owned()),
        Just("seed_sets".to_owned()),
        Just("sampler".to_owned()),
        Just("metrics".to_owned()),
        Just("batch".to_owned()),
        "[a-z_]{1,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop::sample::select(vec![
            "r",
            "",
            "0.05",
            "0.01,0.02,...,0.2",
            "1,2,...,1e15",
            "1e-300,2e-300,...,1e300",
            "f16",
            "bf16",
            "fid",
            "kid",
            "9223372036854775808",
            "0.28867513459481287",
            "NaN",
        ])
        .prop_map(|s| Value::String(s.to_owned())),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A request of the right shape with hostile values: reaches the solver and the sweep
/// planner, not only the parser.
fn shaped_request() -> impl Strategy<Value = (&'static str, String)> {
    use serde_json::{json, Value};
    let number = prop_oneof![
        1 => any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        8 => (0.03..0.25f64).prop_map(Value::from),
        2 => Just(json!("0.05,0.1")),
        1 => any::<u64>().prop_map(Value::from),
        1 => Just(json!(0.28867513459481287)),
        1 => Just(json!(1e-300)),
        1 => Just(json!("0.01,0.02,...,0.2")),
        1 => Just(json!("1e-300,2e-300,...,1e300")),
        1 => Just(json!([0.05, 0.1, -1])),
        1 => Just(json!(9223372036854775808u64)),
    ];
    let nimg = prop_oneof![
        6 => Just(Value::Null),
        3 => (0u64..2_000_000).prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => (0u64..3_000_000).prop_map(Value::from),
        1 => Just(json!(-1)),
        1 => Just(json!(1.5)),
        1 => Just(json!([1000, 2000000])),
    ];
    let run = prop::sample::select(vec!["r", "r", "r", "r", "nope", "", " r"]);
    let dtype = prop::sample::select(vec!["f32", "f32", "f16", "bf16", "f64", ""]);
    (run, number, nimg, dtype, any::<bool>(), 0u32..3).prop_map(
        |(run, width, nimg, dtype, gamma, kind)| {
            let key = if gamma { "gamma" } else { "sigma_rel" };
            // γ of the same EMAs is two orders of magnitude larger than σ_rel.
            let width = match (&width, gamma) {
                (Value::Number(n), true) => json!(n.as_f64().unwrap_or(0.0) * 60.0),
                _ => width,
            };
            match kind {
                0 => ("/reconstruct", json!({"run": run, key: width, "nimg": nimg, "dtype": dtype, "wait_secs": 0}).to_string()),
                1 => ("/reconstruct", json!({"run": run, key: width, "nimg": nimg, "clamp_out_of_range": gamma, "wait_secs": 0}).to_string()),
                _ => ("/sweeps", json!({"run": run, "sigma_rels": width, "nimgs": nimg, "reference": "none", "num_images": nimg}).to_string()),
            }
        },
    )
}

#[test]
fn every_json_body_and_query_gets_an_answer_never_a_500() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (app, routes) = rt.block_on(async {
        let data = hindsight::app::DataDir::open(dir.path()).await.unwrap();
        // A run with two snapshots, so that valid-looking requests reach the solver.
        let run = data
            .db
            .create_run("r", "", &serde_json::json!({}))
            .await
            .unwrap();
        for (i, sigma) in [(1u64, 0.05), (2, 0.10)] {
            let values: Vec<f32> = (0..16).map(|k| k as f32 * sigma as f32).collect();
            let path = dir.path().join(format!("s{i}.safetensors"));
            SnapshotBuilder::new()
                .f32("w", &[16], &values)
                .meta("nimg", i * 1_000_000)
                .meta("sigma_rel", sigma)
                .write(&path);
            hindsight::ingest::ingest_file(
                &data.db,
                &data.store,
                &run,
                &path,
                Default::default(),
                Default::default(),
                |_| {},
            )
            .await
            .unwrap();
        }
        let config = hindsight::server::ServerConfig {
            sweep_worker: None,
            reconstruct_wait: std::time::Duration::from_secs(5),
            ..Default::default()
        };
        let app = hindsight::server::app(hindsight::server::AppState::new(data, config));
        (app, ["/reconstruct", "/sweeps"])
    });
    let strategy = prop_oneof![
        2 => (
            prop::sample::select(routes.to_vec()),
            prop_oneof![
                3 => json_value().prop_map(|v| v.to_string()),
                1 => ".{0,40}",
                1 => json_value().prop_map(|v| format!("{v}xyz")),
            ],
        ),
        3 => shaped_request(),
    ];
    let statuses: std::cell::RefCell<BTreeMap<u16, u32>> = Default::default();
    let config = Config {
        cases: (cases() / 4).max(100),
        failure_persistence: None,
        ..Config::default()
    };
    TestRunner::new(config)
        .run(&strategy, |(route, body)| {
            let request = post_json_text(route, body.clone());
            let (status, _, bytes) = rt.block_on(send(&app, request));
            let text = String::from_utf8_lossy(&bytes).to_string();
            *statuses.borrow_mut().entry(status.as_u16()).or_default() += 1;
            prop_assert!(
                status != StatusCode::INTERNAL_SERVER_ERROR,
                "{route} {body:?}: {status} {text}"
            );
            if !status.is_success() {
                let v: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| TestCaseError::fail(format!("{route} {body:?}: {e}: {text}")))?;
                prop_assert!(v["error"]["code"].is_string(), "{text}");
            }
            Ok(())
        })
        .unwrap();
    // Queries: the preview's parameters.
    let query = (".{0,12}", ".{0,12}", ".{0,12}");
    TestRunner::new(Config {
        cases: (cases() / 4).max(100),
        failure_persistence: None,
        ..Config::default()
    })
    .run(&query, |(s, g, n)| {
        let enc = |t: &str| t.bytes().map(|b| format!("%{b:02X}")).collect::<String>();
        let uri = format!(
            "/runs/r/preview?sigma_rel={}&gamma={}&nimg={}",
            enc(&s),
            enc(&g),
            enc(&n)
        );
        let (status, _, _) = rt.block_on(send(&app, get(&uri)));
        prop_assert!(status != StatusCode::INTERNAL_SERVER_ERROR, "{uri}");
        Ok(())
    })
    .unwrap();
    let statuses = statuses.into_inner();
    eprintln!("JSON bodies: statuses {statuses:?}");
    assert!(statuses.keys().any(|s| *s == 400), "no request was refused");
    assert!(
        statuses.keys().any(|s| *s < 300),
        "no request was accepted: the fuzzer never reaches the solver"
    );
}
