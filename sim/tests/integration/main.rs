//! The sim crate's integration tests in one binary (each module's header says what it covers): one
//! link of the crate's dependencies instead of one per file.

mod host;
mod support;

mod framing;
mod install;
mod persistence;
mod stm32flash;
