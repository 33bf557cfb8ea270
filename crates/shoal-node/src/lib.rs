//! A shoal node (work in progress).

pub mod scheduler;
