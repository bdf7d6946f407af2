//! Usage statistics (being written).
