//! The `apipool` command line.
fn main() {
    println!("apipool {}", env!("CARGO_PKG_VERSION"));
}
