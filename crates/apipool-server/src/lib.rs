//! apipool-server (work in progress).
