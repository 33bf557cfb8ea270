//! End-to-end tests of the `shoal` binary.
