//! The dashboard's pasted key import (CSV with a header naming `raw_key`, or one key per line):
//! the text is whatever a user pastes.
//!
//! Invariants: one line number per row; line numbers increase and point into the text; in
//! line mode every non-blank line is exactly one row, at its own line number.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok((csv, lines)) = apipool_server::dashboard::fuzz_parse_import(text) else {
        return;
    };
    if csv {
        // Line breaks as the CSV reader sees them: "\n", "\r\n" and a lone "\r".
        let b = text.as_bytes();
        let last_line = (0..b.len())
            .filter(|&i| b[i] == b'\n' || (b[i] == b'\r' && b.get(i + 1) != Some(&b'\n')))
            .count()
            + 1;
        assert!(
            lines.windows(2).all(|w| w[0] < w[1]),
            "CSV line numbers increase: {lines:?}"
        );
        assert!(
            lines.iter().all(|&l| (1..=last_line).contains(&l)),
            "CSV line numbers {lines:?} within 1..={last_line}"
        );
    } else {
        let expected: Vec<usize> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, _)| i + 1)
            .collect();
        assert_eq!(lines, expected, "one row per non-blank line");
    }
});
