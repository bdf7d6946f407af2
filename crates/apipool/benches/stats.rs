//! Stats collector benchmarks (being written).
fn main() {}
