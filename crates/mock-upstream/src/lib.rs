//! mock-upstream (work in progress).
