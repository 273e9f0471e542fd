//! One module per command; each turns parsed arguments into calls of the library.

pub mod config;
pub mod demo;
pub mod jobs;
pub mod ops;
pub mod schedule;
pub mod seed;
pub mod status;
