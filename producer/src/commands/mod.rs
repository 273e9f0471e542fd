//! One module per command; each turns parsed arguments into calls of the library.

pub mod config;
pub mod seed;
