//! Helpers for the end-to-end tests live in `it/`; this library is empty on purpose (the package exists to hold the `it` test binary).
